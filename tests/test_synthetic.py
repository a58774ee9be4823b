"""task=synthetic end to end: the issue's command, user matrices through game.matrix, game batches,
figures, and the multirun overlay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from comalkit import overlay, plots
from comalkit.games import GameError, nash_policy
from comalkit.outputs import read_metrics
from comalkit.registry import ConfigError
from comalkit.testing import run_job

ROOT = Path(__file__).resolve().parent.parent
PAPER3_NASH = [4 / 11, 3 / 11, 4 / 11]
#: A user's 4-response game: responses 0-2 form a cycle, response 3 is beaten by all; π* = [2, 2, 3, 0]/7.
USER = [[0.5, 0.2, 0.7, 0.6], [0.8, 0.5, 0.3, 0.7], [0.3, 0.7, 0.5, 0.8], [0.4, 0.3, 0.2, 0.5]]
USER_NASH = [2 / 7, 2 / 7, 3 / 7, 0.0]


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_issue_command_reaches_the_nash_policy(tmp_path):
    """``python -m comalkit experiment=synthetic solver=inpo reference=prox game=paper3 hydra.run.dir=D``."""
    out = tmp_path / "D"
    cmd = [
        sys.executable,
        "-m",
        "comalkit",
        "experiment=synthetic",
        "solver=inpo",
        "reference=prox",
        "game=paper3",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gap"] < 1e-6 and summary["objective"] == summary["gap"]
    np.testing.assert_allclose(summary["final_policy"], PAPER3_NASH, atol=1e-4)
    np.testing.assert_allclose(summary["nash_policy"], PAPER3_NASH, atol=1e-12)
    assert isinstance(summary["kl_to_nash"], float) and abs(summary["kl_to_nash"]) < 1e-10
    assert isinstance(summary["iterations"], int)
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(summary["iterations"] + 1))
    assert rows[0]["policy"] == pytest.approx([0.2, 0.5, 0.3], abs=1e-12)
    assert rows[0]["gap"] == pytest.approx(0.28, abs=1e-12)
    assert rows[-1]["round"] == summary["rounds"] == summary["iterations"] // 10
    assert is_png(out / "gap.png") and is_png(out / "simplex.png")
    # it ran until the gap fell below the tolerance, at a convergence check, far below the cap
    assert summary["converged"] is True and summary["gap"] < summary["tol"] == 1e-8
    assert summary["iterations"] % 100 == 0 and summary["iterations"] < summary["iteration_cap"]
    assert summary["expected_to_converge"] is True and "COMAL" in summary["expected_to_converge_reason"]


def test_a_users_5x5_game_runs_until_it_converges(tmp_path):
    """The issue's case: ``game.matrix=file.json`` with a 5×5 game of interior Nash policy ends
    below the tolerance (it used to stop at the default 2,000 iterations with gap ~1e-3)."""
    from comalkit_plugins.games.random_games import RandomGame

    matrix = RandomGame(family="interior", size=5, seed=0).build().matrices[0]  # gap 5e-3 at 2,000
    path = tmp_path / "game.json"
    path.write_text(json.dumps(matrix.tolist()))
    summary = run_job(["experiment=synthetic", f"game.matrix={path}", "task.plots=false"], tmp_path / "run")
    assert summary["converged"] is True and summary["gap"] < 1e-8 and summary["iterations"] > 2000
    assert min(summary["nash_policy"]) > 0.01  # interior
    np.testing.assert_allclose(summary["final_policy"], nash_policy(matrix), atol=1e-6)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["step"] == summary["iterations"] and rows[-1]["gap"] == summary["gap"]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["solver=iter_ipo"], "cycle"),
        (["reference=fixed"], "regularised equilibrium"),
        (["reference.period=1"], "Iter-IPO"),
    ],
)
def test_a_method_not_expected_to_converge_runs_to_the_cap_and_says_so(tmp_path, overrides, reason):
    summary = run_job(["experiment=synthetic", *overrides, "task.plots=false"], tmp_path)
    assert summary["expected_to_converge"] is False and reason in summary["expected_to_converge_reason"]
    assert summary["converged"] is False and summary["gap"] > 1e-3
    assert summary["iterations"] == summary["iteration_cap"] == 10_000


@pytest.mark.parametrize("fmt", ["csv", "npy", "json", "inline"])
def test_user_matrix_through_game_matrix(tmp_path, fmt):
    """``game.matrix=...`` on the experiment's default game replaces its matrix (start: uniform)."""
    if fmt == "inline":
        spec = json.dumps(USER).replace(" ", "")
    else:
        path = tmp_path / f"user.{fmt}"
        if fmt == "csv":
            np.savetxt(path, np.array(USER), delimiter=",")
        elif fmt == "npy":
            np.save(path, np.array(USER))
        else:
            path.write_text(json.dumps({"matrix": USER}))
        spec = str(path)
    summary = run_job(
        ["experiment=synthetic", f"game.matrix={spec}", "task.iterations=3000"], tmp_path / "run"
    )
    assert summary["responses"] == 4 and summary["gap"] < 1e-6
    np.testing.assert_allclose(summary["nash_policy"], USER_NASH, atol=1e-12)
    np.testing.assert_allclose(summary["final_policy"], USER_NASH, atol=1e-4)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["policy"] == pytest.approx([0.25] * 4, abs=1e-12)
    assert is_png(tmp_path / "run" / "gap.png") and not (tmp_path / "run" / "simplex.png").exists()


def test_game_matrix_plugin_with_start(tmp_path):
    summary = run_job(
        [
            "experiment=synthetic",
            "game=matrix",
            "game.matrix=[[0.5,0.9,0.2],[0.1,0.5,0.8],[0.8,0.2,0.5]]",
            "game.start=[0.6,0.3,0.1]",
            "task.iterations=50",
            "task.plots=false",
        ],
        tmp_path,
    )
    assert summary["figures"] == []
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["policy"] == pytest.approx([0.6, 0.3, 0.1], abs=1e-12)


def test_bad_user_input_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"game=matrix needs game.matrix=<path"):
        run_job(["experiment=synthetic", "game=matrix"], tmp_path / "a")
    bad = tmp_path / "bad.csv"
    bad.write_text("0.5,0.7\n0.4,0.5\n")
    with pytest.raises(
        GameError, match=r"matrix file .*bad.csv: M\[0\]\[1\]=0.7 and M\[1\]\[0\]=0.4 sum to 1.1"
    ):
        run_job(["experiment=synthetic", f"game.matrix={bad}"], tmp_path / "b")
    with pytest.raises(GameError, match=r"game.start: expected 3 probabilities"):
        run_job(["experiment=synthetic", "game.start=[0.5,0.5]"], tmp_path / "c")
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


def test_random_game_batch_summary(tmp_path):
    summary = run_job(
        [
            "experiment=synthetic",
            "game=random",
            "game.count=3",
            "game.size=4",
            "game.seed=7",
            "task.iterations=200",
            "task.record_every=50",
        ],
        tmp_path,
    )
    assert summary["games"] == 3 and len(summary["final_policy"]) == 3 and len(summary["gap_per_game"]) == 3
    assert summary["gap"] == max(summary["gap_per_game"])
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 50, 100, 150, 200]
    assert {"gap", "gap_mean", "kl_to_nash", "kl_to_nash_mean"} <= set(rows[-1])
    from comalkit_plugins.games.random_games import RandomGame

    batch = RandomGame(size=4, count=3, seed=7).build()
    np.testing.assert_allclose(summary["nash_policy"], nash_policy(batch.matrices), atol=1e-12)


def test_random_game_families_are_valid_and_seeded():
    from comalkit_plugins.games.random_games import RandomGame

    for family in ("gaussian", "cyclic", "transitive"):
        a = RandomGame(family=family, size=6, count=2, seed=1).build()
        b = RandomGame(family=family, size=6, count=2, seed=1).build()
        np.testing.assert_array_equal(a.matrices, b.matrices)
        np.testing.assert_allclose(a.matrices + np.swapaxes(a.matrices, 1, 2), 1.0, atol=1e-15)
    # transitive (Bradley–Terry) games have the best response as their pure Nash policy
    transitive = RandomGame(family="transitive", size=6, count=4, seed=2).build()
    assert np.allclose(nash_policy(transitive.matrices).max(-1), 1.0)
    # cyclic games of odd size: every response is in the Nash support
    cyclic = RandomGame(family="cyclic", size=5, count=4, seed=2).build()
    assert (nash_policy(cyclic.matrices) > 1e-9).all()


def test_overlay_draws_every_job_of_a_sweep(tmp_path, capsys):
    """The overlay reads job directories laid out as Hydra's multirun writes them."""
    sweep = tmp_path / "multirun"
    for job, solver in enumerate(["iter_ipo", "inpo"]):
        overrides = ["experiment=synthetic", f"solver={solver}", "task.iterations=100"]
        run_job(overrides, sweep / str(job))
        (sweep / str(job) / ".hydra").mkdir()
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    jobs = overlay.find_jobs([sweep])
    assert [j.path.name for j in jobs] == ["0", "1"]
    assert overlay.labels(jobs) == ["solver=iter_ipo", "solver=inpo"]
    assert overlay.main([str(sweep), "--out", str(tmp_path / "fig.png")]) == 0
    assert is_png(tmp_path / "fig.png")
    assert overlay.main([str(sweep), "--metric", "kl_to_nash"]) == 0
    assert is_png(sweep / "overlay_kl_to_nash.png")
    assert overlay.main([str(sweep), "--simplex"]) == 0  # paper3: the trajectories on one simplex
    assert is_png(sweep / "overlay_simplex.png")
    assert overlay.main([str(tmp_path / "nothing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_overlay_draws_a_logged_interval_as_a_band(tmp_path, monkeypatch):
    """A metric logged with ``_low``/``_high`` (the online loop's win rates) gets its interval drawn."""
    job = tmp_path / "job"
    job.mkdir()
    rows = [
        {
            "step": k,
            "win_rate/initial": 0.5 + k / 100,
            "win_rate/initial_low": 0.4,
            "win_rate/initial_high": 0.6,
        }
        for k in range(3)
    ]
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    draw = plots.plot_curves
    monkeypatch.setattr(
        plots, "plot_curves", lambda curves, *a, **k: draw(drawn.extend(curves) or curves, *a, **k)
    )
    overlay.overlay([job], tmp_path / "fig.png", "win_rate/initial", log=False)
    assert is_png(tmp_path / "fig.png")
    assert drawn[0].low.tolist() == [0.4] * 3 and drawn[0].high.tolist() == [0.6] * 3
    overlay.overlay([job], tmp_path / "no_band.png", "step", log=False)  # no interval logged: no band
    assert drawn[1].low is None and drawn[1].high is None


def _options(group: str) -> list[str]:
    from comalkit.__main__ import load_plugins
    from comalkit.registry import registry

    load_plugins()
    return registry.names(group)


@pytest.mark.parametrize(
    ("solver", "reference"),
    [(s, "prox") for s in _options("solver")] + [("inpo", r) for r in _options("reference") if r != "prox"],
)
def test_every_solver_and_reference_composes_and_runs(tmp_path, solver, reference):
    """Each plugin composes with experiment=synthetic's settings and produces finite metrics."""
    overrides = ["experiment=synthetic", f"solver={solver}", f"reference={reference}", "task.iterations=100"]
    summary = run_job([*overrides, "task.plots=false"], tmp_path)
    assert 0 <= summary["gap"] <= 1 and np.isfinite(summary["kl_to_nash"])
    assert sum(summary["final_policy"]) == pytest.approx(1.0, abs=1e-12)
