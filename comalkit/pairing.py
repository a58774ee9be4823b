"""From K sampled responses per prompt and their oracle win matrix to training pairs.

A pair builder (the ``pairs`` group) sees, for each prompt, the responses ``y_1..y_K`` sampled
from the current policy π_t and the oracle's matrix ``M[i][j] = P(y_i ≻ y_j)`` (``M[i][i] = ½``).
Responses are ranked by their mean win rate against the sampled set,
``P̂(y_i ≻ π_t) = (1/K) Σ_j M[i][j]`` (itself included at ½), the Monte-Carlo estimate of
``P(y ≻ π_t)`` that SPPO's loss needs (its ``p_w``/``p_l``). The builder
decides which (chosen, rejected) pairs to train on.

Records are plain dicts, the same format as a preference file (``comalkit.preference_data``):
``prompt``, ``chosen``, ``rejected``; ``chosen_winprob``/``rejected_winprob`` (= P̂(y ≻ π_t))
when the builder :attr:`~comalkit.interfaces.PairBuilder.provides_win_probs`; ``weight`` when it
weighs pairs. :class:`PerPromptPairBuilder` is the base of the built-in builders.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from comalkit.interfaces import WIN_PROBS, PairBuilder
from comalkit.registry import ConfigError, registry

#: win rates or probabilities closer than this count as tied
TIE_TOL = 1e-9
#: how far M[i][j] + M[j][i] may stray from 1 (oracles round-trip through float32 and SQLite)
SYMMETRY_TOL = 1e-4


def response_win_rates(matrix: Tensor) -> Tensor:
    """P̂(y_i ≻ π_t) for every sampled response: the row means of ``M`` (shape [..., K])."""
    return matrix.mean(dim=-1)


def ranking(rates: Tensor) -> list[int]:
    """Response indices from the highest win rate to the lowest; ties keep sampling order."""
    return sorted(range(len(rates)), key=lambda i: (-float(rates[i]), i))


class PairRecords(list):
    """The records of one build (a ``list`` of dicts) plus what the builder skipped.

    ``prompts`` is how many prompts came in; ``skipped`` how many gave no pair because their
    responses were identical or tied in the oracle's judgment (nothing to learn from them).
    """

    def __init__(self, records: Sequence[dict[str, Any]] = (), prompts: int = 0, skipped: int = 0) -> None:
        super().__init__(records)
        self.prompts = prompts
        self.skipped = skipped

    def stats(self) -> dict[str, float | int]:
        """Counts and mean win rates for the iteration's metrics."""
        out: dict[str, float | int] = {"pairs": len(self), "pairs/prompts_skipped": self.skipped}
        if self and "chosen_winprob" in self[0]:
            out["pairs/chosen_winprob"] = sum(r["chosen_winprob"] for r in self) / len(self)
            out["pairs/rejected_winprob"] = sum(r["rejected_winprob"] for r in self) / len(self)
        return out


class PerPromptPairBuilder(PairBuilder):
    """A :class:`~comalkit.interfaces.PairBuilder` that chooses pairs one prompt at a time.

    Subclasses implement :meth:`select` for one prompt; :meth:`build` checks the inputs,
    ranks the responses and assembles the records.
    """

    @abstractmethod
    def select(
        self, texts: Sequence[str], matrix: Tensor, rates: Tensor
    ) -> list[tuple[int, int, float | None]]:
        """``(chosen, rejected, weight)`` index pairs for one prompt; ``[]`` when all are tied.

        ``matrix`` is the K×K win matrix (float64) and ``rates`` its row means. A weight of
        ``None`` leaves the record unweighted.
        """

    def build(
        self,
        prompts: Sequence[str],
        responses: Sequence[Sequence[str]],
        win_matrices: Sequence[Tensor] | Tensor,
    ) -> PairRecords:
        """Records for every prompt (``responses[i]`` sampled for ``prompts[i]``, judged into ``win_matrices[i]``)."""
        if not len(prompts) == len(responses) == len(win_matrices):
            raise ValueError(
                f"got {len(prompts)} prompts, {len(responses)} response lists and {len(win_matrices)} win matrices; "
                "expected one of each per prompt"
            )
        records: list[dict[str, Any]] = []
        skipped = 0
        for index, (prompt, texts, matrix) in enumerate(zip(prompts, responses, win_matrices)):
            matrix = check_win_matrix(matrix, len(texts), index)
            rates = response_win_rates(matrix)
            chosen_pairs = self.select(list(texts), matrix, rates)
            skipped += not chosen_pairs
            for c, r, weight in chosen_pairs:
                record: dict[str, Any] = {"prompt": prompt, "chosen": texts[c], "rejected": texts[r]}
                if self.provides_win_probs:
                    record["chosen_winprob"] = float(rates[c])
                    record["rejected_winprob"] = float(rates[r])
                if weight is not None:
                    record["weight"] = float(weight)
                records.append(record)
        return PairRecords(records, prompts=len(prompts), skipped=skipped)


def check_win_matrix(matrix: Any, k: int, index: int = 0) -> Tensor:
    """``matrix`` as a float64 K×K tensor, or a ``ValueError`` naming the prompt and the defect."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    where = f"prompt {index}"
    if k < 2:
        raise ValueError(f"{where}: {k} response(s); a pair needs at least 2 samples per prompt")
    if m.shape != (k, k):
        raise ValueError(
            f"{where}: win matrix of shape {tuple(m.shape)} for {k} responses; expected ({k}, {k})"
        )
    shown = [[round(v, 4) for v in row] for row in m.tolist()]
    if not torch.isfinite(m).all() or (m < 0).any() or (m > 1).any():
        raise ValueError(f"{where}: win matrix entries must be probabilities in [0, 1], got {shown}")
    if (m + m.T - 1).abs().max() > SYMMETRY_TOL:
        raise ValueError(f"{where}: win matrix violates M[i][j] + M[j][i] = 1: {shown}")
    return m


def check_compatible(solver: Any, builder: Any) -> None:
    """Fail before sampling when ``solver`` needs win probabilities that ``builder`` does not give.

    Raises :class:`~comalkit.registry.ConfigError` saying what to change.
    """
    if WIN_PROBS not in getattr(solver, "inputs", ()) or getattr(builder, "provides_win_probs", False):
        return
    solver_name, builder_name = _option("solver", solver), _option("pairs", builder)
    fixes = []
    if hasattr(builder, "win_probs"):
        fixes.append("set pairs.win_probs=true")
    givers = [
        n
        for n in registry.names("pairs")
        if getattr(registry.get("pairs", n), "provides_win_probs", None) is True
    ]
    fixes += [f"use pairs={n}" for n in givers]
    fixes.append("choose a solver with hard labels (without the win_probs input)")
    raise ConfigError(
        f"solver={solver_name} needs per-response win probabilities P̂(y ≻ π_t) (its inputs include win_probs), "
        f"but pairs={builder_name} gives none: " + ", or ".join(fixes) + "."
    )


def _option(group: str, obj: Any) -> str:
    """The registered option name of a plugin object (its class name when unregistered)."""
    for name in registry.names(group):
        if type(obj) is registry.get(group, name):
            return name
    return type(obj).__name__
