"""The example third-party package (examples/comalkit-example), installed for real with pip.

It is built from a copy of its source (the tree stays clean) and installed with
``pip install --no-deps --no-build-isolation --target`` into a throw-away directory, which
runs then put on ``PYTHONPATH``: .venv is untouched, and comalkit finds the package only
through its installed metadata (the ``comalkit.plugins`` entry point, the ``hydra_plugins``
SearchPathPlugin), as after ``pip install ./examples/comalkit-example``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from comalkit.outputs import read_metrics

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "comalkit-example"
#: the online loop on the tiny model with a rule judge under the noisy wrapper: seconds per iteration
TINY_ONLINE = [
    "model=tiny",
    "oracle=noisy",
    "oracle.base.oracle=rule",
    "trainer=fast",
    "task.iterations=2",
    "task.samples_per_prompt=3",
    "task.max_new_tokens=8",
    "task.eval_prompts=2",
    "data.split_size=3",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the installed example package (its dist-info included)."""
    root = tmp_path_factory.mktemp("example")
    source = root / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--target",
        str(target),
        str(source),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "comalkit_example" / "conf" / "experiment" / "example_preset.yaml").is_file()
    return target


def comalkit(site: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "comalkit", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def option_line(help_text: str, group: str) -> set[str]:
    line = next(ln for ln in help_text.splitlines() if ln.startswith(f"{group}: "))
    return set(line.removeprefix(f"{group}: ").split(", "))


def test_help_lists_every_option_of_the_package(site):
    out = comalkit(site, "--help")
    assert out.returncode == 0, out.stderr
    assert "PluginLoadWarning" not in out.stderr
    assert {"cdpo", "dpo"} <= option_line(out.stdout, "solver")
    assert {"noisy", "rule"} <= option_line(out.stdout, "oracle")
    assert {"growing", "prox"} <= option_line(out.stdout, "reference")
    assert {"example_preset", "synthetic"} <= option_line(out.stdout, "experiment")


def test_solver_and_updater_run_by_name_on_a_game(site, tmp_path):
    """solver=cdpo and reference=growing on the exact game backend (task=synthetic)."""
    out = tmp_path / "game"
    proc = comalkit(
        site,
        "experiment=synthetic",
        "solver=cdpo",
        "solver.epsilon=0.2",
        "reference=growing",
        "game=paper3",
        "task.iterations=63",
        f"hydra.run.dir={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 63
    assert summary["rounds"] == 6  # subgames of 1, 2, 4, 8, 16, 32 iterations end at 63
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0]["policy"] == pytest.approx([0.2, 0.5, 0.3], abs=1e-12)
    assert rows[-1]["policy"] != pytest.approx(rows[0]["policy"], abs=1e-3)  # the dynamics moved


def test_solver_oracle_and_updater_run_by_name_on_the_language_model(site, tmp_path):
    """All three on the online loop with the tiny model: cdpo trains, noisy judges, growing moves μ."""
    out = tmp_path / "lm"
    proc = comalkit(site, *TINY_ONLINE, "solver=cdpo", "reference=growing", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1]
    assert [r["round"] for r in rows] == [0, 1]  # growing: round 0 is iteration 0, round 1 iterations 1-2
    for row in rows:
        assert row["pairs"] > 0 and row["train_steps"] >= 1 and row["loss"] == row["loss"]  # not nan
    config = (out / ".hydra" / "config.yaml").read_text()
    assert "comalkit_example.solver.ConservativeDPO" in config
    assert "comalkit_example.oracle.NoisyOracle" in config
    assert "comalkit_example.reference.GrowingProx" in config


def test_experiment_preset_from_the_packages_yaml(site, tmp_path):
    """experiment=example_preset comes from the package's conf/ through its SearchPathPlugin."""
    proc = comalkit(site, "experiment=example_preset", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ConservativeDPO" in proc.stdout and "epsilon: 0.2" in proc.stdout
    assert "NoisyOracle" in proc.stdout and "flip: 0.2" in proc.stdout and "GrowingProx" in proc.stdout
    out = tmp_path / "preset"
    proc = comalkit(site, "experiment=example_preset", *TINY_ONLINE, f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["iterations"] == 2


def test_unknown_preset_still_fails_early(site):
    proc = comalkit(site, "experiment=example_presett")
    assert proc.returncode == 2
    assert "Did you mean 'example_preset'" in proc.stderr


def test_the_packages_own_contract_tests_pass(site):
    """What the package's author runs: pytest on its tests/, which call comalkit.testing."""
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")]
    proc = subprocess.run(cmd, cwd=site, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
