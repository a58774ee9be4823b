"""Sampling responses from a policy with transformers' ``generate`` (``sampler=hf``; docs/sampling.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from tqdm.auto import tqdm

from comalkit.interfaces import Snapshot
from comalkit.lm.device import eval_mode
from comalkit.lm.tokens import Prompt

if TYPE_CHECKING:
    from comalkit.lm.policy import LMPolicy


@torch.no_grad()
def sample(
    policy: LMPolicy,
    prompts: Sequence[Prompt],
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 8,
    snapshot: Snapshot | None = None,
    progress: str | None = None,
) -> list[list[str]]:
    """``n`` responses per prompt of ``policy``, decoded without special tokens: ``result[i][j]``.

    Pure temperature + nucleus sampling (no top-k, no repetition penalty);
    ``temperature=0`` decodes greedily. Rows are grouped by prompt length, left-padded and
    run ``batch_size`` at a time; each batch stops at ``max_length`` minus its longest
    prompt, so every response can be scored whole. The same seed, inputs and
    ``batch_size`` give the same outputs on the CPU; the global RNG is left as it was.
    ``progress`` names a progress bar over the batches (shown on a terminal only).
    """
    if n < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(
            f"n={n}, batch_size={batch_size}, max_new_tokens={max_new_tokens}: each must be >= 1"
        )
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    from transformers import GenerationConfig

    rows = [policy.prompt_ids(p, i) for i, p in enumerate(prompts) for _ in range(n)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # less padding per batch
    greedy = temperature == 0
    config = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        top_k=None if greedy else 0,
        eos_token_id=policy.end_of_turn_id,
        pad_token_id=policy.tokenizer.pad_token_id,
        use_cache=True,
    )
    texts: list[str] = [""] * len(rows)
    devices = [policy.device] if policy.device.type == "cuda" else []
    with policy.using(snapshot), eval_mode(policy.model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        batches = range(0, len(order), batch_size)
        for start in tqdm(
            batches, desc=progress, unit="batch", leave=False, disable=None if progress else True
        ):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = left_pad(
                [rows[i] for i in chunk], policy.tokenizer.pad_token_id, policy.device
            )
            width = input_ids.shape[1]
            config.max_new_tokens = min(max_new_tokens, policy.max_length - width)
            with policy.autocast_context():
                out = policy.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )
            for i, text in zip(
                chunk, policy.tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
            ):
                texts[i] = text
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def left_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Token rows left-padded into ``input_ids`` and ``attention_mask`` [B, T] on ``device``."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return input_ids.to(device), attention_mask.to(device)
