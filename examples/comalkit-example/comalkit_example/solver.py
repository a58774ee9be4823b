"""``solver=cdpo``: conservative DPO, the DPO loss with label smoothing for noisy preferences.

Mitchell (2023), "A note on DPO with noisy preferences and relationship to IPO": if each
label is flipped with probability ε, train on the expected loss under that noise,

    loss = −(1 − ε) log σ(β h) − ε log σ(−β h),    h = Δ_θ − Δ_ref,

which is TRL's ``loss_type="sigmoid"`` with ``label_smoothing=ε``; ε = 0 is DPO (Rafailov et
al. 2023, Eq. 7).

Population update. With pairs ``(i, j) ~ π_t ⊗ π_t`` and ``i`` the winner with probability
``M_ij``, the ε-term of pair (i, j) is the DPO term of the swapped pair (j, i). Summing over
ordered pairs, the expected cDPO loss is the expected DPO loss on the smoothed game

    M'_ij = (1 − ε) M_ij + ε M_ji = (1 − 2ε) M_ij + ε,

whose win rates are ``P'(y ≻ π) = (1 − 2ε) P(y ≻ π) + ε`` (π sums to 1). So the exact update
is DPO's (a convex minimisation solved by Newton's method, built-in ``solver=dpo``) on M'.
Every entry of M' lies in [ε, 1 − ε]: for ε > 0 the minimiser is always finite, even on a
strictly transitive 0/1 game where DPO's logits diverge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from comalkit_plugins.solvers.dpo import DPO
from torch import Tensor

from comalkit.interfaces import REFERENCE_LOGPS, LossOutput, PairLogps, SubgameSolver, WinRateFn
from comalkit.registry import ConfigError, param, plugin


@plugin("solver", "cdpo")
@dataclass
class ConservativeDPO(SubgameSolver):
    """``−(1−ε) log σ(β h) − ε log σ(−β h)`` per pair; rewards ``β (ℓ_θ − ℓ_ref)`` as in TRL."""

    beta: float = param(0.1, gt=0.0, help="KL strength β (TRL's beta)")
    epsilon: float = param(
        0.1, ge=0.0, lt=0.5, help="assumed label-flip rate ε (TRL's label_smoothing); 0 is plain DPO"
    )

    inputs = frozenset({REFERENCE_LOGPS})  # the loop precomputes reference log-probs, and only those

    def loss(self, batch: PairLogps) -> LossOutput:
        if batch.ref_chosen is None or batch.ref_rejected is None:
            raise ValueError(
                "solver ConservativeDPO needs PairLogps.ref_chosen and ref_rejected, which are None."
            )
        chosen = batch.policy_chosen - batch.ref_chosen
        rejected = batch.policy_rejected - batch.ref_rejected
        h = self.beta * (chosen - rejected)
        losses = -(1 - self.epsilon) * F.logsigmoid(h) - self.epsilon * F.logsigmoid(-h)
        return LossOutput(losses, self.beta * chosen.detach(), self.beta * rejected.detach())

    def population_update(self, last_logp: Tensor, ref_logp: Tensor, win_rate: WinRateFn) -> Tensor:
        eps = self.epsilon

        def smoothed(logp: Tensor) -> Tensor:
            return (1 - 2 * eps) * win_rate(logp) + eps

        return DPO(beta=self.beta).population_update(last_logp, ref_logp, smoothed)

    def set_strength(self, value: float) -> None:
        """A per-round KL schedule (``reference.strengths``) sets β."""
        if not value > 0:
            raise ConfigError(f"solver ConservativeDPO: KL strength beta={value!r} must be > 0.")
        self.beta = float(value)
