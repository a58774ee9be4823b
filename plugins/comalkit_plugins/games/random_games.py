"""Seeded random preference games: ``M = σ(A)`` with ``A`` skew-symmetric, or an interior Nash policy by construction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from comalkit.games import GameBatch, check_matrix
from comalkit.registry import param, plugin

from .base import MatrixGame, uniform


def skew_logits(family: str, count: int, n: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Skew-symmetric logits ``A`` (``[count, n, n]``) so that ``σ(A) + σ(A)ᵀ = 1`` holds exactly.

    * ``gaussian``: ``A_ij ~ N(0, scale²)`` for i < j: general, usually non-transitive games;
    * ``cyclic``: response i beats the next ⌊(n−1)/2⌋ responses cyclically (rock-paper-scissors
      generalised) with logits ``scale · U(0.5, 1.5)``; for even n the opposite response ties;
    * ``transitive``: Bradley–Terry, ``A_ij = s_i − s_j`` with scores ``s ~ N(0, scale²)``:
      the best response is the (pure) Nash policy.
    """
    if family == "gaussian":
        upper = np.triu(rng.normal(0.0, scale, size=(count, n, n)), 1)
        return upper - np.swapaxes(upper, -1, -2)
    if family == "cyclic":
        logits = np.zeros((count, n, n))
        strength = scale * rng.uniform(0.5, 1.5, size=(count, n, n))
        for i in range(n):
            for d in range(1, (n - 1) // 2 + 1):
                j = (i + d) % n
                logits[:, i, j] = strength[:, i, j]
                logits[:, j, i] = -strength[:, i, j]
        return logits
    scores = rng.normal(0.0, scale, size=(count, n))
    return scores[:, :, None] - scores[:, None, :]


def interior_games(count: int, n: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Games ``M = ½ + S`` whose Nash policy is a random interior π* (``[count, n, n]``).

    π* ~ Dirichlet(2, …, 2); ``S = Qᵀ A Q`` with ``A`` skew-symmetric Gaussian (std ``scale``)
    and ``Q = I − π* 1ᵀ``, so ``S`` is skew-symmetric with ``S π* = 0``: every response wins
    exactly ½ against π*, which is therefore a Nash policy with full support (generically the
    only one). ``S`` is shrunk when needed so that every entry of M lies in [0, 1].
    """
    games = np.empty((count, n, n))
    for g in range(count):
        pi = rng.dirichlet(np.full(n, 2.0))
        upper = np.triu(rng.normal(0.0, scale, size=(n, n)), 1)
        q = np.eye(n) - np.outer(pi, np.ones(n))
        s = q.T @ (upper - upper.T) @ q
        games[g] = 0.5 + s * min(1.0, 0.5 / max(np.abs(s).max(), 1e-300))
    return games


@plugin("game", "random")
@dataclass
class RandomGame(MatrixGame):
    """``count`` seeded games of ``size`` responses each, run as one batch; start uniform."""

    family: str = param(
        "gaussian",
        choices=("gaussian", "cyclic", "transitive", "interior"),
        help="how the game is drawn (interior: a full-support Nash policy by construction)",
    )
    size: int = param(5, ge=2, help="number of responses n")
    count: int = param(1, ge=1, help="number of games in the batch")
    scale: float = param(1.0, gt=0.0, help="spread of the logits A (larger: more decisive preferences)")
    seed: int = param(0, help="random seed; the same seed gives the same games")

    def generate(self) -> GameBatch:
        rng = np.random.default_rng(self.seed)
        if self.family == "interior":
            raw = interior_games(self.count, self.size, self.scale, rng)
        else:
            raw = 1.0 / (1.0 + np.exp(-skew_logits(self.family, self.count, self.size, self.scale, rng)))
        matrices = check_matrix(raw, source=f"random {self.family} game")
        source = f"random {self.family} n={self.size} seed={self.seed}"
        return GameBatch(matrices, uniform(self.count, self.size), source=source)
