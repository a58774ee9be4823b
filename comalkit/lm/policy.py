"""The language-model policy: one causal LM, LoRA or full weights, composed from the modules of :mod:`comalkit.lm`.

:class:`LMPolicy` is what the meta-loop, the samplers and the Lightning training module talk
to. Each of its jobs lives in its own module and the policy only wires them together:
tokenisation (:mod:`~comalkit.lm.tokens`), LoRA (:mod:`~comalkit.lm.lora`), snapshots of the
reference μ and the last iterate π_t (:mod:`~comalkit.lm.snapshots`), log-probs (the one
kernel, :mod:`~comalkit.lm.logprobs`), sampling (:mod:`~comalkit.lm.sampling`) and checkpoints
(:mod:`~comalkit.lm.checkpoints`).

The sequence log-prob ``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` over response tokens is the
quantity every loss in docs/solvers.md is written in; token counts come along for losses
that average per token (TRL's IPO).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from comalkit.interfaces import Snapshot
from comalkit.lm import checkpoints, sampling, snapshots
from comalkit.lm.device import eval_mode, resolve_device
from comalkit.lm.loading import resolve_dtype
from comalkit.lm.logprobs import lm_sequence_logps
from comalkit.lm.lora import LoraSettings, is_peft, wrap_lora
from comalkit.lm.tokens import (
    TRUNCATION_MODES,
    ChatEncoder,
    Prompt,
    Response,
    end_of_turn_id,
    ensure_pad_token,
)

AUTOCAST_DTYPES = ("bfloat16", "float16")


class LMPolicy:
    """A causal LM as a COMAL policy (see the module docstring).

    Args:
        model: a transformers causal LM (or a peft model, e.g. from :meth:`from_checkpoint`).
        tokenizer: its tokenizer; needs a chat template.
        lora: LoRA settings; ``None`` or ``enabled=False`` trains every weight. Ignored when
            ``model`` already is a peft model.
        max_length: longest prompt + response in tokens; responses are cut to fit.
        max_prompt_length: longest prompt in tokens (must be < ``max_length``).
        truncation: what a too-long prompt does: ``"warn"`` keeps its last
            ``max_prompt_length`` tokens (the generation prompt survives) and warns,
            ``"error"`` raises :class:`ValueError`.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when present).
        autocast: ``"bfloat16"``/``"float16"`` runs every forward pass under
            ``torch.autocast`` on the model's device; ``None`` runs in the weights' dtype.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        seed: seeds the LoRA initialisation.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        lora: LoraSettings | None = None,
        max_length: int = 512,
        max_prompt_length: int = 256,
        truncation: str = "warn",
        device: str = "cpu",
        autocast: str | None = None,
        gradient_checkpointing: bool = False,
        seed: int = 0,
    ) -> None:
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation={truncation!r}: expected one of {list(TRUNCATION_MODES)}")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={autocast!r}: expected None or one of {list(AUTOCAST_DTYPES)}")
        if not 0 < max_prompt_length < max_length:
            raise ValueError(
                f"max_prompt_length={max_prompt_length} must be > 0 and < max_length={max_length} "
                f"(a response needs at least one token)"
            )
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and max_length > context:
            raise ValueError(f"max_length={max_length} exceeds the model's context of {context} tokens")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; LMPolicy needs one")
        ensure_pad_token(tokenizer, model)
        self.tokenizer = tokenizer
        self.encoder = ChatEncoder(
            tokenizer, end_of_turn_id(model, tokenizer), max_length, max_prompt_length, truncation
        )
        self.autocast_dtype = resolve_dtype(autocast) if autocast is not None else None

        if is_peft(model):
            self.lora = True
        elif lora is not None and lora.enabled:
            model = wrap_lora(model, lora, seed)
            self.lora = True
        else:
            self.lora = False
            model.requires_grad_(True)
        self.model = model.to(resolve_device(device))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False
        self._keeps_logits = _accepts_logits_to_keep(self.model)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        base: Any = None,
        dtype: str | torch.dtype = "float32",
        **settings: Any,
    ) -> LMPolicy:
        """Load a policy written by :meth:`save_checkpoint` (:func:`comalkit.lm.checkpoints.load_checkpoint`
        says what ``base`` and ``dtype`` do); ``settings`` go to :class:`LMPolicy` (``max_length``,
        ``device``, ...)."""
        model, tokenizer = checkpoints.load_checkpoint(path, base, dtype)
        return cls(model, tokenizer, **settings)

    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write the policy in Hugging Face format, atomically (:func:`comalkit.lm.checkpoints.save_checkpoint`)."""
        return checkpoints.save_checkpoint(self.model, self.tokenizer, path, lora=self.lora)

    # -- model plumbing ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are (Lightning may move the model after construction)."""
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters an optimizer should update (the adapter with LoRA, else all)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` with the configured dtype (``model.autocast``) on the model's device, or a no-op."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- snapshots (comalkit/lm/snapshots.py) -----------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The trainable weights, detached and cloned to the CPU (the adapter, or every parameter)."""
        return snapshots.take_snapshot(self.model)

    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Copy ``snapshot`` into the trainable weights in place (optimizer state stays attached)."""
        snapshots.load_snapshot(self.model, snapshot)

    @contextlib.contextmanager
    def using(self, snapshot: Snapshot | None) -> Iterator[LMPolicy]:
        """Temporarily swap ``snapshot`` in (``None``: no change); the current weights come back after."""
        if snapshot is None:
            yield self
            return
        with snapshots.swapped_in(self.model, snapshot):
            yield self

    # -- encoding (comalkit/lm/tokens.py) ---------------------------------------------------------
    @property
    def max_length(self) -> int:
        """Longest prompt + response in tokens."""
        return self.encoder.max_length

    @property
    def end_of_turn_id(self) -> int:
        """The token that ends a response (and stops generation)."""
        return self.encoder.end_of_turn_id

    def prompt_ids(self, prompt: Prompt, index: int = 0) -> list[int]:
        """Token ids of ``prompt`` through the chat template with the generation prompt appended."""
        return self.encoder.prompt_ids(prompt, index)

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[Response]) -> dict[str, Tensor]:
        """Prompt/response pairs as one right-padded batch with ``response_mask`` (CPU tensors)."""
        return self.encoder.encode(prompts, responses)

    # -- log-probs (comalkit/lm/logprobs.py) ------------------------------------------------------
    def sequence_logps(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        response_mask: Tensor,
        *,
        lean: bool = False,
        chunk: int = 256,
    ) -> tuple[Tensor, Tensor]:
        """Summed response log-probs [B] (float32, differentiable) and response token counts [B].

        Scored by :func:`comalkit.lm.logprobs.lm_sequence_logps`: only the logit columns some
        response needs are computed (``logits_to_keep``), which skips the vocabulary projection
        over the prompts; ``lean`` takes the chunked, recomputed LM head (training's default).
        """
        return lm_sequence_logps(
            self.model,
            input_ids.to(self.device),
            attention_mask,
            response_mask,
            autocast_context=self.autocast_context,
            keeps_logits=self._keeps_logits,
            lean=lean,
            chunk=chunk,
        )

    @torch.no_grad()
    def logps(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[Response],
        snapshot: Snapshot | None = None,
        batch_size: int = 8,
        return_counts: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Summed response log-probs [N] on the CPU without gradients, in eval mode.

        ``snapshot`` scores under those weights instead of the current ones (the reference or
        the last iterate). Examples are batched by length, so padding stays small.
        ``return_counts`` also returns the response token counts [N].
        """
        examples = [
            self.encoder.tokenize(p, r, i) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        out = torch.zeros(len(examples), dtype=torch.float32)
        counts = torch.zeros(len(examples), dtype=torch.long)
        with self.using(snapshot), eval_mode(self.model):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = self.encoder.collate([examples[i] for i in chunk])
                values, n = self.sequence_logps(**batch)
                out[chunk], counts[chunk] = values.cpu(), n.cpu()
        return (out, counts) if return_counts else out

    # -- sampling (comalkit/lm/sampling.py) -------------------------------------------------------
    #: ``policy.sample(prompts, n=1, temperature=1.0, ...)``: :func:`comalkit.lm.sampling.sample`
    sample = sampling.sample


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model can compute only some logit columns (skipping the prompts; see lm_sequence_logps)."""
    base = model.get_base_model() if is_peft(model) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters
