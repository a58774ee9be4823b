"""Sweeps through Hydra launchers: joblib and submitit's local executor run for real; SLURM composes."""

import json
import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

ENV = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def sweep(tmp_path, launcher, *overrides):
    cmd = [sys.executable, "-m", "comalkit", "-m", f"hydra/launcher={launcher}", "experiment=synthetic"]
    cmd += ["solver=iter_ipo,inpo", "task.iterations=40", f"hydra.sweep.dir={tmp_path}", *overrides]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / str(job) / "summary.json").read_text()) for job in (0, 1)]


def test_joblib_runs_each_job_in_its_own_process(tmp_path):
    summaries = sweep(tmp_path, "parallel")
    assert [s["iterations"] for s in summaries] == [40, 40]
    assert summaries[0]["gap"] != summaries[1]["gap"]  # two different solvers ran


def test_submitit_local_runs_jobs_and_keeps_their_logs(tmp_path):
    summaries = sweep(tmp_path, "local", "hydra.launcher.timeout_min=10")
    assert [s["iterations"] for s in summaries] == [40, 40]
    assert list((tmp_path / ".submitit").glob("*/*_log.out"))


def test_slurm_launcher_takes_its_layout_from_the_trainer():
    """SLURM itself is not here: one task per job (comalkit starts the ranks), one GPU per device."""
    cmd = [
        sys.executable,
        "-m",
        "comalkit",
        "hydra/launcher=slurm",
        "trainer.devices=4",
        "trainer.num_nodes=2",
    ]
    proc = subprocess.run([*cmd, "--cfg", "all", "--resolve"], env=ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (1, 4, 1)
