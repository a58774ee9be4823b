"""Checking model files before a library reads them, so that each fault gets one message naming the file.

transformers and safetensors report a missing, truncated or garbage file in many lines that do
not name it; these checks read only headers and sizes (docs/reliability.md).
"""

from __future__ import annotations

import json
from pathlib import Path

from comalkit.registry import ConfigError


class ModelError(ConfigError):
    """A model directory, GGUF file or checkpoint is missing, incomplete or corrupt; the message
    names the path (and file) and what was expected."""


def check_model_dir(directory: Path) -> None:
    """Check a Hugging Face model directory before transformers reads it, so that each fault gets
    one message naming the file: no or corrupt ``config.json``, no weights, a truncated or
    garbage safetensors file (its header and offsets are read, not its tensors)."""
    config = directory / "config.json"
    if not config.is_file():
        empty = " (the directory is empty)" if not any(directory.iterdir()) else ""
        raise ModelError(
            f"model directory '{directory}' has no config.json{empty}; it is not a Hugging Face model directory"
            + (" (for a GGUF file inside it, pass gguf_file=...)" if any(directory.glob("*.gguf")) else "")
        )
    try:
        parsed = json.loads(config.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ModelError(f"{config}{line}: not valid JSON ({exc}); the model config is corrupt") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelError(f"{config}: no 'model_type'; expected a transformers model config")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights and not any(directory.glob("*.bin")):
        raise ModelError(f"model directory '{directory}' has no weights (*.safetensors)")
    for file in weights:
        check_safetensors(file)


def check_safetensors(file: Path) -> None:
    """Raise :class:`ModelError` naming ``file`` if its header or tensor offsets do not fit its size."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise ModelError(f"{file}: not a safetensors file (truncated or garbage: bad header size)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(
                f"{file}: not a safetensors file (truncated or garbage: its header is not JSON)"
            ) from None
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    if 8 + n + max(ends, default=0) != size:
        raise ModelError(
            f"{file}: truncated or padded safetensors file ({size} bytes; its header needs {8 + n + max(ends, default=0)})"
        )
