"""Oracle ``rule``: deterministic synthetic preferences on surface features, for tests and demos.

* ``longer``: Bradley–Terry on the word count, a transitive preference for longer answers.
* ``keyword``: Bradley–Terry on a weighted count of keywords (whole words, any case).
* ``rps``: rock-paper-scissors on the word count modulo 3 (0 rock, 1 paper, 2 scissors; paper
  beats rock, scissors beat paper, rock beats scissors). Non-transitive: no ranking of
  responses explains it, which is exactly the kind of preference COMAL is built for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.registry import ConfigError, param, plugin
from comalkit_plugins.oracles.base import bradley_terry, settings_identity


def word_count(text: str) -> int:
    return len(text.split())


@plugin("oracle", "rule")
@dataclass
class RuleOracle(PreferenceOracle):
    """Preferences from a fixed rule on response features (see the module docstring)."""

    kind: str = param("longer", choices=("longer", "keyword", "rps"), help="which rule")
    temperature: float = param(1.0, gt=0.0, help="Bradley–Terry temperature of longer/keyword: σ(Δr / T)")
    keywords: dict[str, float] = param(
        default_factory=dict, help="kind=keyword: word -> reward per occurrence"
    )
    win_prob: float = param(0.9, ge=0.5, le=1.0, help="kind=rps: P(winner ≻ loser) between different classes")

    def __post_init__(self) -> None:
        if self.kind == "keyword" and not self.keywords:
            raise ConfigError(
                "oracle.keywords is empty; kind=keyword needs e.g. oracle.keywords={please: 1.0}"
            )
        self._patterns = {
            re.compile(rf"\b{re.escape(k)}\b", re.IGNORECASE): w for k, w in self.keywords.items()
        }

    def identity(self) -> str:
        return settings_identity("rule", self)

    def scores(self, prompt: str, responses: list[str]) -> Tensor:
        """The Bradley–Terry reward of each response (kinds ``longer`` and ``keyword``)."""
        if self.kind == "longer":
            values = [float(word_count(r)) for r in responses]
        elif self.kind == "keyword":
            values = [sum(w * len(p.findall(r)) for p, w in self._patterns.items()) for r in responses]
        else:
            raise ValueError(f"rule kind '{self.kind}' is not a Bradley–Terry rule and has no scores")
        return torch.tensor(values, dtype=torch.float64)

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        if self.kind != "rps":
            return bradley_terry(comparisons, self.scores, self.temperature)
        out = torch.empty(len(comparisons), dtype=torch.float64)
        for n, c in enumerate(comparisons):
            beats = (word_count(c.a) - word_count(c.b)) % 3  # 1: a beats b, 2: b beats a, 0: same class
            out[n] = (0.5, self.win_prob, 1.0 - self.win_prob)[beats]
        return out
