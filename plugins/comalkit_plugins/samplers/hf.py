"""``sampler=hf``: batched transformers ``generate`` on the policy's own model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from comalkit.interfaces import Sampler, Snapshot
from comalkit.registry import param, plugin


@plugin("sampler", "hf")
@dataclass
class HFSampler(Sampler):
    """Samples with :meth:`comalkit.lm.policy.LMPolicy.sample`: no second copy of the weights,
    no start-up, and the same seed gives the same responses on the CPU (docs/sampling.md)."""

    batch_size: int = param(16, ge=1, help="sequences per generate call")

    def sample(
        self,
        policy: Any,
        prompts: Sequence[Any],
        n: int,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        snapshot: Snapshot | None = None,
        progress: str | None = None,
    ) -> list[list[str]]:
        return policy.sample(
            prompts,
            n,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=self.batch_size,
            snapshot=snapshot,
            progress=progress,
        )
