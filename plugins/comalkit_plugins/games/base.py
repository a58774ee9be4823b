"""What every game plugin shares: a ``matrix`` override and a ``start`` policy.

Any game accepts ``game.matrix=<file or inline list>``: the user's matrix then replaces the
game's own (its generator settings are ignored) and the start policy defaults to uniform.
So ``experiment=synthetic game.matrix=my.csv`` runs on ``my.csv`` even though the
experiment selects ``game=paper3``.
"""

# No `from __future__ import annotations` here: the field types must be real objects, because the
# registry builds each subclass's Hydra schema in the subclass's module, where `Any` is not imported.

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from comalkit.games import TOL, GameBatch, check_policy, load_matrix
from comalkit.interfaces import GameSource
from comalkit.registry import param


def uniform(count: int, n: int) -> np.ndarray:
    return np.full((count, n), 1.0 / n)


@dataclass
class MatrixGame(GameSource):
    """A game whose matrix comes from :meth:`generate` unless ``matrix`` overrides it."""

    matrix: Any = param(
        None, help="path to .npy/.csv/.json or an inline list; replaces this game's own matrix"
    )
    start: list[Any] | None = param(
        None, help="start policy (list of n, or one per game); default: the game's own"
    )
    tol: float = param(TOL, gt=0.0, help="tolerance on M + Mᵀ = 1 and on the start policy's sum")

    @abstractmethod
    def generate(self) -> GameBatch:
        """The game's own matrices and default start policies (used when ``matrix`` is not set)."""

    def build(self) -> GameBatch:
        if self.matrix is not None:
            matrices, source = load_matrix(self.matrix, tol=self.tol)
            count = 1 if matrices.ndim == 2 else matrices.shape[0]
            batch = GameBatch(matrices, uniform(count, matrices.shape[-1]), source)
        else:
            batch = self.generate()
        if self.start is not None:
            batch.start = np.broadcast_to(
                check_policy(self.start, batch.n, tol=self.tol, source="game.start"), batch.start.shape
            ).copy()
        return batch
