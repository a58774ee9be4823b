"""The settings every ``model`` plugin shares, and how they build an :class:`~comalkit.lm.policy.LMPolicy`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comalkit.lm.lora import LoraSettings, check_target_modules
from comalkit.lm.policy import AUTOCAST_DTYPES, LMPolicy
from comalkit.lm.tokens import TRUNCATION_MODES
from comalkit.registry import ConfigError, param


@dataclass
class PolicySettings:
    """The fields every ``model`` plugin shares; a plugin adds where the weights come from.

    A plugin implements :meth:`load` (the bare base model and tokenizer); :meth:`build` wraps
    it into an :class:`LMPolicy` with these settings, and :meth:`load_checkpoint` puts a saved
    adapter (or full model) back on top of it with the same settings.
    """

    dtype: str = param(
        "float32", choices=["float32", "bfloat16", "float16"], help="weight dtype after loading"
    )
    autocast: str | None = param(
        None, choices=list(AUTOCAST_DTYPES), help="autocast dtype for forward passes; null: off"
    )
    device: str = param("cpu", help="cpu, cuda, cuda:N or auto")
    lora: LoraSettings = param(
        default_factory=LoraSettings, help="LoRA adapter (enabled=false: full fine-tune)"
    )
    max_length: int = param(512, ge=2, help="longest prompt + response in tokens")
    max_prompt_length: int = param(256, ge=1, help="longest prompt in tokens (< max_length)")
    truncation: str = param(
        "warn", choices=list(TRUNCATION_MODES), help="a too-long prompt: warn (keep its end) or error"
    )
    gradient_checkpointing: bool = param(False, help="recompute activations in backward (less memory)")
    seed: int = param(0, ge=0, help="seeds the LoRA (and tiny model) initialisation")

    def __post_init__(self) -> None:
        # instantiate(..., _convert_="all") hands nested configs over as dicts
        if isinstance(self.lora, Mapping):
            self.lora = LoraSettings(**self.lora)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"model.max_prompt_length={self.max_prompt_length} must be < model.max_length={self.max_length}"
            )

    def base_config(self) -> Any | None:
        """The base model's transformers config, read without the weights; None where a plugin
        cannot read it cheaply (then :meth:`check` has nothing to check it against)."""
        return None

    def check(self) -> None:
        """The checks that need the model's architecture but not its weights, run at composition
        time (:func:`comalkit.app.check_config`): the LoRA target modules exist."""
        if self.lora.enabled:
            config = self.base_config()
            if config is not None:
                check_target_modules(self.lora, config)

    def load(self) -> tuple[Any, Any]:
        """The bare base model (no adapter, eval mode, ``self.dtype``) and its tokenizer."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def build(self) -> LMPolicy:
        """A fresh policy: the base model with a new LoRA adapter (or fully trainable)."""
        model, tokenizer = self.load()
        return LMPolicy(model, tokenizer, lora=self.lora, seed=self.seed, **self._policy_settings())

    def load_checkpoint(self, path: str | os.PathLike[str]) -> LMPolicy:
        """A policy saved by :meth:`LMPolicy.save_checkpoint`, with these settings.

        A LoRA checkpoint goes on top of this plugin's base model (:meth:`load`); a full one
        is loaded from ``path`` in ``self.dtype``.
        """
        is_adapter = (Path(path).expanduser() / "adapter_config.json").is_file()
        return LMPolicy.from_checkpoint(
            path, base=self.load() if is_adapter else None, dtype=self.dtype, **self._policy_settings()
        )

    def _policy_settings(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "truncation": self.truncation,
            "device": self.device,
            "autocast": self.autocast,
            "gradient_checkpointing": self.gradient_checkpointing,
        }
