"""Metric sinks: metrics.jsonl and summary.json always; wandb offline without a key, never blocking."""

import json

import pytest
from comalkit_plugins.loggers import WandbLogger

from comalkit.outputs import Run, read_metrics


def test_run_writes_metrics_lines_and_atomic_summary(tmp_path):
    run = Run(tmp_path)
    run.log({"loss": 0.5, "gap": float("nan")}, step=0)
    run.log({"loss": 0.25}, step=1)
    (tmp_path / "metrics.jsonl").open("a").write('{"torn": ')  # a kill mid-line
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 0, "loss": 0.5, "gap": "nan"}, {"step": 1, "loss": 0.25}]
    run.finish({"loss": 0.25})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"loss": 0.25}
    assert not list(tmp_path.glob(".summary.json.*"))  # no temporary file left behind


def test_wandb_offline_run_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="comalkit-test", group="sweep-1")
    logger.start(tmp_path, {"solver": {"beta": 0.1}})
    assert logger._run is not None
    for step in range(3):
        logger.log({"loss": 1.0 / (step + 1), "win_rate/previous": 0.5}, step=step)
    logger.finish({"loss": 0.33, "final_checkpoint": "x"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_wandb_failure_warns_and_does_not_block(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    logger = WandbLogger()
    with pytest.warns(UserWarning, match="wandb logging disabled"):
        logger.start(tmp_path, {})
    logger.log({"loss": 1.0}, step=0)  # a no-op, not an error
    logger.finish({})
