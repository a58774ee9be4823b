"""Overrides, names and the command line shared by the tests that run whole jobs: one place for each.

Imported as ``run_overrides`` (pytest puts ``tests/`` on ``sys.path`` through its conftest).
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: one online iteration small enough for the fast tier: 3 prompts × 3 responses of 8 tokens, 2 held out
ONE_SMALL_ITERATION = [
    "task.iterations=1",
    "task.samples_per_prompt=3",
    "task.max_new_tokens=8",
    "task.eval_prompts=2",
    "data.split_size=3",
]
#: that iteration on the tiny random model, judged by the rule oracle, with the fast trainer
TINY_ONLINE = ["model=tiny", "oracle=rule", "trainer=fast", *ONE_SMALL_ITERATION]
#: the per-step metric names training logs under TRL's names (comalkit/training/module.py), so runs compare
TRL_METRICS = frozenset(
    {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }
)


def cli(
    *args: str, cwd: Path = REPO, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m comalkit *args`` in a subprocess, offline, with its output captured (no
    ``COMALKIT_DEBUG``: errors are the one line a user sees)."""
    environment = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env or {})}
    environment.pop("COMALKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "comalkit", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
