"""A user's own preference matrix: ``game=matrix game.matrix=<file .npy/.csv/.json or inline list>``."""

from __future__ import annotations

from dataclasses import dataclass

from comalkit.games import GameBatch, GameError
from comalkit.registry import plugin

from .base import MatrixGame


@plugin("game", "matrix")
@dataclass
class UserMatrixGame(MatrixGame):
    """Loads ``matrix`` (validated: square, finite, in [0, 1], ``M + Mᵀ = 1``); start uniform by default."""

    def generate(self) -> GameBatch:
        raise GameError(
            "game=matrix needs game.matrix=<path to .npy, .csv or .json, or an inline list like "
            "[[0.5,0.3],[0.7,0.5]]>"
        )
