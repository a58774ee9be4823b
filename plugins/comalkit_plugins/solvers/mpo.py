"""MPO (Wang et al. 2024, "Magnetic Preference Optimization"): magnetic mirror descent, magnet = reference."""

from __future__ import annotations

from dataclasses import dataclass

from comalkit.interfaces import LAST_ITERATE_LOGPS, REFERENCE_LOGPS
from comalkit.registry import param, plugin

from .ipo import SquaredMarginSolver


@plugin("solver", "mpo")
@dataclass
class MPO(SquaredMarginSolver):
    """One magnetic-mirror-descent step as a pairwise squared loss.

    The MMD step with magnet ρ (the reference), step size η and magnet strength α is

        π_{t+1} ∝ [π_t · ρ^{ηα} · exp(η P(· ≻ π_t))]^{1/(1+ηα)},

    i.e. ``log π_{t+1} = r log ρ + (1 − r) log π_t + P(· ≻ π_t)/c`` with
    ``r = ηα/(1+ηα)`` and ``c = (1+ηα)/η``. By :class:`SquaredMarginSolver`'s derivation this
    is the exact population minimiser of ``(Δ_θ − r·Δ_ρ − (1 − r)·Δ_t − 1/(2c))²``, which is
    the loss used here. (MPO's paper trains with a policy-gradient estimator of the same
    step; this regression form needs only preference pairs.) It converges to π*_α for a
    fixed magnet, and to π* when ``reference=magnet`` periodically resets ρ to the policy.
    """

    eta: float = param(1.0, gt=0.0, help="mirror-descent step size η")
    alpha: float = param(0.1, gt=0.0, help="magnet strength α (the KL strength toward the magnet)")

    inputs = frozenset({REFERENCE_LOGPS, LAST_ITERATE_LOGPS})
    strength_field = "alpha"

    @property
    def ratio(self) -> float:
        return self.eta * self.alpha / (1 + self.eta * self.alpha)

    @property
    def coefficient(self) -> float:
        return (1 + self.eta * self.alpha) / self.eta
