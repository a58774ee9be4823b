"""A bad value in any job of a ``-m`` sweep fails the whole sweep before Hydra creates a job
directory (:class:`comalkit.app.Preflight`, ``on_multirun_start``; docs/reliability.md)."""

from __future__ import annotations

import pytest
from probe import assert_one_line, cli


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["solver.beta=0.1,-1"], "config error: solver.beta=-1.0"),
        (["solver.beta=inf,0.1"], "config error: solver.beta"),
        (["solver=ipo,no_such_solver"], "unknown solver 'no_such_solver'"),
    ],
)
def test_a_bad_job_fails_the_sweep_before_any_directory(tmp_path, overrides, needle):
    out = cli("-m", "experiment=synthetic", *overrides, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert_one_line(out.stderr, needle)
    assert not list(tmp_path.iterdir())


def test_a_good_sweep_runs_every_job(tmp_path):
    out = cli("-m", "experiment=synthetic", "solver.beta=0.1,0.2", "task.iterations=20", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert len(list(tmp_path.glob("multirun/*/*/*/summary.json"))) == 2
