"""Run-directory probes: changed configs, concurrent runs, interrupted writes, signals, full and
read-only disks, non-finite training, and reruns that fail.

Whole processes run where a process is what is tested (the lock, signals, the command line's
own output); they synchronise on the child's output or on a lock the test holds, never on time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from probe import (
    REPO,
    SYNTHETIC,
    TINY_OFFLINE,
    TINY_ONLINE,
    assert_no_results,
    assert_one_line,
    cli,
    failure,
    last_line,
)

from comalkit.outputs import lock_run_dir, read_metrics, unlock_run_dir
from comalkit.testing import run_job


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# changed configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["solver=ipo"], "solver._target_"),
        (["solver.beta=0.05"], "solver.beta: "),
        (["seed=3"], "seed: 0 -> 3"),
    ],
)
def test_rerun_with_another_config_is_refused_and_changes_nothing(change, needle, tmp_path):
    out = tmp_path / "run"
    run_job(SYNTHETIC, out)
    before = snapshot(out)
    code, stderr = failure([*SYNTHETIC, *change], out)
    assert code == 2
    assert_one_line(stderr, "holds results of a different config", needle, "new directory", f"delete {out}")
    assert snapshot(out) == before


def test_results_neutral_keys_may_change_on_resume(tmp_path):
    out = tmp_path / "run"
    run_job(SYNTHETIC, out)
    run_job(
        ["experiment=synthetic", "task.tol=0", "task.iterations=30", "task.plots=true", "task.device=cpu"],
        out,
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert (
        len(rows) == 31
    )  # the start and 30 iterations: a rerun of a non-resumable task starts its metrics afresh...
    assert len(read_metrics(out / "previous" / "metrics.jsonl")) == 21  # ...and keeps the earlier ones


def test_corrupt_fingerprint_names_the_file(tmp_path):
    out = tmp_path / "run"
    run_job(SYNTHETIC, out)
    (out / "fingerprint.json").write_text('{"sha256": "x", "config": {')
    code, stderr = failure(SYNTHETIC, out)
    assert code == 2
    assert_one_line(stderr, "fingerprint.json is corrupt", "delete it")


def test_refused_rerun_on_the_command_line_keeps_the_saved_config(tmp_path):
    out = tmp_path / "run"
    first = cli(*SYNTHETIC, f"hydra.run.dir={out}")
    assert first.returncode == 0, first.stderr
    saved = (out / ".hydra" / "config.yaml").read_text()
    second = cli(*SYNTHETIC, "solver=ipo", f"hydra.run.dir={out}")
    assert second.returncode == 2
    assert_one_line(second.stderr, "holds results of a different config")
    assert (out / ".hydra" / "config.yaml").read_text() == saved, "Hydra overwrote the saved config"


# ---------------------------------------------------------------------------------------------
# concurrent runs
# ---------------------------------------------------------------------------------------------
def test_second_run_into_a_locked_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    lock_run_dir(out)  # this process is "the first run"
    try:
        second = cli(*SYNTHETIC, f"hydra.run.dir={out}")
    finally:
        unlock_run_dir(out)
    assert second.returncode == 2
    assert_one_line(second.stderr, f"another comalkit process (pid {os.getpid()}) is running in {out}")
    assert_no_results(out)
    assert cli(*SYNTHETIC, f"hydra.run.dir={out}").returncode == 0  # free again


HOLDER = """
import sys
from comalkit.outputs import lock_run_dir
lock_run_dir(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused = cli(*SYNTHETIC, f"hydra.run.dir={out}")
        assert refused.returncode == 2 and f"pid {holder.pid}" in refused.stderr
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs in the holder
        holder.wait()
    ran = cli(*SYNTHETIC, f"hydra.run.dir={out}")
    assert ran.returncode == 0, ran.stderr
    assert (out / "summary.json").is_file()


# ---------------------------------------------------------------------------------------------
# interrupted writes
# ---------------------------------------------------------------------------------------------
def test_torn_metrics_row_is_dropped_not_glued(tmp_path):
    out = tmp_path / "run"
    run_job(TINY_ONLINE, out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": 0.6')  # a kill or a full disk mid-append
    run_job([*TINY_ONLINE, "task.iterations=2"], out)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl") if "iteration" in r] == [0, 1]


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    out = tmp_path / "run"
    (out / "iterations" / "000").mkdir(parents=True)
    stale = [out / ".state.json.k2j3.tmp", out / "iterations" / "000" / ".samples.json.ab12.tmp"]
    for path in stale:
        path.write_text("half")
    (out / "checkpoints" / ".iter_000.tmp-x1y2").mkdir(parents=True)
    (out / "checkpoints" / ".iter_000.tmp-x1y2" / "adapter_model.safetensors").write_bytes(b"half")
    keep = out / "notes.tmp.txt"
    keep.write_text("mine")
    run_job(SYNTHETIC, out)
    assert not any(p.exists() for p in stale)
    assert not (out / "checkpoints" / ".iter_000.tmp-x1y2").exists()
    assert keep.read_text() == "mine"


def _run_until(args: list[str], marker: str, signum: int) -> subprocess.CompletedProcess:
    """Start the command line, wait until its log shows ``marker``, send ``signum``, collect it."""
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    env.pop("COMALKIT_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "comalkit", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if marker in line:
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize(
    ("signum", "code", "task", "marker"),
    [
        (signal.SIGTERM, 143, [*TINY_ONLINE, "task.iterations=2"], "iteration 1: sample"),
        (
            signal.SIGINT,
            130,
            ["experiment=synthetic", "task.iterations=2000000", "task.tol=0", "task.plots=false"],
            "iterations",
        ),
    ],
)
def test_signal_exits_cleanly_and_says_how_to_resume(signum, code, task, marker, tmp_path):
    out = tmp_path / "run"
    args = [*task, f"hydra.run.dir={out}"]
    stopped = _run_until(args, marker, signum)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    line = last_line(stopped.stderr)
    assert f"stopped by {signal.Signals(signum).name}" in line and "To resume, run the same command" in line
    assert task[-1] in line or task[1] in line
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
    assert not (out / "summary.json").exists()
    if signum == signal.SIGTERM:
        resumed = cli(*args)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl") if "iteration" in r] == [0, 1]


# ---------------------------------------------------------------------------------------------
# full and read-only disks (a small tmpfs; needs root)
# ---------------------------------------------------------------------------------------------
def test_read_only_run_directory_is_one_line(tmpfs):
    point = tmpfs(read_only=True)
    out = cli(*SYNTHETIC, f"hydra.run.dir={point / 'run'}")
    assert out.returncode == 1
    assert_one_line(out.stderr, "cannot write", str(point / "run"), "Read-only file system")


def test_full_disk_at_start_is_one_line(tmpfs):
    point = tmpfs("64k")
    (point / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))
    try:
        with open(point / "filler2", "ab") as fh:  # fill the last page too
            while True:
                fh.write(b"\0" * 1024)
                fh.flush()
    except OSError:
        pass
    out = cli(*SYNTHETIC, f"hydra.run.dir={point / 'run'}")
    assert out.returncode == 1
    assert_one_line(out.stderr, "cannot write", str(point / "run"), "No space left on device")


def test_disk_filling_during_a_run_names_the_file(tmpfs):
    point = tmpfs("32k")  # room for the run's small files, not for its checkpoint
    code, stderr = failure(TINY_OFFLINE, point / "run")
    assert code == 1
    assert_one_line(stderr, "I/O error: cannot write", str(point / "run"), "No space left on device")
    assert not (point / "run" / "summary.json").exists()


# ---------------------------------------------------------------------------------------------
# non-finite training, and reruns that fail
# ---------------------------------------------------------------------------------------------
DIVERGE = [*TINY_OFFLINE, "trainer.lr=1e6", "trainer.precision=32-true"]


def test_diverging_training_stops_naming_the_step_and_saves_nothing(tmp_path):
    out = tmp_path / "run"
    code, stderr = failure(DIVERGE, out)
    assert code == 1
    assert_one_line(
        stderr, "training stopped at epoch 0, step", "is nan", "trainer.lr=1000000.0", "Nothing was saved"
    )
    assert not (out / "summary.json").exists() and not (out / "checkpoint").exists()


def test_skipping_non_finite_batches_counts_them_and_saves_finite_weights(tmp_path):
    from safetensors.torch import load_file

    summary = run_job([*DIVERGE, "trainer.on_nonfinite=skip"], tmp_path / "run")
    assert summary["skipped_batches"] >= 1
    weights = load_file(tmp_path / "run" / "checkpoint" / "adapter_model.safetensors")
    assert all(bool(w.isfinite().all()) for w in weights.values())


def test_failed_offline_rerun_keeps_the_earlier_results(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Say {w}.", "chosen": w, "rejected": "no"}
        for w in ("hi", "yes", "ok", "fine", "sure", "good")
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_job([*TINY_OFFLINE, f"data.path={data}"], out)
    before = snapshot(out)
    assert {"summary.json", "metrics.jsonl"} <= before.keys()
    with open(data, "a") as fh:
        fh.write('{"prompt": "broken",\n')
    code, stderr = failure([*TINY_OFFLINE, f"data.path={data}"], out)
    assert code == 2
    assert_one_line(stderr, f"{data}:7: invalid JSON")
    assert snapshot(out) == before
