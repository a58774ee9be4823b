"""INPO (Zhang et al. 2024, "Iterative Nash Policy Optimization"): COMAL's default subgame solver."""

from __future__ import annotations

from dataclasses import dataclass

from comalkit.registry import param, plugin

from .ipo import SquaredMarginSolver


@plugin("solver", "inpo")
@dataclass
class INPO(SquaredMarginSolver):
    """``(Δ_θ − r·Δ_ref − (1 − r)·Δ_t − 1/(2β))²``, the loss of COMAL's public code (Liu et al. 2025).

    One step of online mirror descent toward the reference μ: the population update (derived
    in :class:`SquaredMarginSolver`) is ``π_{t+1} ∝ μ^r · π_t^{1−r} · exp(P(· ≻ π_t)/β)``, i.e.
    the table's ``π_t^{1−ητ} μ^{ητ} exp(η P)`` with step η = 1/β and KL strength τ = r·β. With a
    fixed μ it converges to the regularised equilibrium π*_τ; with ``reference=prox`` it is COMAL.

    β is the code's ``eta`` (0.002: weak regularisation, target margin 250; 0.1: strong,
    margin 5; the paper's Llama runs use 0.002 in round one and 0.1 after, which
    ``reference.strengths=[0.002,0.1]`` schedules). Rewards are ``β (ℓ_θ − r ℓ_ref − (1 − r) ℓ_t)``.
    """

    beta: float = param(0.1, gt=0.0, help="KL coefficient c (COMAL code's eta); target margin 1/(2·beta)")
    ratio: float = param(1 / 3, ge=0.0, le=1.0, help="r = τ/η: weight of the reference log-ratio")

    needs_reference = True
    needs_last_iterate = True
    strength_field = "beta"

    @property
    def coefficient(self) -> float:
        return self.beta
