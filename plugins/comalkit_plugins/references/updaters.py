"""The four reference updaters. They see only snapshots (dicts of tensors), so the same code
drives a LoRA adapter, a full model and a tabular policy."""

from __future__ import annotations

from dataclasses import dataclass

from comalkit.interfaces import ReferenceUpdater, Snapshot
from comalkit.registry import ConfigError, param, plugin


def copy_snapshot(snapshot: Snapshot) -> Snapshot:
    return {k: v.detach().clone() for k, v in snapshot.items()}


@plugin("reference", "fixed")
@dataclass
class FixedReference(ReferenceUpdater):
    """μ never moves: DPO, INPO and Nash-MD, which converge to the regularised equilibrium π*_τ."""

    def update(self, reference: Snapshot, policy: Snapshot, iteration: int) -> Snapshot | None:
        return None


@plugin("reference", "prox")
@dataclass
class ProxReference(ReferenceUpdater):
    """COMAL's prox-point step: μ ← π after every subgame of ``period`` iterations.

    Each round solves one KL-regularised subgame around a fixed μ with ``period`` solver
    iterations (Liu et al. 2025, COMAL, Algorithm 1); the default 2 gives the default online
    run two rounds of two iterations (docs/online.md). ``period=1`` moves μ after every
    iteration, which with INPO is Iter-IPO. ``strengths`` optionally schedules the KL strength
    per outer round (the last value repeats), e.g. ``[0.002, 0.1]`` as in the paper's Llama runs.
    """

    period: int = param(2, ge=1, help="iterations per subgame (outer round); 1 with INPO is Iter-IPO")
    strengths: list[float] = param(
        default_factory=list, help="per-round KL strength schedule; empty: the solver's own"
    )

    def __post_init__(self) -> None:
        if any(s <= 0 for s in self.strengths):
            raise ConfigError(f"reference.strengths={self.strengths}: every strength must be > 0")

    def update(self, reference: Snapshot, policy: Snapshot, iteration: int) -> Snapshot | None:
        return copy_snapshot(policy) if (iteration + 1) % self.period == 0 else None

    def round_of(self, iteration: int) -> int:
        return iteration // self.period

    def strength(self, round_index: int) -> float | None:
        if not self.strengths:
            return None
        return self.strengths[min(round_index, len(self.strengths) - 1)]


@plugin("reference", "magnet")
@dataclass
class MagnetReference(ProxReference):
    """MPO's magnet reset: the magnet (reference) jumps to the current policy every ``period`` iterations.

    The same move as ``prox``; it differs in intent (MPO runs many mirror-descent steps
    toward one magnet) and so in its default period.
    """

    period: int = param(10, ge=1, help="iterations between magnet resets")


@plugin("reference", "ema")
@dataclass
class EmaReference(ReferenceUpdater):
    """TR-DPO's soft update: μ ← (1 − α)·μ + α·π (in parameter space) every ``period`` iterations."""

    alpha: float = param(0.5, gt=0.0, le=1.0, help="weight of the current policy")
    period: int = param(1, ge=1, help="iterations between soft updates")

    def update(self, reference: Snapshot, policy: Snapshot, iteration: int) -> Snapshot | None:
        if (iteration + 1) % self.period:
            return None
        return {k: reference[k].lerp(policy[k].to(reference[k].dtype), self.alpha) for k in reference}
