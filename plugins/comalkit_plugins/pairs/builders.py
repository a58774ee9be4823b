"""The built-in pair builders: best vs worst, best vs second best (COMAL's code), all pairs (SPPO).

Responses are ranked by their mean win rate against the sampled set (see
:mod:`comalkit.pairing`). A pair is only formed between responses with different text and a
strictly lower win rate for the rejected one; a prompt where no such pair exists is skipped.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from comalkit.pairing import TIE_TOL, PerPromptPairBuilder, ranking
from comalkit.registry import param, plugin


def _below(best: int, candidates: Sequence[int], texts: Sequence[str], rates: Tensor) -> int | None:
    """The first candidate that differs from ``best`` in text and has a strictly lower win rate."""
    for j in candidates:
        if texts[j] != texts[best] and float(rates[best] - rates[j]) > TIE_TOL:
            return j
    return None


@dataclass
class _RankedBuilder(PerPromptPairBuilder):
    """One pair per prompt, chosen = the top-ranked response; subclasses pick the rejected one."""

    win_probs: bool = param(False, help="attach P̂(y ≻ π_t) of chosen and rejected (for SPPO-style solvers)")

    @property
    def provides_win_probs(self) -> bool:  # type: ignore[override]
        return self.win_probs

    @abstractmethod
    def rejected_candidates(self, order: list[int]) -> list[int]:
        """Indices to try as the rejected response, in order of preference."""

    def select(
        self, texts: Sequence[str], matrix: Tensor, rates: Tensor
    ) -> list[tuple[int, int, float | None]]:
        order = ranking(rates)
        rejected = _below(order[0], self.rejected_candidates(order), texts, rates)
        return [] if rejected is None else [(order[0], rejected, None)]


@plugin("pairs", "best_vs_worst")
@dataclass
class BestVsWorst(_RankedBuilder):
    """chosen = highest mean win rate, rejected = lowest (the usual iterative-DPO/SPPO choice).

    SPPO's experiments (Wu et al. 2024, "Self-Play Preference Optimization") train on the
    best and worst of K samples with their estimated win rates: ``pairs.win_probs=true``.
    """

    def rejected_candidates(self, order: list[int]) -> list[int]:
        return order[::-1]


@plugin("pairs", "best_vs_second")
@dataclass
class BestVsSecond(_RankedBuilder):
    """chosen = highest mean win rate, rejected = the next one down: COMAL's public code.

    COMAL (Liu et al. 2024, ``data_processing.py``) sorts the samples by their averaged
    pairwise judge score and trains INPO on the top two. A hard pair at the top of the
    ranking; a tie with the best is passed over for the next lower response.
    """

    def rejected_candidates(self, order: list[int]) -> list[int]:
        return order[1:]


@plugin("pairs", "all_pairs")
@dataclass
class AllPairs(PerPromptPairBuilder):
    """Every unordered pair of distinct responses, oriented by the oracle: chosen = the one with M > ½.

    Each record carries both responses' P̂(y ≻ π_t), the soft targets of SPPO's squared loss
    (Wu et al. 2024; ``p_w``/``p_l`` in docs/solvers.md), so SPPO sees every sampled response. Pairs the oracle judges exactly even
    (M = ½) are dropped. With ``per_prompt_weight`` each record weighs 1/(pairs of its prompt),
    so every prompt counts once in the loss however many of its pairs survive.
    """

    per_prompt_weight: bool = param(True, help="weigh each pair 1/(pairs of its prompt)")
    provides_win_probs = True

    def select(
        self, texts: Sequence[str], matrix: Tensor, rates: Tensor
    ) -> list[tuple[int, int, float | None]]:
        k = len(texts)
        pairs = []
        for i in range(k):
            for j in range(i + 1, k):
                if texts[i] == texts[j] or abs(float(matrix[i, j]) - 0.5) <= TIE_TOL:
                    continue
                pairs.append((i, j) if matrix[i, j] > 0.5 else (j, i))
        weight = 1.0 / len(pairs) if pairs and self.per_prompt_weight else None
        return [(c, r, weight) for c, r in pairs]
