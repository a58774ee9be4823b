"""``reference=growing``: COMAL's prox-point step on subgames that grow geometrically longer.

COMAL (Liu et al. 2025, Algorithm 1) moves the reference μ to the current policy after each
subgame and solves each subgame only approximately. An inexact proximal point method converges
when the subgame errors are summable (Rockafellar 1976, "Monotone operators and the proximal
point algorithm", Theorem 1). With an inner solver that converges linearly on the
regularised game (INPO does), giving subgame r ``⌈first · growth^r⌉`` iterations makes its
error decay geometrically, so early rounds are cheap and late rounds accurate, where
``reference=prox`` spends the same ``period`` on every round.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from comalkit.interfaces import ReferenceUpdater, Snapshot
from comalkit.registry import ConfigError, param, plugin


@plugin("reference", "growing")
@dataclass
class GrowingProx(ReferenceUpdater):
    """μ ← π after subgames of ``⌈first · growth^r⌉`` iterations (r = 0, 1, ...)."""

    first: int = param(1, ge=1, help="iterations in the first subgame")
    growth: float = param(2.0, ge=1.0, help="each subgame is this many times longer than the one before")
    strengths: list[float] = param(
        default_factory=list,
        help="per-round KL strength schedule (the last repeats); empty: the solver's own",
    )
    _ends: list[int] = field(default_factory=list, init=False, repr=False)  # a cache, derived from the fields

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.strengths):
            raise ConfigError(f"reference.strengths={self.strengths}: every strength must be > 0")

    def round_end(self, round_index: int) -> int:
        """The number of iterations done when round ``round_index`` ends."""
        while len(self._ends) <= round_index:
            r = len(self._ends)
            length = math.ceil(self.first * self.growth**r - 1e-9)
            self._ends.append((self._ends[-1] if self._ends else 0) + length)
        return self._ends[round_index]

    def round_of(self, iteration: int) -> int:
        while not self._ends or self._ends[-1] <= iteration:
            self.round_end(len(self._ends))
        return bisect.bisect_right(self._ends, iteration)  # the rounds that ended by then

    def update(self, reference: Snapshot, policy: Snapshot, iteration: int) -> Snapshot | None:
        if iteration + 1 != self.round_end(self.round_of(iteration)):
            return None
        return {k: v.detach().clone() for k, v in policy.items()}

    def strength(self, round_index: int) -> float | None:
        if not self.strengths:
            return None
        return self.strengths[min(round_index, len(self.strengths) - 1)]
