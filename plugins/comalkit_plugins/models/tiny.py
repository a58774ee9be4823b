"""``model=tiny``: a small randomly initialised Llama for tests (no download, milliseconds).

:func:`tiny_causal_lm` builds a small randomly initialised Llama with an in-code byte-level
tokenizer (:func:`tiny_tokenizer`) and a ChatML chat template: no download, no cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from comalkit.lm.loading import resolve_dtype
from comalkit.lm.settings import PolicySettings
from comalkit.registry import param, plugin

#: ChatML, as SmolLM2 uses it (without SmolLM2's default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@plugin("model", "tiny")
@dataclass
class TinyModel(PolicySettings):
    """A random ``LlamaForCausalLM`` with a byte-level ChatML tokenizer built in code.

    Its outputs are noise; it exists so that every code path (LoRA, masks, sampling,
    checkpoints, training) runs in seconds. ``seed`` fixes its weights.
    """

    hidden_size: int = param(32, ge=4, help="hidden width (divisible by num_heads)")
    num_layers: int = param(2, ge=1, help="decoder layers")
    num_heads: int = param(4, ge=1, help="attention heads")
    intermediate_size: int = param(64, ge=1, help="MLP width")
    max_position_embeddings: int = param(512, ge=2, help="context length (>= max_length)")

    def base_config(self) -> Any:
        return tiny_config(tiny_tokenizer(), **self._shape())

    def load(self) -> tuple[Any, Any]:
        return tiny_causal_lm(**self._shape(), seed=self.seed, dtype=self.dtype)

    def _shape(self) -> dict[str, int]:
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
        }


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges (every UTF-8 byte is a token) and ChatML specials.

    Built in code from the ``tokenizers`` library, so it is deterministic, needs no download
    and encodes any text without unknown tokens. ``<|im_end|>`` is both EOS and pad, as in
    SmolLM2, so code that confuses the two is caught by tests on the tiny model too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=specials,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(
    tokenizer: Any,
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
) -> Any:
    """The ``LlamaConfig`` of :func:`tiny_causal_lm`; embeddings are tied, as in SmolLM2.

    ``vocab_size`` defaults to the tokenizer's size and must not be smaller.
    """
    from transformers import LlamaConfig

    vocab = len(tokenizer) if vocab_size is None else vocab_size
    if vocab < len(tokenizer):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the tiny tokenizer's {len(tokenizer)} tokens"
        )
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_causal_lm(
    vocab_size: int | None = None, seed: int = 0, dtype: str | torch.dtype = "float32", **shape: int
) -> tuple[Any, Any]:
    """A randomly initialised ``LlamaForCausalLM`` (:func:`tiny_config`, which ``shape`` goes to)
    and :func:`tiny_tokenizer`, for fast tests. The same ``seed`` gives the same weights (the
    global RNG is left untouched).
    """
    from transformers import LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer, vocab_size=vocab_size, **shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(resolve_dtype(dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
