"""Snapshots: a policy's trainable tensors, taken out, put back, or swapped in for a block.

COMAL's prox step scores responses under three sets of weights: the policy, the last iterate
π_t and the reference μ (Liu et al. 2025, Algorithm 1; docs/solvers.md). They differ only in
the trainable tensors (the LoRA adapter, or every weight in a full fine-tune), so the reference
and the last iterate are kept as snapshots, ``dict[str, Tensor]`` on the CPU, and swapped into
the one model when their log-probs or samples are needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from comalkit.interfaces import Snapshot


def named_trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters that train, by name (the adapter with LoRA, else all)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def take_snapshot(model: torch.nn.Module) -> Snapshot:
    """The trainable weights, detached and cloned to the CPU (the adapter, or every parameter)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in named_trainable(model).items()}


@torch.no_grad()
def load_snapshot(model: torch.nn.Module, snapshot: Snapshot) -> None:
    """Copy ``snapshot`` into the trainable weights in place (optimizer state stays attached)."""
    params = _fitting(model, snapshot)
    for name, p in params.items():
        p.copy_(snapshot[name])


@contextlib.contextmanager
def swapped_in(model: torch.nn.Module, snapshot: Snapshot) -> Iterator[None]:
    """Run a block with ``snapshot``'s weights in place of the current ones, which come back after.

    The current tensors are set aside by reference (each parameter's ``.data``) and fresh
    tensors of the same dtype, device and layout receive the snapshot, so nothing is cloned to
    the CPU and back: the swap costs one copy of the snapshot onto the device and, for the
    duration of the block, device memory for one more set of trainable tensors. The parameter
    objects stay the same (optimizer state stays attached), and anything written to the weights
    inside the block is discarded with the swapped-in tensors.
    """
    params = _fitting(model, snapshot)
    current = {name: p.data for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.data = torch.empty_like(current[name]).copy_(snapshot[name])
        yield
    finally:
        for name, p in params.items():
            p.data = current[name]


def _fitting(model: torch.nn.Module, snapshot: Snapshot) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters, after checking that ``snapshot`` has exactly their names and shapes."""
    params = named_trainable(model)
    missing, unexpected = params.keys() - snapshot.keys(), snapshot.keys() - params.keys()
    if missing or unexpected:
        raise KeyError(
            f"snapshot does not fit this policy: missing {sorted(missing)[:3]} ({len(missing)}), "
            f"unexpected {sorted(unexpected)[:3]} ({len(unexpected)})"
        )
    for name, p in params.items():
        value = snapshot[name]
        if value.shape != p.shape:
            raise ValueError(
                f"snapshot[{name!r}] has shape {tuple(value.shape)}, the policy {tuple(p.shape)}"
            )
    return params
