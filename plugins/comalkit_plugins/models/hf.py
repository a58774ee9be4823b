"""``model=hf``: any local Hugging Face causal-LM directory, or a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comalkit.lm.loading import check_chat_template, load_causal_lm, load_config
from comalkit.lm.settings import PolicySettings
from comalkit.registry import ConfigError, param, plugin


@plugin("model", "hf")
@dataclass
class HFModel(PolicySettings):
    """A local model: a directory with ``config.json``, weights and a tokenizer with a chat template.

    ``path`` may also be a ``.gguf`` file (or a directory plus ``gguf_file``); it is converted
    once into the comalkit cache like the bundled model. Nothing is downloaded.
    """

    path: str = param("", help="local model directory or .gguf file")
    gguf_file: str | None = param(None, help="GGUF file name inside path, if path is a directory")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ConfigError("model=hf needs model.path=<local model directory or .gguf file>")
        if not Path(self.path).expanduser().exists():
            raise ConfigError(
                f"model.path={self.path!r} does not exist (a local model directory or .gguf file)"
            )

    def base_config(self) -> Any:
        return load_config(self.path, gguf_file=self.gguf_file)

    def load(self) -> tuple[Any, Any]:
        model, tokenizer = load_causal_lm(self.path, gguf_file=self.gguf_file, dtype=self.dtype)
        check_chat_template(tokenizer, self.path)
        return model, tokenizer
