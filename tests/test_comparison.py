"""A miniature of the four-method comparison (docs/results.md), so the pipeline keeps working.

The same four experiment configs as the full run (conf/experiment/compare_*.yaml), shrunk to the
tiny model and a mixture of rule oracles, run as one multirun through the real CLI, then the
evaluate task over the four final checkpoints and the initial model.
"""

import json
import os
import subprocess
import sys

import pytest

ENV = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
METHODS = ["compare_iter_ipo", "compare_inpo_small", "compare_inpo_large", "compare_comal"]
ITERATIONS = 4
#: the base config's oracle is a mixture of two LM judges; here two rule oracles take their place
RULE_MIXTURE = "oracle.components=[{oracle:rule,weight:1,kind:longer},{oracle:rule,weight:1,kind:rps}]"
TINY = [
    "model=tiny",
    "trainer=fast",
    "oracle=mixture",  # a multirun composes these overrides once before any experiment applies
    RULE_MIXTURE,
    "task.samples_per_prompt=4",
    "task.max_new_tokens=16",
    "task.eval_prompts=2",
    "data.split_size=4",
]


def comalkit(cwd, *args):
    proc = subprocess.run(
        [sys.executable, "-m", "comalkit", *args], env=ENV, capture_output=True, text=True, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow  # 3–4 min on the shared 2-core machine: five CLI processes
def test_four_methods_one_multirun_then_round_robin(tmp_path):
    sweep = tmp_path / "sweep"
    comalkit(
        tmp_path,
        "-m",
        f"experiment={','.join(METHODS)}",
        *TINY,
        f"task.iterations={ITERATIONS}",
        f"hydra.sweep.dir={sweep}",
    )

    moved = {}
    for job, method in enumerate(METHODS):
        rows = [json.loads(line) for line in (sweep / str(job) / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == list(range(ITERATIONS)), method
        moved[method] = [row["reference_moved"] for row in rows]
    assert moved == {
        "compare_iter_ipo": [True] * ITERATIONS,  # μ = π_t: every iteration
        "compare_inpo_small": [False] * ITERATIONS,  # fixed reference
        "compare_inpo_large": [False] * ITERATIONS,
        "compare_comal": [False, True, False, True],  # after each round of two
    }

    finals = [sorted((sweep / str(job) / "checkpoints").iterdir())[-1] for job in range(len(METHODS))]
    out = tmp_path / "eval"
    checkpoints = ",".join(map(str, finals))
    evaluate = [
        "experiment=evaluate",
        "model=tiny",
        "oracle=mixture",
        RULE_MIXTURE,
        "task.include_initial=true",
    ]
    evaluate += [f"task.checkpoints=[{checkpoints}]", "task.max_prompts=2", "task.max_new_tokens=4"]
    comalkit(tmp_path, *evaluate, f"hydra.run.dir={out}")

    data = json.loads((out / "win_rates.json").read_text())
    rates = data["win_rates"]
    assert data["checkpoints"] == ["initial", *(f"{job}/{final.name}" for job, final in enumerate(finals))]
    assert len(rates) == 5 and all(len(row) == 5 for row in rates)
    # every pair judged, in both orders: the matrix is complementary
    assert all(abs(rates[i][j] + rates[j][i] - 1) < 1e-9 for i in range(5) for j in range(5))
