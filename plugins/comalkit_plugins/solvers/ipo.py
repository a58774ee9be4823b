"""The squared-margin family: IPO, Iter-IPO (here), INPO and MPO (their own modules).

All regress a policy log-ratio against a mixed baseline onto a fixed margin:

    loss = (Δ_θ − r·Δ_ref − (1 − r)·Δ_t − 1/(2c))²,

IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences", Eq. 17) is r = 1, c = τ; Iter-IPO is r = 0, c = τ (IPO against the last iterate).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

from torch import Tensor

from comalkit.interfaces import LAST_ITERATE_LOGPS, REFERENCE_LOGPS, LossOutput, PairLogps, WinRateFn
from comalkit.registry import param, plugin

from .base import PairSolver, normalise


@dataclass
class SquaredMarginSolver(PairSolver):
    """The family's shared loss and population update; subclasses define ``ratio`` and ``coefficient``.

    Population update (the IPO paper's Proposition, generalised to a mixed baseline). Write
    ``g = θ − r·log μ − (1 − r)·log π_t`` and ``w_ij = π_t(i) π_t(j) M_ij`` over all ordered
    pairs (i, j). The population loss is ``Σ_ij w_ij (g_i − g_j − 1/(2c))²``; using
    ``M_ij + M_ji = 1`` its gradient in ``g_k`` is

        2 π_t(k) [ (g_k − Σ_j π_t(j) g_j) − (2 P(k ≻ π_t) − 1)/(2c) ],

    which vanishes iff ``g_k = P(k ≻ π_t)/c + const``. Hence the exact minimiser

        log π_{t+1} = r·log μ + (1 − r)·log π_t + P(· ≻ π_t)/c + const,

    unique when π_t has full support. Pairs with y = y' contribute a constant.

    Per-token averaging. ``average_log_prob=true`` divides each response's log-ratio by its
    token count before the difference, as TRL's ``loss_type="ipo"`` does (``PairLogps.*_tokens``
    must then be given). The default is the summed form: it is the loss the IPO paper writes
    for sequence log-ratios, the one whose minimiser above is the game dynamics COMAL's
    analysis uses, and the one COMAL's INPO code trains; with averaging, 1/(2c) is a
    per-token margin and c is not comparable with the summed form's. On a tabular game a
    response is one token, and the two forms coincide.
    """

    average_log_prob: bool = param(
        False, help="divide log-ratios by response length (TRL's IPO); default: summed"
    )

    numpy_update = True  # population_update is arithmetic, win_rate and normalise only

    @property
    @abstractmethod
    def ratio(self) -> float:
        """r: the weight of the reference in the baseline (1 − r on the last iterate)."""

    @property
    @abstractmethod
    def coefficient(self) -> float:
        """c: the KL coefficient; the target margin is 1/(2c)."""

    def _scores(self, batch: PairLogps) -> tuple[Tensor, Tensor]:
        """Summed log-ratios of chosen and rejected against the mixed baseline."""
        r = self.ratio
        chosen, rejected = batch.policy_chosen, batch.policy_rejected
        if REFERENCE_LOGPS in self.inputs:
            chosen, rejected = chosen - r * batch.ref_chosen, rejected - r * batch.ref_rejected
        if LAST_ITERATE_LOGPS in self.inputs:
            chosen, rejected = chosen - (1 - r) * batch.last_chosen, rejected - (1 - r) * batch.last_rejected
        return chosen, rejected

    def pair_losses(self, batch: PairLogps) -> LossOutput:
        chosen, rejected = self._scores(batch)
        c = self.coefficient
        if self.average_log_prob:
            if batch.chosen_tokens is None or batch.rejected_tokens is None:
                raise ValueError(
                    f"solver {type(self).__name__}: average_log_prob=true needs PairLogps.chosen_tokens "
                    "and rejected_tokens (response token counts)."
                )
            margin = chosen / batch.chosen_tokens.clamp(min=1) - rejected / batch.rejected_tokens.clamp(min=1)
        else:
            margin = chosen - rejected
        losses = (margin - 1 / (2 * c)) ** 2
        return LossOutput(losses, c * chosen.detach(), c * rejected.detach())

    def log_linear_update(self) -> tuple[float, float, float]:
        """The coefficients of :meth:`population_update`: ``(1 − r, r, 1/c)``."""
        return 1 - self.ratio, self.ratio, 1 / self.coefficient

    def population_update(self, last_logp: Tensor, ref_logp: Tensor, win_rate: WinRateFn) -> Tensor:
        r = self.ratio
        logits = win_rate(last_logp) / self.coefficient
        if r != 0:
            logits = logits + r * ref_logp
        if r != 1:
            logits = logits + (1 - r) * last_logp
        return normalise(logits)


@plugin("solver", "ipo")
@dataclass
class IPO(SquaredMarginSolver):
    """IPO: ``(Δ_θ − Δ_ref − 1/(2τ))²``; the population update is ``π ∝ μ · exp(P(· ≻ π_t)/τ)``.

    τ is TRL's ``beta`` for ``loss_type="ipo"``; rewards are ``τ (ℓ_θ − ℓ_ref)`` (summed), as TRL logs.
    With ``reference=prox`` it equals Iter-IPO.
    """

    tau: float = param(0.1, gt=0.0, help="KL strength τ (TRL's beta); target margin 1/(2τ)")

    inputs = frozenset({REFERENCE_LOGPS})
    strength_field = "tau"

    @property
    def ratio(self) -> float:
        return 1.0

    @property
    def coefficient(self) -> float:
        return self.tau


@plugin("solver", "iter_ipo")
@dataclass
class IterIPO(SquaredMarginSolver):
    """Iter-IPO: IPO against the last iterate, ``(Δ_θ − Δ_t − 1/(2τ))²``.

    Its population update ``π_{t+1} ∝ π_t · exp(P(· ≻ π_t)/τ)`` is multiplicative weights with
    step 1/τ, which cycles on cyclic games (COMAL, Liu et al. 2025, Sec. 5).
    """

    tau: float = param(0.1, gt=0.0, help="KL strength τ toward the last iterate; step size 1/τ")

    inputs = frozenset({LAST_ITERATE_LOGPS})
    strength_field = "tau"

    @property
    def ratio(self) -> float:
        return 0.0

    @property
    def coefficient(self) -> float:
        return self.tau
