"""What the built-in solvers share: batch checks, the strength hook, and tabular helpers.

A solver here is two views of one objective (see ``docs/solvers.md``): :meth:`loss` on
sampled pairs, which trains a language model, and :meth:`population_update`, the exact
minimiser of the same loss when pairs are drawn as ``(y, y') ~ π_t ⊗ π_t`` with the winner
drawn from ``P``. ``tests/test_solver_bridge.py`` checks that the two agree.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from comalkit.games import normalise_numpy
from comalkit.interfaces import INPUT_FIELDS, LossOutput, PairLogps, SubgameSolver, WinRateFn
from comalkit.registry import ConfigError

#: exp(-1e4) underflows to exactly 0 in every float dtype: a log-policy that is an exact one-hot.
_LOG_ZERO = -1e4


def normalise(logits: Tensor) -> Tensor:
    """Log-probabilities from unnormalised log-weights over the last dimension.

    A numpy array is normalised with numpy: solvers with ``numpy_update`` run small games on
    the game engine's numpy path (``comalkit.games.run_dynamics``).
    """
    if isinstance(logits, np.ndarray):
        return normalise_numpy(logits)
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def preference_matrix(win_rate: WinRateFn, like: Tensor) -> Tensor:
    """Recover ``M[..., i, j] = P(y_i ≻ y_j)`` from ``win_rate`` (shape and dtype of ``like``).

    ``P(y ≻ π) = Σ_j π(y_j) P(y ≻ y_j)`` is linear in π, so its value at the point mass on
    ``y_j`` is column ``j`` of the matrix. Only losses that depend on the full matrix (DPO)
    need this; the closed-form updates use ``win_rate`` directly.
    """
    n = like.shape[-1]
    log_one_hot = torch.full((n, n), _LOG_ZERO, dtype=like.dtype, device=like.device).fill_diagonal_(0.0)
    columns = [win_rate(log_one_hot[j].expand_as(like)) for j in range(n)]
    return torch.stack(columns, dim=-1)


class NamedStrength(SubgameSolver):
    """A solver whose per-round KL strength is one of its fields (``strength_field``).

    ``None`` for methods without a KL term: a scheduled strength is then an error.
    """

    strength_field: ClassVar[str | None] = None

    def set_strength(self, value: float) -> None:
        name = type(self).__name__
        if self.strength_field is None:
            raise ConfigError(f"solver {name} has no KL strength; remove reference.strengths for it.")
        if not value > 0:
            raise ConfigError(f"solver {name}: KL strength {self.strength_field}={value!r} must be > 0.")
        setattr(self, self.strength_field, float(value))


class PairSolver(NamedStrength):
    """Base of the built-in language-model solvers: checks a batch against the declared ``inputs``.

    Subclasses implement :meth:`pair_losses` and name their strength in ``strength_field``.
    """

    def loss(self, batch: PairLogps) -> LossOutput:
        self.check_batch(batch)
        return self.pair_losses(batch)

    @abstractmethod
    def pair_losses(self, batch: PairLogps) -> LossOutput:
        """Per-pair losses for a batch already checked by :meth:`check_batch`."""

    def check_batch(self, batch: PairLogps) -> None:
        """Raise ``ValueError`` naming the missing or mis-shaped field of ``batch``."""
        name = type(self).__name__
        shape = batch.policy_chosen.shape
        required = {"policy_chosen", "policy_rejected"}
        for name in self.inputs:
            required |= set(INPUT_FIELDS[name])
        for field in sorted(required):
            if getattr(batch, field) is None:
                raise ValueError(f"solver {name} needs PairLogps.{field}, which is None.")
        for field in (*sorted(required), "weight", "chosen_tokens", "rejected_tokens"):
            value = getattr(batch, field)
            if value is not None and value.shape != shape:
                raise ValueError(
                    f"solver {name}: PairLogps.{field} has shape {tuple(value.shape)}, "
                    f"expected {tuple(shape)} like policy_chosen."
                )
        if batch.weight is not None and bool((batch.weight < 0).any()):
            raise ValueError(f"solver {name}: PairLogps.weight has negative entries.")


def log_ratio(batch: PairLogps, base: str) -> tuple[Tensor, Tensor]:
    """``(ℓ_θ(y_w) − ℓ_base(y_w), ℓ_θ(y_l) − ℓ_base(y_l))`` with ``base`` one of ``ref``, ``last``."""
    return (
        batch.policy_chosen - getattr(batch, f"{base}_chosen"),
        batch.policy_rejected - getattr(batch, f"{base}_rejected"),
    )
