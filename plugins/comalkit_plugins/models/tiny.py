"""``model=tiny``: a small randomly initialised Llama for tests (no download, milliseconds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from comalkit.models import tiny_causal_lm
from comalkit.policy import PolicySettings
from comalkit.registry import param, plugin


@plugin("model", "tiny")
@dataclass
class TinyModel(PolicySettings):
    """A random ``LlamaForCausalLM`` with a byte-level ChatML tokenizer built in code.

    Its outputs are noise; it exists so that every code path (LoRA, masks, sampling,
    checkpoints, training) runs in seconds. ``seed`` fixes its weights.
    """

    hidden_size: int = param(32, ge=4, help="hidden width (divisible by num_heads)")
    num_layers: int = param(2, ge=1, help="decoder layers")
    num_heads: int = param(4, ge=1, help="attention heads")
    intermediate_size: int = param(64, ge=1, help="MLP width")
    max_position_embeddings: int = param(512, ge=2, help="context length (>= max_length)")

    def load(self) -> tuple[Any, Any]:
        model, tokenizer = tiny_causal_lm(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            seed=self.seed,
            dtype=self.dtype,
        )
        return model, tokenizer
