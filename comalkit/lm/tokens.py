"""Tokenisation: prompts and responses through the chat template into masked, padded batches.

A sequence is ``chat_template(prompt, add_generation_prompt=True) + response + end-of-turn``,
right-padded. ``response_mask`` is 1 exactly on the response tokens and the end-of-turn token,
so prompt and padding never count, even when pad and EOS are one token (docs/models.md).
Special-token text inside a prompt or a response stays plain text, so data cannot forge chat
turns (docs/reliability.md).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: A prompt: plain text (one user message) or a list of chat messages (TRL's conversational format).
Prompt = str | Sequence[Mapping[str, str]]
#: A response: plain text, or a one-message list ``[{"role": "assistant", "content": ...}]``.
Response = str | Sequence[Mapping[str, str]]

TRUNCATION_MODES = ("warn", "error")


@dataclass
class TokenizedExample:
    """One prompt/response pair as token ids; the first ``prompt_length`` ids are the prompt."""

    input_ids: list[int]
    prompt_length: int

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


class ChatEncoder:
    """Turns prompts and responses into token ids and batches for one tokenizer and length budget.

    Args:
        tokenizer: a tokenizer with a chat template and a pad token.
        end_of_turn_id: the token that ends a response (:func:`end_of_turn_id`).
        max_length: longest prompt + response in tokens; responses are cut to fit.
        max_prompt_length: longest prompt in tokens.
        truncation: ``"warn"`` keeps a too-long prompt's last tokens, ``"error"`` raises.
    """

    def __init__(
        self, tokenizer: Any, end_of_turn_id: int, max_length: int, max_prompt_length: int, truncation: str
    ) -> None:
        self.tokenizer = tokenizer
        self.end_of_turn_id = end_of_turn_id
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        decoder = getattr(tokenizer, "added_tokens_decoder", {})
        self._special_strings = sorted(
            {t.content for t in decoder.values() if getattr(t, "special", False)}
            | set(getattr(tokenizer, "all_special_tokens", []))
        )

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


def end_of_turn_id(model: Any, tokenizer: Any) -> int:
    """The token generation stops at: the generation config's (first) EOS, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    eos = tokenizer.eos_token_id if eos is None else eos
    if eos is None:
        raise ValueError("neither the model's generation config nor the tokenizer defines an EOS token")
    return int(eos)


def ensure_pad_token(tokenizer: Any, model: Any | None = None) -> None:
    """Give a tokenizer without a pad token its EOS token as pad (and tell the model's configs)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None and getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = tokenizer.pad_token_id
