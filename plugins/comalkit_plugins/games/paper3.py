"""The three-response cyclic game of the COMAL paper (Liu et al. 2025, its Figures 1 and 3)."""

from __future__ import annotations

from dataclasses import dataclass

from comalkit.games import GameBatch, check_matrix, check_policy
from comalkit.registry import plugin

from .base import MatrixGame

#: ``M[i][j] = P(y_i ≻ y_j)`` for responses a, b, c: b beats a and c beats b with 0.9, a beats c with 0.8.
PAPER3_MATRIX = [[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]]
#: The paper's start policy.
PAPER3_START = [0.2, 0.5, 0.3]
#: The unique Nash policy, [4/11, 3/11, 4/11].
PAPER3_NASH = [4 / 11, 3 / 11, 4 / 11]


@plugin("game", "paper3")
@dataclass
class Paper3Game(MatrixGame):
    """Preferences are cyclic (a ≺ b ≺ c ≺ a), so iterated DPO/IPO/SPPO cycle; π* = [4/11, 3/11, 4/11]."""

    def generate(self) -> GameBatch:
        matrix = check_matrix(PAPER3_MATRIX, source="paper3")
        start = check_policy(PAPER3_START, 3, source="paper3 start")
        return GameBatch(matrix, start, source="paper3", labels=["a", "b", "c"])
