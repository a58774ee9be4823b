"""Silencing third-party output that is not ours to fix: transformers' progress bars, a peft warning.

Each is a context manager that restores what it changed when the block ends, so nothing stays
switched off for the rest of the process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' progress bars (loading, writing and GGUF de-quantizing) in a block.

    transformers' own switch covers loading and writing, but its GGUF converter calls
    ``tqdm.auto.tqdm`` directly and offers no switch (``TQDM_DISABLE`` is read once, when tqdm
    is imported). So, here and nowhere else, that module's ``tqdm`` is swapped for a disabled
    one for the duration of the block and put back after it. Both are process-wide, which is
    safe because models are loaded and saved from one thread at a time.
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
def peft_deprecation_silenced() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing``; the warning is not ours to fix."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield
