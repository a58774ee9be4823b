"""The one way tests build the tiny test policy (``model=tiny``, random weights, milliseconds)."""

from __future__ import annotations

from typing import Any

from comalkit_plugins.models.tiny import TinyModel

from comalkit.lm.lora import LoraSettings
from comalkit.lm.policy import LMPolicy

#: the training tests' sizes: room for the sample pairs' prompts and responses, LoRA rank 4
TRAINING_SIZES: dict[str, Any] = {"max_length": 160, "max_prompt_length": 96, "r": 4}


def tiny_policy(lora: bool = True, seed: int = 0, r: int = 16, **settings: Any) -> LMPolicy:
    """``model=tiny`` with weights and adapter seeded by ``seed``: a LoRA adapter of rank ``r``
    (``lora=False``: every weight trainable); ``settings`` are the other model fields
    (``max_length``, ``truncation``, ``autocast``, ...)."""
    return TinyModel(seed=seed, lora=LoraSettings(enabled=lora, r=r), **settings).build()
