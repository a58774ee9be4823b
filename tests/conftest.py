"""Shared test set-up: offline, quiet, few threads (CI has 2 cores)."""

import os

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
