"""Helpers of the reliability suite: run a job as the command line would and read what it reports.

``failure`` runs a job in-process (compose, preflight, task) and returns the exit code and the
stderr text that ``python -m comalkit`` would print for the error (:func:`comalkit.app.report`);
``cli`` runs the real command line in a subprocess, for what needs a whole process.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

# re-exported: the reliability tests import them from here
from run_overrides import REPO as REPO
from run_overrides import TINY_ONLINE as TINY_ONLINE
from run_overrides import cli as cli

from comalkit.app import report
from comalkit.testing import compose, run_job

TINY_OFFLINE = [
    "experiment=offline",
    "model=tiny",
    "trainer=fast",
    "data.limit=4",
    "data.eval_limit=2",
    "model.max_length=160",
    "model.max_prompt_length=96",
    "model.lora.r=2",
]
SYNTHETIC = ["experiment=synthetic", "task.iterations=20", "task.tol=0", "task.plots=false"]
#: files whose presence would mean a run looks (partly) done
RESULTS = ("summary.json", "state.json", "iterations", "checkpoint", "checkpoints", "metrics.jsonl")


def failure(overrides: list[str], out_dir: Path) -> tuple[int, str]:
    """Run a job that must fail; return ``(exit code, what stderr would show)``."""
    with pytest.raises(BaseException) as info:
        run_job(overrides, out_dir)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = report(info.value)
    return code, stderr.getvalue()


def config_failure(overrides: list[str]) -> tuple[int, str]:
    """Compose and check a config that must be refused before any file exists."""
    from comalkit.app import check_config

    with pytest.raises(BaseException) as info:
        check_config(compose(overrides))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = report(info.value)
    return code, stderr.getvalue()


def assert_one_line(stderr: str, *needles: str) -> None:
    """One clear line, no traceback, naming what it should."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_no_results(out_dir: Path) -> None:
    for name in RESULTS:
        assert not (out_dir / name).exists(), f"{name} was written by a failed run"


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""
