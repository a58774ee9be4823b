"""The one log-probability kernel: summed response log-probs of a causal LM.

Every language-model loss in comalkit is written in the sequence log-probability
``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` over the response tokens: DPO (Rafailov et al. 2023,
Eq. 7), IPO/Iter-IPO/INPO/MPO, SPPO (Wu et al. 2024, Eq. 4.7) and the KL-regularised subgame of
COMAL (Liu et al. 2025, arXiv 2410.23223), whose prox step needs it under the policy, the last
iterate and the reference (docs/solvers.md). Token counts come along for the losses that
average per token (TRL's IPO) and for the likelihood judge's per-token mean (docs/oracles.md).

Training (the policy's log-probs with gradients), the frozen reference/last-iterate
precompute, evaluation and the likelihood judge all score through :func:`sequence_logps`; the
model forward around it is :func:`lm_sequence_logps`. Scoring is always float32: token ``t`` is
scored by the logits at ``t − 1`` as ``logit[y_t] − logsumexp(logits)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

#: Config keys of heads that are not a plain projection (their logits are capped or scaled).
_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """``log softmax(logits)[labels]`` in float32: logits [..., V], labels [...] -> [...]."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(
    inputs: Tensor, labels: Tensor, mask: Tensor, head: torch.nn.Linear | None = None, chunk: int = 256
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of ``labels`` where ``mask`` is set, per row [B], and the counts [B].

    ``inputs`` are logits [B, T, V] aligned with ``labels`` and ``mask`` [B, T]. With ``head``
    (the LM head) they are hidden states [B, T, H] instead, projected only at the masked
    positions, ``chunk`` tokens at a time under activation checkpointing: the backward pass
    recomputes each chunk's logits instead of keeping the [B, T, V] activation, the largest of
    a small model (docs/training.md measures it; the idea of TRL's fused LM head and Liger's
    fused linear cross-entropy). Both give the same numbers in float32.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: the lean head needs at least 1 token per chunk")
    mask = mask.bool()
    counts = mask.sum(-1)
    if head is None:
        return (token_logps(inputs, labels) * mask).sum(-1), counts
    rows, cols = mask.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return torch.zeros(len(mask), device=mask.device), counts
    states, targets = inputs[rows, cols], labels[rows, cols]
    pieces = [
        checkpoint(
            _head_logps,
            states[i : i + chunk],
            targets[i : i + chunk],
            head.weight,
            head.bias,
            use_reentrant=False,
        )
        for i in range(0, len(targets), chunk)
    ]
    values = torch.cat(pieces)
    summed = torch.zeros(len(mask), dtype=values.dtype, device=values.device).index_add(0, rows, values)
    return summed, counts


def _head_logps(states: Tensor, targets: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return token_logps(torch.nn.functional.linear(states, weight, bias), targets)


def response_targets(response_mask: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Which next-token targets are response tokens: the mask [B, T-1], counts [B], and the
    positions any row needs (scoring can skip the columns outside them)."""
    target_mask = response_mask[:, 1:].to(device).bool()
    return target_mask, target_mask.sum(-1), target_mask.any(0).nonzero().flatten()


def has_plain_head(model: Any) -> bool:
    """Whether the lean head applies: a decoder plus an output projection whose logits are used as is."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    plain = not any(getattr(config, k, None) for k in _HEAD_TRANSFORMS)
    return plain and hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")


def lm_sequence_logps(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    response_mask: Tensor,
    *,
    autocast_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    keeps_logits: bool = False,
    lean: bool = False,
    chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    """Summed response log-probs [B] (differentiable) and response token counts [B] of right-padded batches.

    The model runs on ``input_ids``' device, up to the last column any response needs.
    ``keeps_logits`` (the model takes ``logits_to_keep``) skips the vocabulary projection over
    the prompts; ``lean`` projects hidden states through :func:`sequence_logps`' chunked head
    instead, falling back to the logits where :func:`has_plain_head` says no. ``autocast_context``
    is entered around the forward (and the lean head).
    """
    device = input_ids.device
    attention_mask = attention_mask.to(device)
    target_mask, counts, columns = response_targets(response_mask, device)
    if columns.numel() == 0:
        return torch.zeros(len(input_ids), device=device), counts
    first, last = int(columns[0]), int(columns[-1])  # later columns are padding for every row
    if lean and has_plain_head(model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        with autocast_context():
            hidden = base.get_decoder()(
                input_ids=input_ids[:, : last + 1],
                attention_mask=attention_mask[:, : last + 1],
                use_cache=False,
            ).last_hidden_state
            summed, _ = sequence_logps(
                hidden,
                input_ids[:, 1 : last + 2],
                target_mask[:, : last + 1],
                head=base.get_output_embeddings(),
                chunk=chunk,
            )
        return summed, counts
    kwargs: dict[str, Any] = {
        "input_ids": input_ids[:, : last + 1],
        "attention_mask": attention_mask[:, : last + 1],
        "use_cache": False,
    }
    if keeps_logits:
        kwargs["logits_to_keep"] = torch.arange(first, last + 1, device=device)
    with autocast_context():
        logits = model(**kwargs).logits
    if not keeps_logits:
        logits = logits[:, first : last + 1]
    # logits at positions first..last score tokens first+1..last+1
    summed, _ = sequence_logps(logits, input_ids[:, first + 1 : last + 2], target_mask[:, first : last + 1])
    return summed, counts
