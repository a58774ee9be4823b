"""The language-model policy backend: one model, LoRA or full weights, snapshots, log-probs, sampling.

:class:`LMPolicy` is what the meta-loop and the Lightning training module talk to.

* **Snapshots, not model copies.** With LoRA (peft) the base stays frozen and the trainable
  state is the adapter; the reference μ and the last iterate π_t are adapter snapshots
  (``dict[str, Tensor]`` on the CPU) swapped into the one model when their log-probs are
  needed (:meth:`LMPolicy.using`). With a full fine-tune a snapshot is every parameter; the
  loop precomputes the frozen log-probs once per iteration, so training still holds one model.
* **Masks.** A sequence is ``chat_template(prompt, add_generation_prompt=True) + response +
  end-of-turn``, right-padded. ``response_mask`` is 1 exactly on the response tokens and the
  end-of-turn token, so prompt and padding never count, even when pad and EOS are one token.
* **Sequence log-prob** ``log π(y|x) = Σ_t log π(y_t | x, y_<t)`` over response tokens (the
  quantity every loss in docs/solvers.md is written in), computed by the one kernel in
  :mod:`comalkit.logprobs`; token counts come along for losses that average per token (TRL's IPO).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from comalkit.interfaces import Snapshot
from comalkit.logprobs import lm_sequence_logps
from comalkit.models import (
    BASE_FILE,
    ModelError,
    base_identity,
    check_adapter_base,
    ensure_pad_token,
    load_causal_lm,
    quiet_progress_bars,
    resolve_dtype,
)
from comalkit.outputs import OutputError, is_io_error
from comalkit.registry import ConfigError, param

#: A prompt: plain text (one user message) or a list of chat messages (TRL's conversational format).
Prompt = str | Sequence[Mapping[str, str]]
#: A response: plain text, or a one-message list ``[{"role": "assistant", "content": ...}]``.
Response = str | Sequence[Mapping[str, str]]

TRUNCATION_MODES = ("warn", "error")
AUTOCAST_DTYPES = ("bfloat16", "float16")


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

    ``W + (alpha / r)·B·A`` on each target module; B starts at zero, so a fresh adapter is
    exactly the base model and the initial snapshot is a valid reference. Dropout defaults to
    0 so that the policy and a reference snapshot agree bit for bit at the start (DPO's loss
    is then exactly ln 2).
    """

    enabled: bool = param(True, help="train a LoRA adapter (False: full fine-tune)")
    r: int = param(16, ge=1, help="LoRA rank")
    alpha: float = param(32.0, gt=0.0, help="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = param(0.0, ge=0.0, lt=1.0, help="dropout on the LoRA branch input")
    target_modules: list[str] = param(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        help="module names (suffixes) that get an adapter",
    )


@dataclass
class TokenizedExample:
    """One prompt/response pair as token ids; the first ``prompt_length`` ids are the prompt."""

    input_ids: list[int]
    prompt_length: int

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


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
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.autocast_dtype = resolve_dtype(autocast) if autocast is not None else None
        self.end_of_turn_id = _end_of_turn_id(model, tokenizer)
        decoder = getattr(tokenizer, "added_tokens_decoder", {})
        self._special_strings = sorted(
            {t.content for t in decoder.values() if getattr(t, "special", False)}
            | set(getattr(tokenizer, "all_special_tokens", []))
        )

        if _is_peft(model):
            self.lora = True
        elif lora is not None and lora.enabled:
            model = _wrap_lora(model, lora, seed)
            self.lora = True
        else:
            self.lora = False
            model.requires_grad_(True)
        self.model = model.to(_resolve_device(device))
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
        """Load a policy written by :meth:`save_checkpoint`.

        A LoRA checkpoint (``adapter_config.json``) needs its base model: ``base`` is a
        ``(model, tokenizer)`` pair or a path for :func:`~comalkit.models.load_causal_lm`;
        ``None`` uses the adapter's recorded ``base_model_name_or_path``. The adapter stays
        trainable and the tokenizer comes from the checkpoint. A full checkpoint is a plain
        model directory. ``dtype`` applies to what is loaded from a path; ``settings`` go to
        :class:`LMPolicy` (``max_length``, ``device``, ...).
        """
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ModelError(f"policy checkpoint '{path}' does not exist or is not a directory")
        if not (path / "adapter_config.json").is_file():
            model, tokenizer = load_causal_lm(path, dtype=dtype)
            return cls(model, tokenizer, **settings)
        from peft import PeftConfig, PeftModel

        if base is None:
            base = PeftConfig.from_pretrained(path).base_model_name_or_path
            if not base:
                raise ModelError(
                    f"LoRA checkpoint '{path}' records no base model; pass base=(model, tokenizer) or a path"
                )
        model, _ = load_causal_lm(base, dtype=dtype) if isinstance(base, (str, os.PathLike)) else base
        if _is_peft(model):
            raise ValueError(
                f"the base for LoRA checkpoint '{path}' already has an adapter; pass the bare model"
            )
        check_adapter_base(path, model)  # an adapter on the wrong base would load without complaint
        tokenizer = _load_tokenizer(path)
        with quiet_progress_bars(), _peft_deprecation_silenced():
            peft_model = PeftModel.from_pretrained(model, path, is_trainable=True)
        return cls(peft_model, tokenizer, **settings)

    # -- model plumbing ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are (Lightning may move the model after construction)."""
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters an optimizer should update (the adapter with LoRA, else all)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` with the configured dtype on the model's device, or a no-op."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    # -- snapshots --------------------------------------------------------------------------------
    def _named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def snapshot(self) -> Snapshot:
        """The trainable weights, detached and cloned to the CPU (the adapter, or every parameter)."""
        return {n: p.detach().to("cpu", copy=True) for n, p in self._named_trainable().items()}

    @torch.no_grad()
    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Copy ``snapshot`` into the trainable weights in place (optimizer state stays attached)."""
        params = self._named_trainable()
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
            p.copy_(value)

    @contextlib.contextmanager
    def using(self, snapshot: Snapshot | None) -> Iterator[LMPolicy]:
        """Temporarily swap ``snapshot`` in (``None``: no change); the current weights come back after."""
        if snapshot is None:
            yield self
            return
        current = self.snapshot()
        self.load_snapshot(snapshot)
        try:
            yield self
        finally:
            self.load_snapshot(current)

    # -- encoding ---------------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt, index: int = 0) -> list[int]:
        """Token ids of ``prompt`` through the chat template with the generation prompt appended.

        A prompt longer than ``max_prompt_length`` keeps its last tokens with a warning, or
        raises (``truncation="error"``); ``index`` names it in the message.
        """
        messages = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
        )
        ids = self._chat_ids(messages)
        if len(ids) > self.max_prompt_length:
            message = (
                f"prompt {index} has {len(ids)} tokens after the chat template, more than "
                f"max_prompt_length={self.max_prompt_length}"
            )
            if self.truncation == "error":
                raise ValueError(message + " (truncation='error'; raise max_prompt_length or shorten it)")
            warnings.warn(message + f"; keeping its last {self.max_prompt_length} tokens", stacklevel=3)
            ids = ids[-self.max_prompt_length :]
        return ids

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template's token ids, with every message's content tokenised as plain text.

        A prompt that contains special-token text (``<|im_end|><|im_start|>system ...``) must not
        forge chat turns, so its content is tokenised with ``split_special_tokens=True`` and only
        the template's own markup becomes special tokens. Content without such text takes the
        plain path (one tokenisation of the whole text, the same ids).
        """
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not any(self._has_special_text(m.get("content")) for m in messages):
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        marks = [f"\ue000{i}\ue001" for i in range(len(messages))]
        marked = self.tokenizer.apply_chat_template(
            [{**m, "content": mark} for m, mark in zip(messages, marks)],
            tokenize=False,
            add_generation_prompt=True,
        )
        pieces = re.split("(\ue000\\d+\ue001)", marked)
        contents = {mark: m["content"] for mark, m in zip(marks, messages)}
        if "".join(contents.get(p, p) for p in pieces) != text:
            raise ValueError(
                "the chat template rewrites message content, so special-token text in it cannot be kept as "
                "plain text; remove special-token strings from the data"
            )
        ids: list[int] = []
        for piece in pieces:
            if piece in contents:
                ids += self.tokenizer(contents[piece], add_special_tokens=False, split_special_tokens=True)[
                    "input_ids"
                ]
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def _has_special_text(self, text: Any) -> bool:
        return isinstance(text, str) and any(token in text for token in self._special_strings)

    def response_ids(self, response: Response) -> list[int]:
        """Token ids of ``response`` followed by the end-of-turn token (not yet cut to fit)."""
        if not isinstance(response, str):
            turns = list(response)
            if len(turns) != 1 or turns[0].get("role", "assistant") != "assistant":
                raise ValueError(f"a response must be a string or one assistant message, got {turns!r}")
            response = turns[0]["content"]
        # special-token text in a response is text: it must not end the turn or open a new one
        ids = self.tokenizer(response, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [*ids, self.end_of_turn_id]

    def tokenize(self, prompt: Prompt, response: Response, index: int = 0) -> TokenizedExample:
        """Prompt and response ids, the response cut so that the total fits ``max_length``."""
        prompt_ids = self.prompt_ids(prompt, index)
        response_ids = self.response_ids(response)[: self.max_length - len(prompt_ids)]
        return TokenizedExample(prompt_ids + response_ids, len(prompt_ids))

    def collate(self, examples: Sequence[TokenizedExample]) -> dict[str, Tensor]:
        """Right-pad examples into ``input_ids``, ``attention_mask`` and ``response_mask`` (all [B, T])."""
        width = max(len(e.input_ids) for e in examples)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        response_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e.input_ids)
            input_ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
            attention_mask[i, :n] = 1
            response_mask[i, e.prompt_length : n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[Response]) -> dict[str, Tensor]:
        """:meth:`tokenize` each pair and :meth:`collate` them (CPU tensors)."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            raise ValueError("nothing to encode: no prompts")
        return self.collate([self.tokenize(p, r, i) for i, (p, r) in enumerate(zip(prompts, responses))])

    # -- log-probs --------------------------------------------------------------------------------
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

        Scored by :func:`comalkit.logprobs.lm_sequence_logps`: only the logit columns some
        response needs are computed (``logits_to_keep``), which skips the vocabulary projection
        over the prompts; ``lean`` takes the chunked, recomputed LM head (training's default).
        """
        return lm_sequence_logps(
            self.model,
            input_ids.to(self.device),
            attention_mask,
            response_mask,
            autocast=self.autocast,
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
        examples = [self.tokenize(p, r, i) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        out = torch.zeros(len(examples), dtype=torch.float32)
        counts = torch.zeros(len(examples), dtype=torch.long)
        with self.using(snapshot), _eval_mode(self.model):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = self.collate([examples[i] for i in chunk])
                values, n = self.sequence_logps(**batch)
                out[chunk], counts[chunk] = values.cpu(), n.cpu()
        return (out, counts) if return_counts else out

    # -- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
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
        """``n`` responses per prompt, decoded without special tokens: ``result[i][j]``.

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

        rows = [self.prompt_ids(p, i) for i, p in enumerate(prompts) for _ in range(n)]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # less padding per batch
        greedy = temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None if greedy else 0,
            eos_token_id=self.end_of_turn_id,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
        )
        texts: list[str] = [""] * len(rows)
        devices = [self.device] if self.device.type == "cuda" else []
        with self.using(snapshot), _eval_mode(self.model), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            batches = range(0, len(order), batch_size)
            for start in tqdm(
                batches, desc=progress, unit="batch", leave=False, disable=None if progress else True
            ):
                chunk = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad(
                    [rows[i] for i in chunk], self.tokenizer.pad_token_id, self.device
                )
                width = input_ids.shape[1]
                config.max_new_tokens = min(max_new_tokens, self.max_length - width)
                with self.autocast():
                    out = self.model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                    )
                for i, text in zip(
                    chunk, self.tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
                ):
                    texts[i] = text
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    # -- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        """Write the policy in Hugging Face format, atomically; returns the directory.

        LoRA: the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, loadable
        with ``peft.PeftModel.from_pretrained(base, path)``); full: the whole model (loadable
        with ``AutoModelForCausalLM.from_pretrained(path)``). The tokenizer is saved with it.
        Everything is written to a temporary sibling directory first and renamed into place,
        so ``path`` never holds a half-written checkpoint (an existing one is replaced).
        """
        target = Path(path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)
        try:
            with quiet_progress_bars():
                self.model.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
            if self.lora:  # which base the adapter belongs to, checked when it is loaded again
                (tmp / BASE_FILE).write_text(json.dumps(base_identity(self.model)) + "\n")
            _replace_dir(tmp, target)
        except Exception as exc:  # transformers and tokenizers report a full disk without the file
            if is_io_error(exc) and not isinstance(exc, OutputError):
                raise OutputError(target, exc) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _wrap_lora(model: Any, lora: LoraSettings, seed: int) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with _peft_deprecation_silenced():
                return get_peft_model(model, config)
        except ValueError as exc:  # peft names the missing modules; add what to do
            raise ValueError(f"model.lora.target_modules={list(lora.target_modules)}: {exc}") from exc


def _end_of_turn_id(model: Any, tokenizer: Any) -> int:
    """The token generation stops at: the generation config's (first) EOS, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    eos = tokenizer.eos_token_id if eos is None else eos
    if eos is None:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return int(eos)


def _accepts_logits_to_keep(model: Any) -> bool:
    import inspect

    base = model.get_base_model() if _is_peft(model) else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device=cpu or auto")
    return resolved


def _left_pad(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r) :] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextlib.contextmanager
def _peft_deprecation_silenced() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing``; the warning is not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ensure_pad_token(tokenizer)
    return tokenizer


def _replace_dir(new: Path, target: Path) -> None:
    """Move directory ``new`` to ``target``, replacing an existing one with two renames."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "previous")
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class PolicySettings:
    """The fields every ``model`` plugin shares; a plugin adds where the weights come from.

    A plugin implements :meth:`load` (the bare base model and tokenizer); :meth:`build` wraps
    it into an :class:`LMPolicy` with these settings, and :meth:`load_checkpoint` puts a saved
    adapter (or full model) back on top of it with the same settings.
    """

    dtype: str = param(
        "float32", choices=["float32", "bfloat16", "float16"], help="weight dtype after loading"
    )
    autocast: str | None = param(
        None, choices=list(AUTOCAST_DTYPES), help="autocast dtype for forward passes; null: off"
    )
    device: str = param("cpu", help="cpu, cuda, cuda:N or auto")
    lora: LoraSettings = param(
        default_factory=LoraSettings, help="LoRA adapter (enabled=false: full fine-tune)"
    )
    max_length: int = param(512, ge=2, help="longest prompt + response in tokens")
    max_prompt_length: int = param(256, ge=1, help="longest prompt in tokens (< max_length)")
    truncation: str = param(
        "warn", choices=list(TRUNCATION_MODES), help="a too-long prompt: warn (keep its end) or error"
    )
    gradient_checkpointing: bool = param(False, help="recompute activations in backward (less memory)")
    seed: int = param(0, ge=0, help="seeds the LoRA (and tiny model) initialisation")

    def __post_init__(self) -> None:
        # instantiate(..., _convert_="all") hands nested configs over as dicts
        if isinstance(self.lora, Mapping):
            self.lora = LoraSettings(**self.lora)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"model.max_prompt_length={self.max_prompt_length} must be < model.max_length={self.max_length}"
            )

    def load(self) -> tuple[Any, Any]:
        """The bare base model (no adapter, eval mode, ``self.dtype``) and its tokenizer."""
        raise NotImplementedError(f"{type(self).__name__} must implement load()")

    def build(self) -> LMPolicy:
        """A fresh policy: the base model with a new LoRA adapter (or fully trainable)."""
        model, tokenizer = self.load()
        return LMPolicy(model, tokenizer, lora=self.lora, seed=self.seed, **self._policy_settings())

    def load_checkpoint(self, path: str | os.PathLike[str]) -> LMPolicy:
        """A policy saved by :meth:`LMPolicy.save_checkpoint`, with these settings.

        A LoRA checkpoint goes on top of this plugin's base model (:meth:`load`); a full one
        is loaded from ``path`` in ``self.dtype``.
        """
        is_adapter = (Path(path).expanduser() / "adapter_config.json").is_file()
        return LMPolicy.from_checkpoint(
            path, base=self.load() if is_adapter else None, dtype=self.dtype, **self._policy_settings()
        )

    def _policy_settings(self) -> dict[str, Any]:
        return {
            "max_length": self.max_length,
            "max_prompt_length": self.max_prompt_length,
            "truncation": self.truncation,
            "device": self.device,
            "autocast": self.autocast,
            "gradient_checkpointing": self.gradient_checkpointing,
        }
