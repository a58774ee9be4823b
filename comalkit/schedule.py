"""The round schedule: which outer round an iteration belongs to, and that round's KL strength.

COMAL (Liu et al. 2025, Algorithm 1) runs outer rounds; each solves one KL-regularised subgame
around a fixed reference μ with several solver iterations, then μ moves to the solution. The
reference updater owns the schedule's numbers (``round_of(k)``, an optional per-round
``strength``, e.g. ``reference.strengths=[0.002, 0.1]``); this object is the one place that
reads them and hands the strength to the solver, so the online loop (comalkit/loop.py) and the
game engine (comalkit/games.py) follow the same schedule. See docs/architecture.md.

Whether μ moves after an iteration is the updater's ``update`` (it returns the new μ or
``None``): ``prox`` moves at the end of each round, ``ema`` blends without starting rounds.
"""

from __future__ import annotations

from comalkit.interfaces import ReferenceUpdater, SubgameSolver


class RoundSchedule:
    """The rounds of one run of ``solver`` under ``reference`` (a reference updater)."""

    def __init__(self, reference: ReferenceUpdater, solver: SubgameSolver) -> None:
        self.reference = reference
        self.solver = solver
        #: the outer round of iteration k (0-based): the updater's own method, bound once because
        #: the game engine asks it every iteration
        self.round_of = reference.round_of

    def starts_round(self, iteration: int) -> bool:
        """Whether ``iteration`` is the first of its round."""
        return iteration == 0 or self.round_of(iteration - 1) != self.round_of(iteration)

    def rounds(self, iterations: int) -> int:
        """How many rounds ``iterations`` iterations touch."""
        return self.round_of(iterations - 1) + 1

    def strength(self, round_index: int) -> float | None:
        """The KL strength of round ``round_index``, or ``None`` to keep the solver's own."""
        return self.reference.strength(round_index)

    def apply(self, round_index: int) -> float | None:
        """Give the solver round ``round_index``'s strength, if one is scheduled; return it."""
        value = self.strength(round_index)
        if value is not None:
            self.solver.set_strength(value)
        return value
