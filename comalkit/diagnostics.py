"""How non-transitive the oracle is on the responses a run actually samples: the cycle rate.

COMAL targets *general* preferences (Liu et al. 2025, COMAL, §1–§2): when the oracle's
preferences contain cycles (y₁ ≺ y₂ ≺ y₃ ≺ y₁), no Bradley–Terry reward explains them, a
ranking-based method optimises the wrong target, and the Nash policy of the preference game is
the right one. How much that matters for a run depends on how often the oracle is cyclic on the
run's own samples, which none of the usual metrics show. The cycle rate is that share: of all
triples of responses to one prompt, the fraction whose strict majority preferences
(P > ½ in both orders averaged) go round, i ≻ j ≻ k ≻ i. Zero means the oracle behaved like a
ranking on these samples (general-preference methods gain nothing over Bradley–Terry here);
above zero it did not. See docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: preferences within this distance of ½ count as ties (no direction), so rounding is not a cycle
TIE_TOLERANCE = 1e-9


def beats(matrix: Tensor) -> Tensor:
    """The strict majority relation of a K×K preference matrix ``M[i][j] = P(y_i ≻ y_j)``.

    Both orders are averaged, ``½[M[i][j] + 1 − M[j][i]]``, so a judge's position bias cannot
    make a direction; ``True`` where that exceeds ½ (ties and the diagonal are ``False``).
    """
    m = torch.as_tensor(matrix, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a preference matrix must be square K×K, got shape {tuple(m.shape)}")
    both = 0.5 * (m + 1.0 - m.T)
    return both > 0.5 + TIE_TOLERANCE


def cycle_counts(matrix: Tensor) -> tuple[int, int]:
    """``(cyclic triples, all triples)`` among the K responses of one preference matrix.

    A triple is cyclic when its strict relation is a directed 3-cycle. With A the 0/1 relation
    matrix, ``trace(A³)`` counts each directed 3-cycle once per starting vertex, so the number
    of cyclic triples is ``trace(A³) / 3`` (a strict relation on three items holds at most one).
    """
    a = beats(matrix).to(torch.float64)
    k = a.shape[0]
    triples = math.comb(k, 3)
    if triples == 0:
        return 0, 0
    cycles = round(float(torch.trace(a @ a @ a)) / 3)
    return cycles, triples


def pooled_cycle_counts(matrices: Sequence[Tensor]) -> tuple[int, int]:
    """``(cyclic triples, all triples)`` summed over prompts, one K×K matrix each."""
    cycles = triples = 0
    for m in matrices:
        c, t = cycle_counts(m)
        cycles, triples = cycles + c, triples + t
    return cycles, triples


def cycle_rate(matrices: Sequence[Tensor]) -> float | None:
    """The share of response triples that form a strict preference cycle, pooled over prompts.

    ``matrices`` holds one K×K preference matrix per prompt (as the judge stage stores them).
    ``None`` when no matrix has three responses: with fewer than three, a cycle cannot exist and
    the rate is not defined (rather than 0, which would claim the oracle was transitive).
    """
    cycles, triples = pooled_cycle_counts(matrices)
    return cycles / triples if triples else None
