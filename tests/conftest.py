"""Shared test set-up: offline, quiet, few threads (CI has 2 cores)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a busy 2-core machine two
    threads spin against other processes (measured: the slow tests took 281 s with 2, 46 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as if vLLM were not installed, whether or not it is: a ``None`` entry in
    ``sys.modules`` makes ``importlib.util.find_spec("vllm")`` return None and ``import vllm`` fail."""
    monkeypatch.setitem(sys.modules, "vllm", None)


@pytest.fixture(scope="session")
def tiny_judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random causal LM saved as a local model directory, for the model-based judges
    (read only: every test that takes it shares one)."""
    from comalkit_plugins.models.tiny import tiny_causal_lm

    path = tmp_path_factory.mktemp("tiny-judge")
    model, tokenizer = tiny_causal_lm(seed=5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
