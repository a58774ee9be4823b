"""Policy checkpoints in Hugging Face format: writing them atomically, reading them back, and
checking that a LoRA adapter is put on the base model it was trained on.

A LoRA checkpoint is the adapter (``adapter_config.json`` + ``adapter_model.safetensors``) plus
:data:`BASE_FILE`, which records its base model; a full checkpoint is a plain model directory.
The tokenizer is saved with either (docs/models.md).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from comalkit.lm.files import ModelError, check_safetensors
from comalkit.lm.loading import load_causal_lm, load_tokenizer
from comalkit.lm.lora import is_peft
from comalkit.lm.quiet import peft_deprecation_silenced, quiet_progress_bars
from comalkit.outputs import OutputError, is_io_error

#: written next to a LoRA adapter by :func:`save_checkpoint`
BASE_FILE = "comalkit_base.json"
_BASE_CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def save_checkpoint(model: Any, tokenizer: Any, path: str | os.PathLike[str], lora: bool) -> Path:
    """Write ``model`` (LoRA: its adapter) and ``tokenizer`` in Hugging Face format, atomically; returns the directory.

    LoRA: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, loadable
    with ``peft.PeftModel.from_pretrained(base, path)``); full: the whole model (loadable
    with ``AutoModelForCausalLM.from_pretrained(path)``). The tokenizer is saved with it.
    Everything is written to a temporary sibling directory first and renamed into place,
    so ``path`` never holds a half-written checkpoint (an existing one is replaced).
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        with quiet_progress_bars():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if lora:  # which base the adapter belongs to, checked when it is loaded again
            (tmp / BASE_FILE).write_text(json.dumps(base_identity(model)) + "\n")
        replace_dir(tmp, target)
    except Exception as exc:  # transformers and tokenizers report a full disk without the file
        if is_io_error(exc) and not isinstance(exc, OutputError):
            raise OutputError(target, exc) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_checkpoint(
    path: str | os.PathLike[str], base: Any = None, dtype: str | torch.dtype = "float32"
) -> tuple[Any, Any]:
    """The model and tokenizer of a checkpoint written by :func:`save_checkpoint`.

    A LoRA checkpoint (``adapter_config.json``) needs its base model: ``base`` is a
    ``(model, tokenizer)`` pair or a path for :func:`comalkit.lm.loading.load_causal_lm`;
    ``None`` uses the adapter's recorded ``base_model_name_or_path``. The adapter stays
    trainable and the tokenizer comes from the checkpoint. A full checkpoint is a plain
    model directory. ``dtype`` applies to what is loaded from a path.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelError(f"policy checkpoint '{path}' does not exist or is not a directory")
    if not (path / "adapter_config.json").is_file():
        return load_causal_lm(path, dtype=dtype)
    from peft import PeftConfig, PeftModel

    if base is None:
        base = PeftConfig.from_pretrained(path).base_model_name_or_path
        if not base:
            raise ModelError(
                f"LoRA checkpoint '{path}' records no base model; pass base=(model, tokenizer) or a path"
            )
    model, _ = load_causal_lm(base, dtype=dtype) if isinstance(base, (str, os.PathLike)) else base
    if is_peft(model):
        raise ValueError(f"the base for LoRA checkpoint '{path}' already has an adapter; pass the bare model")
    check_adapter_base(path, model)  # an adapter on the wrong base would load without complaint
    tokenizer = load_tokenizer(path)
    with quiet_progress_bars(), peft_deprecation_silenced():
        peft_model = PeftModel.from_pretrained(model, path, is_trainable=True)
    return peft_model, tokenizer


def base_identity(model: Any) -> dict[str, Any]:
    """What identifies a base model across machines and dtypes: its architecture numbers and a
    sample of its input embeddings (32 rows x 8 values, compared with a tolerance)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    emb = base.get_input_embeddings().weight.detach()
    rows = torch.linspace(0, emb.shape[0] - 1, 32).long()
    sample = emb[rows, :8].float().cpu().flatten().tolist()
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        **{k: getattr(config, k, None) for k in _BASE_CONFIG_KEYS},
        "embedding_sample": sample,
    }


def check_adapter_base(checkpoint: str | os.PathLike[str], model: Any) -> None:
    """Raise :class:`ModelError` if the LoRA adapter in ``checkpoint`` was not trained on ``model``.

    Checkpoints written by comalkit record their base (:data:`BASE_FILE`); for others the
    adapter's tensor shapes are checked against the model's modules.
    """
    checkpoint = Path(checkpoint)
    recorded = checkpoint / BASE_FILE
    if recorded.is_file():
        try:
            expected = json.loads(recorded.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{recorded}: not valid JSON ({exc}); the checkpoint is damaged") from None
        actual = base_identity(model)
        differs = [k for k in _BASE_CONFIG_KEYS if expected.get(k) != actual.get(k)]
        a, b = torch.tensor(expected.get("embedding_sample", [])), torch.tensor(actual["embedding_sample"])
        if not differs and (a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=1e-3)):
            differs = ["weights"]
        if differs:
            detail = ", ".join(f"{k} {expected.get(k)} vs {actual.get(k)}" for k in differs if k != "weights")
            raise ModelError(
                f"LoRA checkpoint '{checkpoint}' was trained on base '{expected.get('name_or_path') or '?'}', "
                f"not on this model ('{actual['name_or_path'] or '?'}': {detail or 'different weights'}); "
                "load it with the model of its run (its .hydra/config.yaml)"
            )
        return
    _check_adapter_shapes(checkpoint, model)


def _check_adapter_shapes(checkpoint: Path, model: Any) -> None:
    file = checkpoint / "adapter_model.safetensors"
    if not file.is_file():
        return
    from safetensors import safe_open

    check_safetensors(file)
    modules = dict(model.named_modules())
    with safe_open(str(file), "pt") as fh:
        names = fh.keys()
        for key in names:
            parts = key.split(".")
            if "lora_A" not in parts and "lora_B" not in parts:
                continue
            side = "lora_A" if "lora_A" in parts else "lora_B"
            path = ".".join(parts[: parts.index(side)])
            path = path.removeprefix("base_model.model.")
            module = modules.get(path)
            shape = fh.get_slice(key).get_shape()
            want = getattr(module, "in_features" if side == "lora_A" else "out_features", None)
            got = shape[1] if side == "lora_A" else shape[0]
            if module is None or (want is not None and want != got):
                raise ModelError(
                    f"LoRA checkpoint '{checkpoint}' does not fit this base model: {key} has shape {list(shape)} "
                    f"but the model's '{path}' {'is missing' if module is None else f'has {want} features'}; "
                    "load it with the model of its run"
                )


def replace_dir(new: Path, target: Path) -> None:
    """Move directory ``new`` to ``target``, replacing an existing one with two renames."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "previous")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
