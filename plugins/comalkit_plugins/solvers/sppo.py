"""SPPO (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", Eq. 4.7)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from comalkit.interfaces import LAST_ITERATE_LOGPS, WIN_PROBS, LossOutput, PairLogps, WinRateFn
from comalkit.registry import param, plugin

from .base import PairSolver, log_ratio, normalise

_EPS = torch.finfo(torch.float64).eps
_MAX_STEPS = 100


def lambert_w(log_x: Tensor) -> Tensor:
    """The principal branch W(x) for x = exp(log_x) ≥ 0, from log x so that nothing overflows.

    Winitzki's approximation ``W ≈ ℓ(1 − log(1+ℓ)/(2+ℓ))``, ``ℓ = log(1+x)`` (W ≈ x for tiny
    x), then two Halley steps on ``e^v + v = log x`` (v = log W; cubic convergence): relative
    error ≤ 4e-15 against SciPy for x in [e^-700, e^700], with no data-dependent loop.
    """
    log_x = log_x.clamp(min=-700.0)  # W(e^-700) ≈ 1e-304: zero for every purpose here
    ell = F.softplus(log_x)
    v = torch.where(log_x < -30, log_x, (ell * (1 - torch.log1p(ell) / (2 + ell))).log())
    for _ in range(2):
        ev = v.exp()
        f, df = ev + v - log_x, ev + 1
        v = v - 2 * f * df / (2 * df * df - f * ev)
    return v.exp()


@plugin("solver", "sppo")
@dataclass
class SPPO(PairSolver):
    """``(ℓ_θ(y_w) − ℓ_t(y_w) − η(p_w − ½))² + (ℓ_θ(y_l) − ℓ_t(y_l) − η(p_l − ½))²``, η = 1/β.

    ``p = P̂(y ≻ π_t)`` is the soft win probability from ``PairLogps.*_winprob``. The two
    squared errors are summed, as TRL's ``sppo_hard`` does (a ½ in front would be a
    constant factor, same minimiser). Rewards are ``β (ℓ_θ − ℓ_t)``.

    Population update. Over all ordered pairs (y = y' included) weighted
    ``π_t(i) π_t(j) M_ij``, response y appears as chosen with weight ``π_t(y) p(y)`` and as
    rejected with weight ``π_t(y)(1 − p(y))``, so the population loss is the paper's
    ``E_{y~π_t} (log π(y) − a(y))²`` with target ``a = log π_t + η(P(· ≻ π_t) − ½)``.

    That target is not normalised: ``Σ π_t e^{η(p−½)} ≥ 1`` by Jensen (``E_{π_t} p = ½``), so
    the minimiser over the simplex is NOT the multiplicative-weights policy
    ``π ∝ π_t exp(η P)`` that SPPO approximates. Stationarity of
    ``½ Σ π_t(y)(θ_y − logsumexp θ − a_y)²`` in the logits θ gives, with λ ≥ 0,

        log π(y) + λ π(y)/π_t(y) = a(y)   ⇒   π(y) = e^{a(y)} · exp(−W(λ e^{η(p(y)−½)})),

    (W the Lambert function), with the scalar λ fixed by ``Σ_y π(y) = 1``. ``S(λ) = Σ π(y) − 1``
    is decreasing and convex, with ``S'(λ) = −(1/λ) Σ π W/(1+W)``, so Newton from λ = 0
    converges monotonically. At any stationary point every residual ``log π − a`` has the
    sign of −λ ≤ 0, where the loss is strictly convex in π: the minimiser is unique.
    """

    beta: float = param(0.1, gt=0.0, help="KL strength β (TRL's beta); SPPO's step size η = 1/β")

    inputs = frozenset({LAST_ITERATE_LOGPS, WIN_PROBS})
    strength_field = "beta"

    def win_probs(self, batch: PairLogps) -> tuple[Tensor, Tensor]:
        """(p_w, p_l): the soft win probabilities of chosen and rejected."""
        return batch.chosen_winprob, batch.rejected_winprob

    def pair_losses(self, batch: PairLogps) -> LossOutput:
        chosen, rejected = log_ratio(batch, "last")
        eta = 1.0 / self.beta
        p_w, p_l = self.win_probs(batch)
        losses = (chosen - eta * (p_w - 0.5)) ** 2 + (rejected - eta * (p_l - 0.5)) ** 2
        return LossOutput(losses, self.beta * chosen.detach(), self.beta * rejected.detach())

    def population_update(self, last_logp: Tensor, ref_logp: Tensor, win_rate: WinRateFn) -> Tensor:
        shift = (win_rate(last_logp).double() - 0.5) / self.beta  # η(p − ½)
        target = last_logp.double() + shift
        excess = torch.logsumexp(target, -1).expm1()  # S(0) ≥ 0
        # the first Newton step from λ = 0, where S'(0) = −Σ e^{a} e^{η(p−½)}
        log_lam = excess.clamp(min=1e-300).log() - torch.logsumexp(target + shift, -1)
        for _ in range(_MAX_STEPS):
            w = lambert_w(log_lam.unsqueeze(-1) + shift)
            logp = target - w
            s = torch.logsumexp(logp, -1).expm1()
            active = s > 16 * _EPS
            if not bool(active.any()):
                break
            q = (logp.exp() * w / (1 + w)).sum(-1)
            log_lam = torch.where(active, log_lam + torch.log1p(s / q.clamp(min=1e-300)), log_lam)
        return normalise(logp).to(last_logp.dtype)


@plugin("solver", "sppo_hard")
@dataclass
class SPPOHard(SPPO):
    """SPPO with hard probabilities p_w = 1, p_l = 0: TRL's ``loss_type="sppo_hard"``.

    ``(ℓ_θ(y_w) − ℓ_t(y_w) − 1/(2β))² + (ℓ_θ(y_l) − ℓ_t(y_l) + 1/(2β))²``. Its population
    update equals soft SPPO's: y is chosen with probability ``p(y)``, and
    ``p(u − η/2)² + (1 − p)(u + η/2)² = (u − η(p − ½))² + const``.
    """

    inputs = frozenset({LAST_ITERATE_LOGPS})

    def win_probs(self, batch: PairLogps) -> tuple[Tensor, Tensor]:
        one = torch.ones_like(batch.policy_chosen)
        return one, one - 1
