"""The contracts between the COMAL meta-loop and its plugins.

The loop never imports a plugin by name: it builds them from config through the registry
and talks to them only through these classes. They are deliberately small, and none of
them assumes text where it need not, so that the same solver and reference updater drive
both a language model and a tabular policy on an exact matrix game.

Conventions: log-probabilities are natural-log; a "snapshot" is a ``dict[str, Tensor]``
of parameters (a LoRA adapter's state dict, a full model's, or ``{"logits": ...}`` for a
tabular policy), so reference updaters can copy, keep or average them without knowing
which policy they belong to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

Snapshot = dict[str, Tensor]
#: Maps log π (shape [..., n]) to the win rates P(y ≻ π) of every response y (shape [..., n]).
WinRateFn = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------
@dataclass
class PairLogps:
    """Summed response log-probs for a batch of preference pairs; every tensor has shape [B].

    ``last_*`` are under the last iterate π_t and ``ref_*`` under the reference μ (both frozen,
    precomputed). ``*_winprob`` is P̂(y ≻ π_t), needed by SPPO-style solvers. ``*_tokens``
    count response tokens, for losses that average log-probs per token (TRL's IPO).
    ``weight`` weighs pairs (exact expectations on tabular games); ``None`` means uniform.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    last_chosen: Tensor | None = None
    last_rejected: Tensor | None = None
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_winprob: Tensor | None = None
    rejected_winprob: Tensor | None = None
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None
    weight: Tensor | None = None


@dataclass
class LossOutput:
    """Per-pair losses and the implicit rewards TRL logs as ``rewards/chosen`` etc."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    def mean(self, weight: Tensor | None = None) -> Tensor:
        if weight is None:
            return self.losses.mean()
        return (self.losses * weight).sum() / weight.sum()


class SubgameSolver(ABC):
    """Approximately solves one KL-regularised subgame around a reference policy.

    A solver is a loss over tensors (:meth:`loss`), identical for a language model and for a
    tabular softmax policy, plus the exact population update that minimising that loss with
    exact expectations produces (:meth:`population_update`), the fast path on matrix games.
    """

    #: which precomputed inputs :meth:`loss` reads; the loop computes only these
    needs_reference: bool = True
    needs_last_iterate: bool = False
    needs_win_probs: bool = False
    #: False for game-only methods (extragradient, Nash-MD) whose update needs exact expectations
    language_model: bool = True
    #: True when :meth:`population_update` also works on numpy arrays (arithmetic, ``win_rate``
    #: and ``normalise`` only): the game engine then runs small CPU games on numpy
    numpy_update: bool = False

    @abstractmethod
    def loss(self, batch: PairLogps) -> LossOutput:
        """Per-pair losses for a batch of (chosen, rejected) log-probs."""

    @abstractmethod
    def population_update(self, last_logp: Tensor, ref_logp: Tensor, win_rate: WinRateFn) -> Tensor:
        """log π_{k+1} from log π_k (``last_logp``) and log μ on a finite response set.

        Shapes are [..., n] (a batch of games); the result is normalised over the last dim.
        """

    def set_strength(self, value: float) -> None:  # noqa: B027 - optional hook
        """Set the KL-regularisation strength for a round (a per-round schedule); default: ignore."""

    def log_linear_update(self) -> tuple[float, float, float] | None:
        """``(a, b, c)`` when :meth:`population_update` is ``normalise(a·log π + b·log μ + c·P(· ≻ π))``,
        so that the game engine can fuse it into fewer array operations; None (default) otherwise."""
        return None


# ---------------------------------------------------------------------------------------------
# Reference updaters
# ---------------------------------------------------------------------------------------------
class ReferenceUpdater(ABC):
    """Decides the reference policy μ of the next subgame: the "meta" in COMAL.

    ``fixed`` keeps μ (DPO, INPO), ``prox`` moves μ to the current policy after each
    subgame (COMAL), ``magnet`` resets MPO's magnet, ``ema`` blends (TR-DPO).
    """

    @abstractmethod
    def update(self, reference: Snapshot, policy: Snapshot, iteration: int) -> Snapshot | None:
        """Called after iteration ``iteration`` (0-based); return the new reference, or ``None`` to keep it."""

    def strength(self, round_index: int) -> float | None:
        """The regularisation strength for outer round ``round_index``, or ``None`` for the solver's own."""
        return None

    def round_of(self, iteration: int) -> int:
        """The outer round that iteration ``iteration`` belongs to (default: one round)."""
        return 0


# ---------------------------------------------------------------------------------------------
# Preference oracles
# ---------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One question to an oracle: is ``a`` better than ``b`` as an answer to ``prompt``?"""

    prompt: str
    a: str
    b: str


class PreferenceOracle(ABC):
    """Soft preferences P(a ≻ b | x) for batches of comparisons.

    Implementations override :meth:`compare`; :meth:`win_matrix` derives the K×K matrix for K
    candidates and enforces ``P[i][j] + P[j][i] = 1`` and ``P[i][i] = ½``.
    """

    @abstractmethod
    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        """P(a ≻ b | prompt) for each comparison, shape [len(comparisons)]."""

    def identity(self) -> str:
        """A stable string naming this oracle and its settings (the cache key's prefix)."""
        return repr(self)

    def win_matrix(self, prompt: str, candidates: Sequence[str]) -> Tensor:
        """The K×K matrix ``M[i][j] = P(candidates[i] ≻ candidates[j] | prompt)``."""
        k = len(candidates)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        probs = (
            self.compare([Comparison(prompt, candidates[i], candidates[j]) for i, j in pairs])
            if pairs
            else []
        )
        m = torch.full((k, k), 0.5, dtype=torch.float64)
        for (i, j), p in zip(pairs, probs):
            m[i, j] = float(p)
            m[j, i] = 1.0 - float(p)
        return m

    def diagnostics(self) -> dict[str, Any]:
        """Oracle-specific counters (position consistency, failures, throughput); default: none."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release models, connections and caches."""


# ---------------------------------------------------------------------------------------------
# Tasks (what ``python -m comalkit`` runs)
# ---------------------------------------------------------------------------------------------
class Task(ABC):
    """A runnable job selected by ``task=<name>`` (usually through ``experiment=<name>``)."""

    #: True if rerunning into the same directory continues the run (metrics.jsonl is kept)
    resumable: bool = False

    @abstractmethod
    def run(self, cfg: Any, run: RunContext) -> dict[str, Any]:
        """Do the work; return the final metrics that go into ``summary.json``."""


class RunContext(ABC):
    """What a task may touch of its run: the output directory and the metric sinks."""

    out_dir: Path

    @abstractmethod
    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record one step's metrics (``metrics.jsonl`` and any configured logger)."""


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------
class Sampler(ABC):
    """Draws responses from a language-model policy (``sampler=hf`` or ``sampler=vllm``).

    Every sampler applies the policy's chat template and prompt truncation, stops at its
    end-of-turn token and decodes without special tokens, so whatever consumes the responses
    (judging, pairing, log-probs) cannot tell which sampler produced them (docs/sampling.md).
    """

    @abstractmethod
    def sample(
        self,
        policy: Any,
        prompts: Sequence[Any],
        n: int,
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        snapshot: Snapshot | None = None,
        progress: str | None = None,
    ) -> list[list[str]]:
        """``n`` responses per prompt from ``policy`` (under ``snapshot`` if given): ``result[i][j]``.

        ``temperature=0`` decodes greedily; ``progress`` names a progress bar (terminal only).
        """

    def sleep(self) -> None:  # noqa: B027 - optional hook
        """Free the device for training (vLLM's sleep mode); the next :meth:`sample` wakes it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engines and temporary files; the sampler may be used again afterwards."""
