"""The online COMAL loop on the tiny model: outputs, resume after a kill, and early config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comalkit.outputs import read_metrics
from comalkit.registry import ConfigError
from comalkit.testing import run_job

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "model=tiny", "oracle=rule", "trainer=fast", "task.iterations=2", "task.samples_per_prompt=3",
    "task.max_new_tokens=8", "task.eval_prompts=2", "data.split_size=3", "reference.strengths=[0.5,0.1]",
]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("online")
    summary = run_job(TINY, out)
    return out, summary


def test_online_run_writes_summary_metrics_and_checkpoints(uninterrupted):
    out, summary = uninterrupted
    assert summary["iterations"] == 2
    assert json.loads((out / "summary.json").read_text())["final_checkpoint"] == summary["final_checkpoint"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1]
    assert [r["strength"] for r in rows] == [0.5, 0.1]  # the per-round schedule reached the solver
    for row in rows:
        assert 0.0 <= row["win_rate/previous"] <= 1.0 and 0.0 <= row["win_rate/initial"] <= 1.0
        assert row["pairs"] > 0 and row["train_steps"] >= 1
        assert {"time/sample", "time/judge", "time/logps", "time/train", "time/evaluate"} <= row.keys()
        assert "loss" in row and "rewards/margins" in row and "kl_to_reference" in row
    for k in range(2):
        assert (out / "checkpoints" / f"iter_{k:03d}" / "adapter_model.safetensors").exists()
    assert (out / "progress.png").read_bytes().startswith(b"\x89PNG")  # the per-iteration overview
    # iteration 0 trains against μ = the initial policy, so the policy must have moved away from it
    initial = load_file(out / "iterations" / "initial.safetensors")
    trained = load_file(out / "iterations" / "000" / "policy.safetensors")
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "comalkit", *TINY, f"hydra.run.dir={out}"]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def test_kill_and_rerun_resumes_to_the_identical_checkpoint(uninterrupted, tmp_path):
    reference_out, _ = uninterrupted
    out = tmp_path / "killed"
    proc = _start(out)
    marker = out / "iterations" / "001" / "samples.json"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    done_before = {p: p.stat().st_mtime_ns for p in (out / "iterations").rglob("*") if p.is_file()}

    proc = _start(out)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    # nothing finished before the kill was redone: no file rewritten (no resampling, no rejudging)
    for path, mtime in done_before.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was rewritten on resume"
    final = load_file(out / "checkpoints" / "iter_001" / "adapter_model.safetensors")
    expected = load_file(reference_out / "checkpoints" / "iter_001" / "adapter_model.safetensors")
    assert final.keys() == expected.keys()
    for key in final:
        assert torch.equal(final[key], expected[key]), key
    assert [r["iteration"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["solver=sppo", "pairs=best_vs_worst"], "win"),
        (["solver=extragradient"], "exact games only"),
        (["data.split_size=100000"], "split_size"),
    ],
)
def test_bad_combinations_fail_before_any_sampling(tmp_path, overrides, message):
    with pytest.raises((ConfigError, ValueError)) as err:
        run_job([*TINY, *overrides], tmp_path)
    assert message in str(err.value)
    assert not (tmp_path / "iterations").exists()


@pytest.mark.slow
def test_one_iteration_on_the_bundled_model_moves_the_policy(tmp_path):
    """The default composition (SmolLM2 policy and judge, INPO + prox, bf16 autocast, lr 2e-4 x 2
    epochs) end to end, only smaller: every judgment succeeds, training fits its pairs, and the
    policy leaves its reference (measured: margin 0.136, accuracy 1.0, KL 0.064 on 8 pairs)."""
    summary = run_job(
        ["task.iterations=1", "data.split_size=8", "task.samples_per_prompt=3", "task.max_new_tokens=32",
         "task.eval_prompts=2"], tmp_path,
    )  # fmt: skip
    assert summary["oracle"]["judgments"] > 0 and summary["oracle"]["failed"] == 0
    assert summary["pairs"] == 8
    assert summary["rewards/margins"] > 0.05 and summary["rewards/accuracies"] >= 0.75
    assert summary["kl_to_reference"] != 0.0
    assert (tmp_path / "checkpoints" / "iter_000" / "adapter_model.safetensors").exists()
    assert (tmp_path / "progress.png").exists()
