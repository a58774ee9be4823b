"""LoRA: the adapter settings and wrapping a causal LM in a fresh adapter (peft).

With LoRA the base stays frozen and the trainable state is the adapter, so the reference μ and
the last iterate π_t are adapter snapshots (:mod:`comalkit.lm.snapshots`), not model copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from comalkit.lm.quiet import peft_deprecation_silenced
from comalkit.registry import ConfigError, param


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    ``W + (alpha / r)·B·A`` on each target module; B starts at zero, so a fresh adapter is
    exactly the base model and the initial snapshot is a valid reference. Dropout defaults to
    0 so that the policy and a reference snapshot agree bit for bit at the start (DPO's loss
    is then exactly ln 2).
    """

    enabled: bool = param(True, help="train a LoRA adapter (False: full fine-tune)")
    r: int = param(16, ge=1, help="LoRA rank")
    alpha: float = param(32.0, gt=0.0, help="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = param(0.0, ge=0.0, lt=1.0, help="dropout on the LoRA branch input")
    target_modules: list[str] = param(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        help="module names (suffixes) that get an adapter",
    )


#: peft's special value for "every linear layer but the output head"
ALL_LINEAR = "all-linear"


def check_target_modules(lora: LoraSettings, config: Any) -> None:
    """Refuse a ``lora.target_modules`` name that matches no module of the model ``config`` builds.

    The model is built on the meta device (no weights, well under a second), so a typo, or the
    default q/k/v/o names on a model that calls them otherwise, fails at composition time, before
    any file is written. A name matches as peft matches it: the module's full name, or its last
    dotted parts. peft itself would accept a list in which only some names match.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in model.named_modules() if name]
    missing = [
        target
        for target in lora.target_modules
        if target != ALL_LINEAR and not any(n == target or n.endswith(f".{target}") for n in names)
    ]
    if missing:
        from transformers.pytorch_utils import Conv1D

        layers = (torch.nn.Linear, torch.nn.Embedding, Conv1D)  # what peft's LoRA can wrap
        adaptable = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, layers)})
        verb = "names" if len(missing) == 1 else "name"
        raise ConfigError(
            f"model.lora.target_modules={list(lora.target_modules)}: {', '.join(map(repr, missing))} "
            f"{verb} no module of this {config.model_type} model; its layers that LoRA can adapt are "
            f"{adaptable} (or use {ALL_LINEAR!r})"
        )


def is_peft(model: Any) -> bool:
    """Whether ``model`` already carries a peft adapter."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def wrap_lora(model: Any, lora: LoraSettings, seed: int) -> Any:
    """``model`` with a fresh adapter on ``lora.target_modules``; ``seed`` fixes its initialisation
    (the global RNG is left as it was)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # peft reads its special value only as a plain string
        target_modules=ALL_LINEAR if list(lora.target_modules) == [ALL_LINEAR] else list(lora.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with peft_deprecation_silenced():
                return get_peft_model(model, config)
        except ValueError as exc:  # peft names the missing modules; add what to do
            raise ValueError(f"model.lora.target_modules={list(lora.target_modules)}: {exc}") from exc
