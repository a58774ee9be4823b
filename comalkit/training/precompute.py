"""The frozen log-probs a solver reads, computed once before training so that training holds one model.

COMAL's subgame losses compare the policy with the last iterate π_t and the reference μ
(Liu et al. 2025, Algorithm 1; docs/solvers.md). Their log-probs do not change during an
iteration, so they are computed once, without gradients, by swapping each snapshot into the
policy, and travel with the training records (``last_*``, ``ref_*``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from comalkit.interfaces import INPUT_FIELDS, LAST_ITERATE_LOGPS, REFERENCE_LOGPS, Snapshot, SubgameSolver
from comalkit.preference_data import PreferenceRecord

#: the frozen inputs a solver may read, as (its name in ``solver.inputs``, prefix of the record keys)
FROZEN = ((LAST_ITERATE_LOGPS, "last"), (REFERENCE_LOGPS, "ref"))


def precision_autocast(
    precision: str, device: torch.device | str = "cpu"
) -> contextlib.AbstractContextManager[Any]:
    """The autocast context Lightning uses for ``precision`` (so frozen and trained log-probs agree)."""
    device_type = torch.device(device).type
    if precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)
    if precision == "16-mixed":
        return torch.autocast(device_type, dtype=torch.float16, cache_enabled=False)
    return contextlib.nullcontext()


def required_keys(solver: SubgameSolver) -> list[str]:
    """The record keys a solver's loss reads beyond prompt/chosen/rejected."""
    return [key for name, keys in INPUT_FIELDS.items() if name in solver.inputs for key in keys]


def precompute_logps(
    policy: Any,
    records: Sequence[PreferenceRecord],
    solver: SubgameSolver,
    last: Snapshot | None = None,
    reference: Snapshot | None = None,
    batch_size: int = 8,
    precision: str = "32-true",
) -> list[PreferenceRecord]:
    """Copies of ``records`` with the frozen summed log-probs ``solver`` needs (``last_*``, ``ref_*``).

    Each snapshot is evaluated once, without gradients, swapped into the policy
    (``policy.logps(..., snapshot=)`` uses ``policy.using``); ``None`` means the policy's current weights, and a snapshot passed
    as both ``last`` and ``reference`` is evaluated once. ``precision`` should be the
    trainer's, so that at step 0 the policy's log-probs equal the frozen ones.
    """
    out: list[PreferenceRecord] = [dict(r) for r in records]  # type: ignore[misc]
    if not out:
        return out
    prompts = [r["prompt"] for r in out]
    responses = [r["chosen"] for r in out] + [r["rejected"] for r in out]
    computed: dict[int, Tensor] = {}
    for name, prefix in FROZEN:
        if name not in solver.inputs:
            continue
        snapshot = last if prefix == "last" else reference
        if id(snapshot) not in computed:
            with precision_autocast(precision, policy.device):
                values = policy.logps(prompts + prompts, responses, snapshot=snapshot, batch_size=batch_size)
            computed[id(snapshot)] = values.float().cpu()
        values = computed[id(snapshot)].tolist()
        for i, record in enumerate(out):
            record[f"{prefix}_chosen"] = values[i]  # type: ignore[literal-required]
            record[f"{prefix}_rejected"] = values[len(out) + i]  # type: ignore[literal-required]
    return out


def check_records(records: Sequence[PreferenceRecord], solver: SubgameSolver, what: str = "training") -> None:
    """Raise ``ValueError`` naming the first record that lacks a key ``solver`` reads."""
    if not records:
        raise ValueError(f"no {what} preference pairs to fit")
    name = type(solver).__name__
    for key in required_keys(solver):
        for i, record in enumerate(records):
            if record.get(key) is None:
                hint = (
                    "compute them first with comalkit.training.precompute_logps"
                    if key.startswith(("last_", "ref_"))
                    else "the data needs soft win probabilities (chosen_winprob/rejected_winprob); "
                    "for hard labels choose a solver without them, e.g. sppo_hard"
                )
                raise ValueError(
                    f"solver {name} needs '{key}' in every {what} pair; pair {i} has none: {hint}"
                )
