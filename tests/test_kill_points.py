"""Deterministic kill tests: the run kills itself at every fault point, and a rerun ends bit-identical.

``COMALKIT_FAULT=<stage>:<point>@<iteration>`` makes the process send itself SIGKILL exactly at
that point (comalkit/stages.py). For every point of the initial stage and of every stage of
iteration 2 (which resumes μ and the policy from iteration 1), and of the writes that end it,
the killed run, then a rerun, must end with a final checkpoint and stage files byte-identical
to an uninterrupted run, no committed stage rewritten, and no temporary file left. Runs are forked from a forkserver that has imported torch, transformers and Lightning,
loaded the plugins and composed the config once (tests/kill_worker.py), so a run costs about
a second, not a Python start-up.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import signal
from pathlib import Path

import kill_worker
import pytest

from comalkit.outputs import read_metrics


def _stage_points(stage: str, files: list[str], iteration: str) -> list[str]:
    writes = [f"{stage}:after-write:{name}@{iteration}" for name in files]
    return [
        f"{stage}:before-write@{iteration}",
        *writes,
        f"{stage}:before-commit@{iteration}",
        f"{stage}:after-commit@{iteration}",
    ]


STAGE_FILES = {
    "sample": ["samples.json"],
    "judge": ["wins.safetensors"],
    "pair": ["pairs.json"],
    "logps": ["logps.safetensors"],
    "train": ["policy.safetensors", "train.json"],
    "evaluate": ["eval.json"],
    "reference": ["reference.safetensors", "reference.json"],
}
END = ["metrics.json", "metrics.jsonl", "checkpoint", "progress.png"]


def _iteration_points(k: int) -> list[str]:
    points = [p for stage, files in STAGE_FILES.items() for p in _stage_points(stage, files, str(k))]
    points += [f"iteration:after-write:{name}@{k}" for name in END]
    return points + [f"iteration:before-commit@{k}", f"iteration:after-commit@{k}"]


INITIAL = _stage_points("initial", ["policy.safetensors", "eval.json"], "initial")
#: every point an uninterrupted run passes, in order
ALL_POINTS = INITIAL + _iteration_points(0) + _iteration_points(1)
#: the points killed: the initial stage, all of iteration 2 (k=1), and iteration 1 just before
#: its state.json (a resume that finds every stage of its first iteration but no state)
KILLED = [*INITIAL, *_iteration_points(1), "iteration:before-commit@0"]
#: killed runs of iteration 2 start from a copy of a run that stopped right after iteration 1
AFTER_FIRST = "iteration:after-commit@0"


_CTX = multiprocessing.get_context("forkserver")


def _start_forkserver() -> None:
    """Start the forkserver with tests/ importable and the warm-up on (tests/kill_worker.py).

    The forkserver does not apply the parent's sys.path before its preload, so tests/ goes in
    through PYTHONPATH, set only while the server starts. If another test started a forkserver
    already, the runs still work, each composing its own config.
    """
    from multiprocessing import forkserver

    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "COMALKIT_KILL_WORKER")}
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, saved["PYTHONPATH"]) if p)
    os.environ["COMALKIT_KILL_WORKER"] = "1"
    _CTX.set_forkserver_preload(["kill_worker"])
    try:
        forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run(out: Path, fault: str | None = None, trace: Path | None = None) -> int:
    """Run the tiny job into ``out`` in a forked child; its exit code (−9: killed by SIGKILL)."""
    _start_forkserver()
    proc = _CTX.Process(target=kill_worker.job, args=(str(out), fault, str(trace) if trace else None))
    proc.start()
    proc.join()
    return proc.exitcode


def _log(out: Path) -> str:
    path = Path(str(out) + ".log")
    return path.read_text()[-3000:] if path.exists() else ""


def committed_files(out: Path) -> dict[Path, tuple[int, int]]:
    """Every file of every committed stage directory, with its mtime and inode."""
    stages = [p.parent for p in (out / "iterations").rglob("stage.json") if ".tmp" not in str(p)]
    return {f: (f.stat().st_mtime_ns, f.stat().st_ino) for d in stages for f in d.rglob("*") if f.is_file()}


def stage_data(out: Path) -> dict[str, bytes]:
    """The bytes of every stage file except the manifests (which hold timings)."""
    files = [
        p
        for p in (out / "iterations").rglob("*")
        if p.is_file() and p.name not in ("stage.json", "metrics.json")
    ]
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "uninterrupted"
    trace = out.parent / "trace.txt"
    assert run(out, trace=trace) == 0, _log(out)
    return out, trace.read_text().split()


@pytest.fixture(scope="module")
def after_first(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill") / "after_first"
    assert run(out, fault=AFTER_FIRST) == -signal.SIGKILL, _log(out)
    assert json.loads((out / "state.json").read_text())["completed"] == 0
    return out


def test_the_trace_names_every_fault_point_once_in_order(uninterrupted):
    _, trace = uninterrupted
    assert trace == ALL_POINTS


@pytest.mark.parametrize("point", KILLED)
def test_killed_at_a_point_then_rerun_ends_bit_identical(point, uninterrupted, after_first, tmp_path):
    expected, _ = uninterrupted
    out = tmp_path / "run"
    if point.endswith("@1"):
        shutil.copytree(after_first, out)
    assert run(out, fault=point) == -signal.SIGKILL, f"{point} was never reached:\n{_log(out)}"
    assert not (out / "summary.json").exists()
    before = committed_files(out)

    assert run(out) == 0, _log(out)
    for path, stamp in before.items():  # nothing committed before the kill was redone
        assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp, f"{path} was rewritten on resume"
    final = "checkpoints/iter_001/adapter_model.safetensors"
    assert (out / final).read_bytes() == (expected / final).read_bytes()
    assert stage_data(out) == stage_data(expected)
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
    assert not leftovers(out), leftovers(out)


def test_leftover_temporary_directories_are_removed_on_resume(after_first, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(after_first, out)
    assert run(out, fault="train:after-write:policy.safetensors@1") == -signal.SIGKILL
    (tmp,) = (out / "iterations" / "001").glob(".train.tmp-*")
    assert (tmp / "policy.safetensors").exists() and not (out / "iterations" / "001" / "train").exists()
    assert run(out) == 0, _log(out)
    assert not tmp.exists() and (out / "iterations" / "001" / "train" / "stage.json").exists()


class Payload:
    """Unpickling this creates a file: the proof that something executed code from a run directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_run_directory_with_malicious_pickles_executes_nothing_on_resume(
    uninterrupted, after_first, tmp_path
):
    expected, _ = uninterrupted
    out, marker = tmp_path / "run", tmp_path / "executed"
    shutil.copytree(after_first, out)
    payload = pickle.dumps(Payload(marker))
    pickle.loads(payload)  # the payload is live
    assert marker.exists()
    marker.unlink()
    planted = [
        "iterations/001/wins.pt",
        "iterations/001/pairs.pt",
        "iterations/001/samples.pt",  # the old layout
        "iterations/000/train/policy.pt",
        "iterations/000/reference/reference.pt",
        "iterations/000/judge/wins.pt",
        "iterations/initial.pt",
        "state.pt",
        "checkpoints/iter_000/training_args.bin",
        "checkpoints/iter_000/optimizer.pt",
        "iterations/000/train/scratch.pkl",
    ]
    for name in planted:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(payload)
    assert run(out) == 0, _log(out)
    assert not marker.exists()
    final = "checkpoints/iter_001/adapter_model.safetensors"
    assert (out / final).read_bytes() == (expected / final).read_bytes()


def test_a_failing_stage_commits_nothing(tmp_path):
    from comalkit.stages import Stage, run_stage

    stage = Stage("demo", lambda value, w: w.json("value.json", value), lambda r: r.json("value.json"))

    def fails(scratch: Path):
        scratch.mkdir(parents=True)
        (scratch / "partial").write_text("x")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_stage(tmp_path, stage, fails, iteration=0)
    assert list(tmp_path.iterdir()) == []
    result = run_stage(tmp_path, stage, lambda scratch: {"a": 1.5}, iteration=0)
    assert not result.reused and result.value == {"a": 1.5}
    again = run_stage(tmp_path, stage, fails, iteration=0)  # committed: never recomputed
    assert again.reused and again.value == {"a": 1.5} and again.seconds == result.seconds
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["stage.json", "value.json"]


def test_a_non_finite_snapshot_is_never_committed(tmp_path):
    import torch

    from comalkit.stages import NonFiniteError, Stage, check_finite_snapshot, run_stage

    stage = Stage(
        "train",
        lambda value, w: w.tensors("policy.safetensors", value),
        lambda r: r.tensors("policy.safetensors"),
    )

    def train(scratch: Path):
        snapshot = {"lora_A": torch.ones(2, 2), "lora_B": torch.tensor([1.0, float("nan"), float("inf")])}
        check_finite_snapshot(snapshot, "iteration 1: the trained policy")
        return snapshot

    with pytest.raises(
        NonFiniteError, match=r"iteration 1: the trained policy: 2 non-finite value\(s\) in lora_B"
    ):
        run_stage(tmp_path, stage, train, iteration=0)
    assert list(tmp_path.iterdir()) == []
