"""DPO (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7): the sigmoid loss.

With ``reference=prox`` (μ ← π after every iteration) it is Iter-DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from comalkit.interfaces import LossOutput, PairLogps, WinRateFn
from comalkit.registry import param, plugin

from .base import PairSolver, log_ratio, normalise, preference_matrix

_MAX_NEWTON_STEPS = 200
_STEP_TOL = 1e-13  # relative; Newton's step bounds the remaining error near the optimum
_BACKTRACK = 0.5 ** torch.arange(40, dtype=torch.float64)  # step sizes tried by the line search


@plugin("solver", "dpo")
@dataclass
class DPO(PairSolver):
    """``−log σ(β (Δ_θ − Δ_ref))`` per pair; implicit rewards ``β (ℓ_θ − ℓ_ref)`` as in TRL.

    Population update. With pairs ``(i, j) ~ π_t ⊗ π_t`` and ``i`` the winner with
    probability ``M_ij``, the loss on a tabular policy with logits θ is

        L(θ) = Σ_ij w_ij · softplus(−β (θ_i − θ_j − log μ_i + log μ_j)),   w_ij = π_t(i) π_t(j) M_ij,

    a convex function of θ (it depends only on differences of logits, through a convex
    function of each). Its stationarity condition ``Σ_j w_ij σ(−x_ij) = Σ_j w_ji σ(x_ij)``
    has no closed form unless P is Bradley–Terry (then π ∝ μ exp(r/β)), so the update is
    computed by damped Newton steps (Armijo backtracking) from θ = log μ, in float64. The
    minimiser is finite when every response beats every other with probability in (0, 1)
    (more generally, when the "sometimes beats" graph is strongly connected); on a strictly
    transitive 0/1 matrix DPO's logits diverge, a known property of DPO, and the returned
    policy is the iterate after the step budget.
    """

    beta: float = param(0.1, gt=0.0, help="KL strength β (TRL's beta); the loss is -log σ(β(Δ_θ − Δ_ref))")

    needs_reference = True
    strength_field = "beta"

    def pair_losses(self, batch: PairLogps) -> LossOutput:
        chosen, rejected = log_ratio(batch, "ref")
        losses = -F.logsigmoid(self.beta * (chosen - rejected))
        return LossOutput(losses, self.beta * chosen.detach(), self.beta * rejected.detach())

    def population_update(self, last_logp: Tensor, ref_logp: Tensor, win_rate: WinRateFn) -> Tensor:
        m = preference_matrix(win_rate, last_logp).double()
        pi_t = last_logp.double().softmax(-1)
        w = pi_t.unsqueeze(-1) * pi_t.unsqueeze(-2) * m
        ref = ref_logp.double()
        theta = ref.clone()
        for _ in range(_MAX_NEWTON_STEPS):
            grad, hess = self._grad_hess(theta, ref, w)
            gauge = torch.full_like(hess, 1.0 / theta.shape[-1])  # fixes the free shift θ + c: step ⟂ 1
            step = -torch.linalg.solve(hess + gauge, grad.unsqueeze(-1)).squeeze(-1)
            new = self._line_search(theta, step, grad, ref, w)
            moved = (new - theta).abs().max()
            theta = new
            if moved <= _STEP_TOL * (1 + theta.abs().max()):
                break
        return normalise(theta).to(last_logp.dtype)

    def _margins(self, theta: Tensor, ref: Tensor) -> Tensor:
        """``x_ij = β (θ_i − θ_j − log μ_i + log μ_j)`` over the last two dims."""
        g = theta - ref
        return self.beta * (g.unsqueeze(-1) - g.unsqueeze(-2))

    def _value(self, theta: Tensor, ref: Tensor, w: Tensor) -> Tensor:
        return (w * F.softplus(-self._margins(theta, ref))).sum((-1, -2))

    def _grad_hess(self, theta: Tensor, ref: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(self._margins(theta, ref))
        grad = self.beta * (w.transpose(-1, -2) * s - w * (1 - s)).sum(-1)
        a = (w + w.transpose(-1, -2)) * s * (1 - s)
        hess = self.beta**2 * (torch.diag_embed(a.sum(-1)) - a)
        return grad, hess

    def _line_search(self, theta: Tensor, step: Tensor, grad: Tensor, ref: Tensor, w: Tensor) -> Tensor:
        """Per game, the largest step 2^-k satisfying Armijo's condition; the full step near the optimum.

        Once the predicted decrease (the Newton decrement) is near the loss's rounding error,
        Armijo's test is noise; there Newton's full step is the right one (quadratic convergence).
        """
        t = _BACKTRACK.to(theta.device)
        candidates = theta.unsqueeze(-2) + t[:, None] * step.unsqueeze(-2)  # [..., K, n]
        values = self._value(candidates, ref.unsqueeze(-2), w.unsqueeze(-3))
        value = self._value(theta, ref, w)
        slope = (grad * step).sum(-1)
        ok = values <= value.unsqueeze(-1) + 1e-4 * t * slope.unsqueeze(-1)
        first = ok.double().argmax(-1)
        chosen = torch.where(ok.any(-1), t[first], 0.0)
        chosen = torch.where(-slope <= 1e-10 * (1 + value.abs()), 1.0, chosen)
        return theta + chosen.unsqueeze(-1) * step
