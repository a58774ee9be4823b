"""The online COMAL loop on the tiny model: outputs, rounds, failures that never commit, no pickle,
and early config errors. Kill and resume: tests/test_kill_points.py."""

import json
import logging
import re
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comalkit.outputs import read_metrics
from comalkit.registry import ConfigError
from comalkit.testing import run_job

REPO = Path(__file__).resolve().parent.parent
BASE = [
    "model=tiny",
    "oracle=rule",
    "trainer=fast",
    "task.samples_per_prompt=3",
    "task.max_new_tokens=8",
    "task.eval_prompts=2",
    "data.split_size=4",
    "reference.strengths=[0.5,0.1]",
]
TINY = [*BASE, "task.iterations=4"]


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Four iterations of the default rounds (reference.period=2): two rounds of two iterations."""
    out = tmp_path_factory.mktemp("online")
    console, logger = Lines(), logging.getLogger("comalkit")
    level = logger.level
    logger.addHandler(console)
    logger.setLevel(logging.INFO)
    try:
        summary = run_job(TINY, out)
    finally:
        logger.removeHandler(console)
        logger.setLevel(level)
    return out, summary, console.lines


def test_online_run_writes_summary_metrics_and_checkpoints(uninterrupted):
    out, summary, _ = uninterrupted
    assert summary["iterations"] == 4 and summary["rounds"] == 2
    assert json.loads((out / "summary.json").read_text())["final_checkpoint"] == summary["final_checkpoint"]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert [r["round"] for r in rows] == [0, 0, 1, 1]
    assert [r["reference_moved"] for r in rows] == [False, True, False, True]
    assert [r["strength"] for r in rows] == [0.5, 0.5, 0.1, 0.1]  # the per-round schedule reached the solver
    for row in rows:
        assert 0.0 <= row["win_rate/previous"] <= 1.0 and 0.0 <= row["win_rate/initial"] <= 1.0
        for key in ("win_rate/initial", "win_rate/previous", "win_rate/control"):  # soft and hard, intervals
            for rate in (key, f"{key}_hard"):
                assert row[f"{rate}_low"] <= row[rate] <= row[f"{rate}_high"]
        assert row["oracle/cycle_rate"] == 0.0 and row["oracle/triples"] == 4  # rule=longer is transitive
        assert row["pairs"] > 0 and row["train_steps"] >= 1
        stages = ("sample", "judge", "pair", "logps", "train", "evaluate")
        assert all(row[f"time/{name}"] >= 0 for name in stages)
        assert "loss" in row and "rewards/margins" in row and "kl_to_reference" in row
    assert len({r["win_rate/control"] for r in rows}) == 1  # drawn and judged the same every iteration
    assert (
        summary["win_rate/control"] == rows[0]["win_rate/control"] and summary["oracle/cycle_rate_run"] == 0.0
    )
    for k in range(4):
        assert (out / "checkpoints" / f"iter_{k:03d}" / "adapter_model.safetensors").exists()
    assert (out / "progress.png").read_bytes().startswith(b"\x89PNG")  # the per-iteration overview
    # iteration 0 trains against μ = the initial policy, so the policy must have moved away from it
    initial = load_file(out / "iterations" / "initial" / "policy.safetensors")
    trained = load_file(out / "iterations" / "000" / "train" / "policy.safetensors")
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)


def test_an_unchanged_policy_scores_exactly_half_against_the_initial_one(tmp_path):
    """Common random numbers: every iteration samples the held-out prompts with the initial draw's seed."""
    summary = run_job([*BASE, "task.iterations=1", "task.eval_prompts=4", "trainer.lr=1e-12"], tmp_path)
    initial = json.loads((tmp_path / "iterations" / "initial" / "eval.json").read_text())
    evaluation = json.loads((tmp_path / "iterations" / "000" / "evaluate" / "eval.json").read_text())
    assert evaluation["responses"] == initial["responses"]
    assert summary["win_rate/initial"] == 0.5 and summary["win_rate/initial_hard"] == 0.5
    assert (summary["win_rate/initial_low"], summary["win_rate/initial_high"]) == (0.5, 0.5)
    # the untrained control: the same policy drawn with another seed, a measured noise floor
    assert len(initial["control"]) == 4 and initial["control"] != initial["responses"]
    assert summary["win_rate/control_low"] <= summary["win_rate/control"] <= summary["win_rate/control_high"]


def test_the_reference_is_fixed_within_a_round_and_moves_at_its_end(uninterrupted):
    out, _, _ = uninterrupted
    ref = [
        load_file(out / "iterations" / f"{k:03d}" / "reference" / "reference.safetensors") for k in range(4)
    ]
    policy = [load_file(out / "iterations" / f"{k:03d}" / "train" / "policy.safetensors") for k in range(4)]
    initial = load_file(out / "iterations" / "initial" / "policy.safetensors")

    def same(a, b):
        return all(torch.equal(a[key], b[key]) for key in a)

    assert same(ref[0], initial)  # round 1: μ = π_init for both iterations
    assert same(ref[1], policy[1]) and same(ref[2], policy[1])  # end of round 1: μ ← π_2, kept in round 2
    assert same(ref[3], policy[3]) and not same(ref[3], ref[1])


def test_the_console_says_when_a_round_starts_and_when_the_reference_moves(uninterrupted):
    _, _, lines = uninterrupted
    starts = [line for line in lines if "round" in line and "starts" in line]
    assert starts == [
        "round 1 starts at iteration 1, strength 0.5",
        "round 2 starts at iteration 3, strength 0.1",
    ]
    moves = [line for line in lines if "μ moves" in line]
    assert moves == [
        "iteration 2: μ moves to the current policy (round 1 ends)",
        "iteration 4: μ moves to the current policy (round 2 ends)",
    ]


def test_every_stage_is_a_committed_directory_of_safetensors_and_json(uninterrupted):
    out, _, _ = uninterrupted
    for k in range(4):
        d = out / "iterations" / f"{k:03d}"
        for stage in ("sample", "judge", "pair", "logps", "train", "evaluate", "reference"):
            manifest = json.loads((d / stage / "stage.json").read_text())
            assert manifest["stage"] == stage and manifest["iteration"] == k
            assert all((d / stage / name).is_file() for name in manifest["files"])
    suffixes = {p.suffix for p in (out / "iterations").rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors"}, suffixes
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_no_code_reads_run_files_with_pickle():
    """Run files are safetensors and JSON: nothing in comalkit or its plugins unpickles a file
    (torch.load only with weights_only=True)."""
    sources = [*(REPO / "comalkit").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]
    pattern = re.compile(
        r"pickle\.load\(|torch\.load\((?!.*weights_only=True)|weights_only\s*=\s*False|allow_pickle\s*=\s*True"
        r"|joblib\.load|\bshelve\b"
    )
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in sources
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


@pytest.fixture
def down_then_up_judge():
    """A loopback port with no judge behind it, and a way to start the judge there."""
    from comalkit_plugins.oracles.rule import RuleOracle

    from comalkit.judge_prompt import JudgePrompt
    from comalkit.judge_server import JudgeServer, JudgeService

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    servers = []

    def start():
        server = JudgeServer(JudgeService(RuleOracle(), JudgePrompt.load("pairwise")), port=port)
        servers.append(server)
        return server

    yield f"http://127.0.0.1:{port}/v1", start
    for server in servers:
        server.close()


def test_failed_judgments_never_commit_and_a_rerun_retries_them(tmp_path, down_then_up_judge):
    url, start = down_then_up_judge
    judge = [
        "oracle=http_judge",
        f"oracle.base_url={url}",
        "oracle.on_failure=half",
        "oracle.retries=0",
        "oracle.timeout_s=2",
        "oracle.backoff_s=0",
    ]
    overrides = [*BASE, "task.iterations=1", *judge]
    with pytest.raises(
        RuntimeError, match=r"judgment\(s\) of the judge stage failed.*Rerun the same command"
    ):
        run_job(overrides, tmp_path)
    d = tmp_path / "iterations" / "000"
    assert (d / "sample" / "stage.json").exists()
    assert not (d / "judge").exists() and not list(d.glob(".judge*"))  # nothing of the judge stage was kept
    start()
    summary = run_job(overrides, tmp_path)  # the judge is up: the failures are asked again
    assert summary["oracle"]["failed"] == 0 and summary["oracle"]["judgments"] > 0
    assert (d / "judge" / "stage.json").exists() and (tmp_path / "summary.json").exists()


def test_a_non_finite_policy_is_never_committed(tmp_path):
    with pytest.raises(Exception, match=r"(?i)non-finite|nan"):
        run_job([*BASE, "task.iterations=1", "trainer.lr=1e6"], tmp_path)
    d = tmp_path / "iterations" / "000"
    assert (d / "logps" / "stage.json").exists() and not (d / "train").exists()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "summary.json").exists()


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
        [
            "task.iterations=1",
            "data.split_size=8",
            "task.samples_per_prompt=3",
            "task.max_new_tokens=32",
            "task.eval_prompts=2",
        ],
        tmp_path,
    )
    assert summary["oracle"]["judgments"] > 0 and summary["oracle"]["failed"] == 0
    assert summary["pairs"] == 8
    assert summary["rewards/margins"] > 0.05 and summary["rewards/accuracies"] >= 0.75
    assert summary["kl_to_reference"] != 0.0
    assert (tmp_path / "checkpoints" / "iter_000" / "adapter_model.safetensors").exists()
    assert (tmp_path / "progress.png").exists()
