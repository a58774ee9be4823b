"""DPO (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7): the sigmoid loss.

With ``reference=prox`` (μ ← π after every iteration) it is Iter-DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from comalkit.interfaces import REFERENCE_LOGPS, LossOutput, PairLogps, WinRateFn
from comalkit.registry import param, plugin

from .base import PairSolver, log_ratio, normalise, preference_matrix

_MAX_NEWTON_STEPS = 200
_STEP_TOL = 1e-10  # relative; once steps are this small, Newton's remaining error is ~ their square
_MAX_HALVINGS = 40


def newton_step(grad: Tensor, hess: Tensor) -> Tensor:
    """Solve ``H δ = −g`` for a Hessian whose rows sum to zero (the loss ignores a shift of θ).

    Jacobi scaling makes the solve insensitive to responses π_t barely samples (curvature
    ∝ π_t(y)); the scaled null vector √diag(H) is fixed by a rank-one term, ``g ⟂ 1`` keeps
    the step exact. Responses whose curvature underflowed are not constrained by the loss
    and keep their logit (δ_y = 0).
    """
    d = hess.diagonal(dim1=-2, dim2=-1)
    live = d > 1e-200 * d.amax(-1, keepdim=True)
    scale = torch.where(live, d, 1.0).rsqrt()
    null = torch.where(live, d, 0.0).sqrt()
    null = null / null.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    eye = torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)
    scaled = scale.unsqueeze(-1) * hess * scale.unsqueeze(-2) + null.unsqueeze(-1) * null.unsqueeze(-2)
    scaled = scaled + torch.diag_embed((~live).to(d.dtype)) + 1e-14 * eye
    rhs = torch.where(live, -grad * scale, 0.0)
    return scale * torch.linalg.solve(scaled, rhs.unsqueeze(-1)).squeeze(-1)


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
    policy is the iterate where the loss's curvature underflows (numerically the limit).
    Responses that π_t never samples (π_t(y) underflowed) are not seen by the loss and keep
    their reference log-ratio.
    """

    beta: float = param(0.1, gt=0.0, help="KL strength β (TRL's beta); the loss is -log σ(β(Δ_θ − Δ_ref))")

    inputs = frozenset({REFERENCE_LOGPS})
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
        value, previous = self._value(theta, ref, w), torch.inf
        for _ in range(_MAX_NEWTON_STEPS):
            grad, hess = self._grad_hess(theta, ref, w)
            new, value = self._line_search(theta, value, newton_step(grad, hess), grad, ref, w)
            moved, theta = float((new - theta).abs().max()), new
            scale = 1 + float(theta.abs().max())
            # converged, or at the rounding floor (steps stopped shrinking once tiny)
            if moved <= _STEP_TOL * scale or (moved < 1e-6 * scale and moved > previous / 2):
                break
            previous = moved
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

    def _line_search(
        self, theta: Tensor, value: Tensor, step: Tensor, grad: Tensor, ref: Tensor, w: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per game, the largest step 2^-k satisfying Armijo's condition; the new θ and its loss.

        Once the predicted decrease (the Newton decrement) is near the loss's rounding error,
        Armijo's test is noise; there Newton's full step is the right one (quadratic convergence).
        """
        slope = (grad * step).sum(-1)
        force = -slope <= 1e-10 * (1 + value.abs())
        t, settled, new_value = torch.ones_like(value), torch.zeros_like(force), value
        for _ in range(_MAX_HALVINGS):
            trial = self._value(theta + t.unsqueeze(-1) * step, ref, w)
            accept = ~settled & (force | (trial <= value + 1e-4 * t * slope))
            new_value, settled = torch.where(accept, trial, new_value), settled | accept
            if bool(settled.all()):
                break
            t = torch.where(settled, t, t / 2)
        t = torch.where(settled, t, 0.0)
        return theta + t.unsqueeze(-1) * step, new_value
