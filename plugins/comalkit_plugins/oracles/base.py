"""Pieces shared by the oracle plugins: the Bradley–Terry link and the identity string."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from comalkit.interfaces import Comparison

#: ``scores(prompt, distinct_responses) -> Tensor[len(distinct_responses)]``
ScoreFn = Callable[[str, list[str]], Tensor]


def bradley_terry(comparisons: Sequence[Comparison], scores: ScoreFn, temperature: float) -> Tensor:
    """P(a ≻ b) = σ((r(a) − r(b)) / T) (Bradley & Terry, 1952) for a batch of comparisons.

    ``scores`` is called once per prompt with that prompt's distinct responses, so a K×K win
    matrix costs K scores, not K² comparisons. The result is exactly antisymmetric:
    P(a ≻ b) + P(b ≻ a) = 1.
    """
    by_prompt: dict[str, dict[str, int]] = {}
    for c in comparisons:
        responses = by_prompt.setdefault(c.prompt, {})
        responses.setdefault(c.a, len(responses))
        responses.setdefault(c.b, len(responses))
    reward = {prompt: scores(prompt, list(responses)).double() for prompt, responses in by_prompt.items()}
    out = torch.empty(len(comparisons), dtype=torch.float64)
    for n, c in enumerate(comparisons):
        index, r = by_prompt[c.prompt], reward[c.prompt]
        out[n] = torch.sigmoid((r[index[c.a]] - r[index[c.b]]) / temperature)
    return out


def settings_identity(name: str, plugin: Any, exclude: Iterable[str] = (), **extra: Any) -> str:
    """``name{json}`` of a plugin's fields (minus ``exclude``) plus ``extra``: an oracle's cache identity.

    Exclude only settings that cannot change a judgment (batch sizes, timeouts, retries).
    """
    skip = set(exclude)
    fields = {
        f.name: getattr(plugin, f.name) for f in dataclasses.fields(plugin) if f.init and f.name not in skip
    }
    return f"{name}{json.dumps({**fields, **extra}, sort_keys=True, default=str)}"
