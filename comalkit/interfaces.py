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

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import Tensor

from comalkit.registry import ConfigError

if TYPE_CHECKING:
    from comalkit.games import GameBatch
    from comalkit.pairing import PairRecords

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


#: The inputs a solver's loss may read besides the policy's own log-probs (``SubgameSolver.inputs``);
#: the loop computes only those a solver declares. Frozen log-probs under the last iterate π_t:
LAST_ITERATE_LOGPS = "last_iterate_logps"
#: frozen log-probs under the reference μ
REFERENCE_LOGPS = "reference_logps"
#: P̂(y ≻ π_t) of chosen and rejected, which the pair builder must provide (SPPO)
WIN_PROBS = "win_probs"
#: the :class:`PairLogps` fields (and pair-record keys) each input fills, in the order they are computed
INPUT_FIELDS: dict[str, tuple[str, str]] = {
    LAST_ITERATE_LOGPS: ("last_chosen", "last_rejected"),
    REFERENCE_LOGPS: ("ref_chosen", "ref_rejected"),
    WIN_PROBS: ("chosen_winprob", "rejected_winprob"),
}


class SubgameSolver(ABC):
    """Approximately solves one KL-regularised subgame around a reference policy.

    A solver is a loss over tensors (:meth:`loss`), identical for a language model and for a
    tabular softmax policy, plus the exact population update that minimising that loss with
    exact expectations produces (:meth:`population_update`), the fast path on matrix games.
    A solver whose update has no loss on sampled pairs is a :class:`GameOnlySolver`.
    """

    #: which precomputed inputs :meth:`loss` reads (keys of :data:`INPUT_FIELDS`); the loop computes only these
    inputs: ClassVar[frozenset[str]] = frozenset({REFERENCE_LOGPS})
    #: True when :meth:`population_update` also works on numpy arrays (arithmetic, ``win_rate``
    #: and ``normalise`` only): the game engine then runs small CPU games on numpy
    numpy_update: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        legacy = sorted(
            n for n in ("needs_reference", "needs_last_iterate", "needs_win_probs") if n in vars(cls)
        )
        if legacy:
            raise TypeError(
                f"solver {cls.__name__} sets {', '.join(legacy)}: declare the inputs its loss reads instead, "
                "e.g. inputs = frozenset({REFERENCE_LOGPS}) (comalkit.interfaces)"
            )
        unknown = set(cls.inputs) - INPUT_FIELDS.keys()
        if unknown:
            raise TypeError(
                f"solver {cls.__name__}: unknown inputs {sorted(unknown)}; expected some of {sorted(INPUT_FIELDS)}"
            )

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


class GameOnlySolver(SubgameSolver):
    """A solver for exact matrix games only (extragradient, Nash-MD).

    Its update needs P(y ≻ π) for every response, which sampled preference pairs do not give,
    so it has no loss to train a language model with; ``task=synthetic`` runs its
    :meth:`population_update`. :func:`require_language_model_solver` is the one check.
    """

    inputs: ClassVar[frozenset[str]] = frozenset()

    def loss(self, batch: PairLogps) -> LossOutput:
        raise NotImplementedError(_game_only_message(self))


def require_language_model_solver(solver: Any) -> None:
    """Raise :class:`~comalkit.registry.ConfigError` when ``solver`` cannot train a language model."""
    if isinstance(solver, GameOnlySolver):
        raise ConfigError(_game_only_message(solver))


def _game_only_message(solver: Any) -> str:
    return (
        f"solver {type(solver).__name__} is an exact-game solver: it runs on exact games only "
        "(experiment=synthetic), because its update needs P(y ≻ π) for every response, which sampled "
        "preference pairs do not give; to train a language model choose dpo, ipo, iter_ipo, sppo, "
        "sppo_hard, inpo or mpo"
    )


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
# Data: prompts, pairs and games
# ---------------------------------------------------------------------------------------------
class PromptSource(ABC):
    """Where the online loop's prompts come from (the ``data`` group in online mode).

    ``split(k)`` is the prompt list of iteration ``k`` (``k`` ≥ 0, cycling through
    ``num_splits`` fixed splits, as COMAL's code cuts its prompts into 6); ``eval_prompts()``
    is a held-out list that never appears in a training split (it may be empty when the
    source has none). ``comalkit.prompts.SplitPrompts`` implements it (docs/data.md).
    """

    num_splits: int

    @abstractmethod
    def split(self, k: int) -> list[str]:
        """The prompts of iteration ``k``: split ``k mod num_splits``."""

    @abstractmethod
    def eval_prompts(self) -> list[str]:
        """Held-out prompts for evaluation; ``[]`` when the source has none."""


class PairBuilder(ABC):
    """Turns sampled responses and their oracle win matrices into training records (the ``pairs`` group).

    Records are dicts with ``prompt``, ``chosen``, ``rejected``, plus ``chosen_winprob`` /
    ``rejected_winprob`` when :attr:`provides_win_probs` and ``weight`` when the builder weighs
    pairs. ``comalkit.pairing.PerPromptPairBuilder`` is the base of the built-ins.
    """

    #: whether records carry ``chosen_winprob``/``rejected_winprob`` (a :data:`WIN_PROBS` solver needs them)
    provides_win_probs: bool = False

    @abstractmethod
    def build(
        self,
        prompts: Sequence[str],
        responses: Sequence[Sequence[str]],
        win_matrices: Sequence[Tensor] | Tensor,
    ) -> PairRecords:
        """Records for every prompt (``responses[i]`` sampled for ``prompts[i]``, judged into ``win_matrices[i]``)."""


class GameSource(ABC):
    """What a ``game=<name>`` plugin provides: a batch of validated games (``comalkit.games.GameBatch``)."""

    @abstractmethod
    def build(self) -> GameBatch:
        """Generate or load the games (validated) and their start policies."""


# ---------------------------------------------------------------------------------------------
# Policies and samplers
# ---------------------------------------------------------------------------------------------
class Policy(Protocol):
    """What the loop, the frozen log-prob precompute and evaluation use of a policy.

    ``comalkit.lm.LMPolicy`` implements it. A snapshot is the policy's trainable tensors only
    (a LoRA adapter or every weight), so the loop can keep π_t and μ without a second model.
    """

    def snapshot(self) -> Snapshot:
        """The trainable weights, detached, on the CPU."""
        ...

    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Copy ``snapshot`` into the trainable weights in place."""
        ...

    def using(self, snapshot: Snapshot | None) -> AbstractContextManager[Any]:
        """Temporarily run under ``snapshot`` (``None``: the current weights)."""
        ...

    def logps(
        self,
        prompts: Sequence[Any],
        responses: Sequence[str],
        snapshot: Snapshot | None = None,
        batch_size: int = 8,
    ) -> Tensor:
        """Summed response log-probs [N] on the CPU, without gradients (under ``snapshot`` if given)."""
        ...

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write the policy in Hugging Face format; return the directory."""
        ...


class SamplingPolicy(Policy, Protocol):
    """The policy/sampler seam: what a :class:`Sampler` reads of a policy.

    A sampler with its own engine (vLLM) encodes prompts with :meth:`prompt_ids` (the chat
    template and the prompt truncation), stops at ``end_of_turn_id``, caps prompt + response at
    ``max_length``, decodes with ``tokenizer``, and loads the weights from a snapshot (an
    adapter when ``lora``) or a checkpoint, so its responses match the in-process sampler's
    (docs/sampling.md).
    """

    tokenizer: Any
    max_length: int
    lora: bool

    @property
    def end_of_turn_id(self) -> int:
        """The token that ends a response."""
        ...

    def prompt_ids(self, prompt: Any, index: int = 0) -> list[int]:
        """Token ids of ``prompt`` through the chat template, truncated; ``index`` names it in warnings."""
        ...


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

    def check(self, cfg: Any) -> None:
        """Refuse a config this task cannot run, with :class:`~comalkit.registry.ConfigError`,
        before the run directory exists (:func:`comalkit.app.check_config` calls it): checks that
        need the other groups' plugins built (cheap ones only: no model, no file written)."""
        return None  # the default: the schema checks are enough


class RunContext(ABC):
    """What a task may touch of its run: the output directory and the metric sinks."""

    out_dir: Path

    @abstractmethod
    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record one step's metrics (``metrics.jsonl`` and any configured logger)."""


class MetricLogger(ABC):
    """An extra sink for metrics (the ``logger`` group); ``metrics.jsonl`` is always written."""

    @abstractmethod
    def start(self, out_dir: Path, config: dict[str, Any]) -> None:
        """Open the sink for the run in ``out_dir`` with its resolved ``config``."""

    @abstractmethod
    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record one step's metrics."""

    def finish(self, summary: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Flush and close; called once with the final summary."""


# ---------------------------------------------------------------------------------------------
# Samplers (the policy/sampler seam is SamplingPolicy above)
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
        policy: SamplingPolicy,
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
