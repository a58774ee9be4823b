"""Loading a causal language model and its tokenizer from a local directory or a GGUF file.

:func:`load_causal_lm` returns ``(model, tokenizer)`` in eval mode with a pad token set; a GGUF
file is converted once into the cache first (:mod:`comalkit.lm.gguf`). Nothing is downloaded.
transformers is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from comalkit.lm.files import ModelError, check_model_dir
from comalkit.lm.gguf import cached_gguf_dir, converted_gguf_dir
from comalkit.lm.quiet import quiet_progress_bars
from comalkit.lm.tokens import ensure_pad_token

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or ``fp32``/``bf16``/``fp16``, or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}") from None


def model_source(path: str | os.PathLike[str], gguf_file: str | None = None) -> Path:
    """What ``path`` (and ``gguf_file`` inside it) names: a ``.gguf`` file or a directory.

    Raises:
        ModelError: it does not exist, or it is a file but not a ``.gguf`` file.
    """
    source = Path(path).expanduser()
    if gguf_file is not None:
        source = source / gguf_file
    if not source.exists():
        raise ModelError(
            f"model path '{source}' does not exist; expected a Hugging Face model directory "
            f"(with config.json) or a .gguf file"
        )
    if source.is_file() and source.suffix.lower() != ".gguf":
        raise ModelError(
            f"model path '{source}' is a file but not a .gguf file; pass a model directory or a GGUF file"
        )
    return source


def load_causal_lm(
    path: str | os.PathLike[str],
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local directory or a GGUF file.

    Args:
        path: a Hugging Face model directory (``config.json`` + weights + tokenizer), a
            ``.gguf`` file, or a directory holding ``gguf_file``.
        gguf_file: the GGUF file's name inside ``path`` (optional when ``path`` is the file).
        dtype: the weights' dtype after loading (see :func:`resolve_dtype`).
        device: where to put the model; ``None`` leaves it on the CPU.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer has a pad token
        (its EOS token if it had none). A GGUF file is dequantized once into the cache
        (:func:`converted_gguf_dir`) and loaded from there.

    Raises:
        ModelError: ``path`` (or the GGUF file) does not exist, a directory is not a Hugging
            Face model directory, or a file in it is corrupt (:func:`check_model_dir`).
    """
    source = model_source(path, gguf_file)
    if source.is_file():
        source = converted_gguf_dir(source)
    check_model_dir(source)
    model, tokenizer = _load_hf_dir(source, resolve_dtype(dtype))
    if device is not None:
        model.to(device)
    return model, tokenizer


def load_config(path: str | os.PathLike[str], gguf_file: str | None = None) -> Any:
    """The transformers config of the model :func:`load_causal_lm` would load, without its weights.

    Checks at composition time use it (:meth:`PolicySettings.check`). A GGUF file's config comes
    from its cached conversion when there is one, else from the file's metadata (seconds).
    """
    from transformers import AutoConfig

    source = model_source(path, gguf_file)
    if source.is_file():
        converted = cached_gguf_dir(source.resolve())
        if not (converted / "config.json").is_file():
            with quiet_progress_bars():
                return AutoConfig.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
        source = converted
    check_model_dir(source)
    return AutoConfig.from_pretrained(source, local_files_only=True)


def _load_hf_dir(directory: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_progress_bars():
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as exc:  # transformers' errors run to many lines and do not name the file
            raise ModelError(
                f"model directory '{directory}': its tokenizer could not be loaded: {_first_line(exc)}"
            ) from exc
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
        except Exception as exc:
            raise ModelError(
                f"model directory '{directory}': transformers could not load it: {_first_line(exc)}"
            ) from exc
    model.eval()
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + " ...") if len(text) > 300 else text or type(exc).__name__


def check_chat_template(tokenizer: Any, where: str | os.PathLike[str]) -> None:
    """A policy formats prompts with the tokenizer's chat template; name the model that has none."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(
            f"the tokenizer of '{where}' has no chat template (chat_template in tokenizer_config.json or "
            "chat_template.jinja); comalkit formats every prompt with it"
        )


def load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in ``path``, with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ensure_pad_token(tokenizer)
    return tokenizer
