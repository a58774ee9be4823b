"""Exact-game solvers: updates that need ``P(y ≻ π)`` for every response, not sampled pairs.

They subclass :class:`comalkit.interfaces.GameOnlySolver`: the language-model tasks reject them
when the config is built, and ``task=synthetic`` runs them through ``population_update``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from comalkit.interfaces import GameOnlySolver, WinRateFn
from comalkit.registry import ConfigError, param, plugin

from .base import NamedStrength, normalise


@plugin("solver", "nash_md")
@dataclass
class NashMD(NamedStrength, GameOnlySolver):
    """Nash-MD (Munos et al. 2023, "Nash Learning from Human Feedback").

    ``π^μ_t ∝ π_t^{1−ητ} μ^{ητ}`` (the geometric mixture with the reference), then
    ``π_{t+1} ∝ π^μ_t · exp(η P(· ≻ π^μ_t))``: mirror descent against the mixture's win rates.
    With a fixed μ and step η its last iterate converges to the solution of
    ``π ∝ μ exp(P(· ≻ π^μ)/τ)``, which is within O(η) of the regularised equilibrium π*_τ
    (exactly π*_τ as η → 0, the regime of the paper's guarantee). Needs ητ ≤ 1.
    """

    eta: float = param(1.0, gt=0.0, help="step size η")
    tau: float = param(0.1, gt=0.0, help="KL strength τ toward the reference (ητ ≤ 1)")

    strength_field = "tau"
    numpy_update = True

    def __post_init__(self) -> None:
        self._check_mixture()

    def set_strength(self, value: float) -> None:
        super().set_strength(value)
        self._check_mixture()

    def _check_mixture(self) -> None:
        if self.eta * self.tau > 1:
            raise ConfigError(
                f"solver.eta * solver.tau = {self.eta}*{self.tau} = {self.eta * self.tau}: Nash-MD needs "
                "ητ ≤ 1 (the exponent of π_t in the mixture π_t^(1-ητ) μ^(ητ) must be ≥ 0)."
            )

    def population_update(self, last_logp: Tensor, ref_logp: Tensor, win_rate: WinRateFn) -> Tensor:
        mix = normalise((1 - self.eta * self.tau) * last_logp + self.eta * self.tau * ref_logp)
        return normalise(mix + self.eta * win_rate(mix))


@plugin("solver", "extragradient")
@dataclass
class Extragradient(NamedStrength, GameOnlySolver):
    """Extragradient / mirror-prox with the entropy mirror map (Korpelevich 1976; Nemirovski 2004).

    ``π_{t+½} ∝ π_t exp(η P(· ≻ π_t))``, then ``π_{t+1} ∝ π_t exp(η P(· ≻ π_{t+½}))``: the
    look-ahead makes the last iterate converge to π* on the unregularised game, without a
    reference or a KL strength.
    """

    eta: float = param(0.5, gt=0.0, help="step size η")

    numpy_update = True

    def population_update(self, last_logp: Tensor, ref_logp: Tensor, win_rate: WinRateFn) -> Tensor:
        half = normalise(last_logp + self.eta * win_rate(last_logp))
        return normalise(last_logp + self.eta * win_rate(half))
