"""INPO (Zhang et al. 2024, "Iterative Nash Policy Optimization"): COMAL's default subgame solver."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from comalkit.interfaces import LAST_ITERATE_LOGPS, REFERENCE_LOGPS
from comalkit.registry import param, plugin

from .ipo import SquaredMarginSolver

log = logging.getLogger("comalkit")


@plugin("solver", "inpo")
@dataclass
class INPO(SquaredMarginSolver):
    """``(Δ_θ − r·Δ_ref − (1 − r)·Δ_t − 1/(2β))²``, the loss of COMAL's public code (Liu et al. 2025).

    One step of online mirror descent toward the reference μ: the population update (derived
    in :class:`SquaredMarginSolver`) is ``π_{t+1} ∝ μ^r · π_t^{1−r} · exp(P(· ≻ π_t)/β)``, i.e.
    the table's ``π_t^{1−ητ} μ^{ητ} exp(η P)`` with step η = 1/β and KL strength τ = r·β. With a
    fixed μ it converges to the regularised equilibrium π*_τ; with ``reference=prox`` and a
    period of several iterations it is COMAL. With μ = π_t at every iteration
    (``reference.period=1``) the two baselines coincide and the loss is Iter-IPO's
    ``(Δ_θ − Δ_t − 1/(2β))²``, the method COMAL's paper shows cycling (Sec. 5); the online task
    warns then (:func:`warn_if_iterated_ipo`, tests/test_inpo_iter_ipo.py).

    β is the code's ``eta``: 0.002 is weak regularisation (target margin 250), 0.1 strong
    (margin 5). COMAL's public code (``comal.sh``, Qwen2-1.5B) keeps ``eta=0.002`` in every
    round; the paper's later version (arXiv 2410.23223v2, the Llama-3-8B-Instruct and
    Qwen2.5-7B runs) uses 0.002 in round one and 0.1 after, which
    ``reference.strengths=[0.002,0.1]`` schedules. docs/online.md compares these with
    comalkit's defaults. Rewards are ``β (ℓ_θ − r ℓ_ref − (1 − r) ℓ_t)``.
    """

    beta: float = param(0.1, gt=0.0, help="KL coefficient c (COMAL code's eta); target margin 1/(2·beta)")
    ratio: float = param(1 / 3, ge=0.0, le=1.0, help="r = τ/η: weight of the reference log-ratio")

    inputs = frozenset({REFERENCE_LOGPS, LAST_ITERATE_LOGPS})
    strength_field = "beta"

    @property
    def coefficient(self) -> float:
        return self.beta


def warn_if_iterated_ipo(solver: Any, reference: Any) -> bool:
    """Warn when INPO's reference moves to the policy after every iteration: that is Iter-IPO."""
    from ..references.updaters import ProxReference

    if not (isinstance(solver, INPO) and isinstance(reference, ProxReference) and reference.period == 1):
        return False
    log.warning(
        "solver=inpo with reference.period=1 moves μ to the policy after every iteration, so μ = π_t and "
        "INPO's loss is Iter-IPO's (Δ_θ − Δ_t − 1/(2β))², the method COMAL's paper shows cycling. "
        "COMAL keeps μ fixed for several iterations: use reference.period >= 2 (see docs/online.md)."
    )
    return True
