"""The cycle rate (comalkit/diagnostics.py) on rule oracles: cyclic rps, transitive longer, and the counting."""

from __future__ import annotations

import itertools

import pytest
import torch
from comalkit_plugins.oracles.rule import RuleOracle

from comalkit.diagnostics import beats, cycle_counts, cycle_rate

#: responses of 1..4 words: under kind=rps their classes (word count mod 3) are paper, scissors, rock, paper
WORDS = ["a", "a b", "a b c", "a b c d"]


def brute_force_cycles(matrix: torch.Tensor) -> int:
    """Cyclic triples counted one by one: i ≻ j ≻ k ≻ i in either direction."""
    b = beats(matrix)
    k = matrix.shape[0]
    return sum(
        bool((b[i, j] and b[j, m] and b[m, i]) or (b[j, i] and b[m, j] and b[i, m]))
        for i, j, m in itertools.combinations(range(k), 3)
    )


def test_rps_rule_oracle_is_cyclic_on_its_samples():
    m = RuleOracle(kind="rps").win_matrix("play", WORDS)
    # triples (1,2,3) and (2,3,4) words are paper/scissors/rock: cycles; the two with both papers tie
    assert cycle_counts(m) == (2, 4)
    assert cycle_rate([m]) == pytest.approx(0.5)
    assert cycle_rate([RuleOracle(kind="rps").win_matrix("play", WORDS[:3])]) == 1.0


def test_transitive_rule_oracle_has_no_cycles():
    m = RuleOracle(kind="longer").win_matrix("say", WORDS)
    assert cycle_counts(m) == (0, 4)
    assert cycle_rate([m, m]) == 0.0


def test_rate_is_pooled_over_prompts_by_triples():
    rps = RuleOracle(kind="rps")
    three = rps.win_matrix("x", WORDS[:3])  # 1 cyclic triple of 1
    four = RuleOracle(kind="longer").win_matrix("y", WORDS)  # 0 of 4
    assert cycle_rate([three, four]) == pytest.approx(1 / 5)  # pooled triples, not a mean of rates


def test_undefined_below_three_responses():
    two = RuleOracle(kind="rps").win_matrix("x", WORDS[:2])
    assert cycle_counts(two) == (0, 0)
    assert cycle_rate([two, two]) is None
    assert cycle_rate([]) is None


def test_trace_count_matches_brute_force_on_random_matrices():
    generator = torch.Generator().manual_seed(0)
    for k in (3, 4, 6, 8):
        for _ in range(20):
            upper = torch.rand(k, k, generator=generator, dtype=torch.float64).triu(1)
            m = upper + (1 - upper.T).tril(-1)
            m.fill_diagonal_(0.5)
            assert cycle_counts(m)[0] == brute_force_cycles(m)


def test_both_orders_are_averaged_so_position_bias_makes_no_direction():
    # a judge that gives the first position +0.3 on every pair: raw M[i][j] = 0.8 for i ≠ j
    biased = torch.full((3, 3), 0.8, dtype=torch.float64).fill_diagonal_(0.5)
    assert not beats(biased).any()
    assert cycle_counts(biased) == (0, 1)
    # near-½ rounding is a tie, not a direction
    assert not beats(torch.tensor([[0.5, 0.5 + 1e-12], [0.5 - 1e-12, 0.5]])).any()


def test_non_square_matrix_is_refused():
    with pytest.raises(ValueError, match=r"square K×K, got shape \(2, 3\)"):
        beats(torch.zeros(2, 3))


# -- in the online loop: oracle/cycle_rate per iteration, pooled in the summary ---------------------
LOOP = [
    "model=tiny",
    "trainer=fast",
    "task.iterations=1",
    "task.samples_per_prompt=6",
    "task.max_new_tokens=32",  # long enough for the tiny model's bytes to hold spaces: word counts vary
    "task.eval_prompts=0",
    "data.split_size=3",
]


@pytest.mark.parametrize(("kind", "cyclic"), [("rps", True), ("longer", False)])
def test_the_loop_logs_the_cycle_rate_of_its_judge_stage(tmp_path, kind, cyclic):
    from comalkit.loop import _load_wins
    from comalkit.outputs import read_metrics
    from comalkit.stages import StageReader
    from comalkit.testing import run_job

    summary = run_job([*LOOP, "oracle=rule", f"oracle.kind={kind}"], tmp_path)
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    wins = _load_wins(StageReader(tmp_path / "iterations" / "000" / "judge"))
    assert row["oracle/triples"] == 3 * 20  # 3 prompts, C(6, 3) triples each
    assert row["oracle/cycle_rate"] == cycle_rate(wins)  # from the committed K×K matrices
    assert (row["oracle/cycle_rate"] > 0) is cyclic
    assert summary["oracle/cycle_rate_run"] == row["oracle/cycle_rate"]  # one iteration: pooled = its own
    assert json_summary(tmp_path)["oracle/cycle_rate_run"] == summary["oracle/cycle_rate_run"]


def test_no_cycle_rate_below_three_samples(tmp_path):
    from comalkit.outputs import read_metrics
    from comalkit.testing import run_job

    overrides = [o if "samples_per_prompt" not in o else "task.samples_per_prompt=2" for o in LOOP]
    summary = run_job([*overrides, "oracle=rule", "oracle.kind=rps"], tmp_path)
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert "oracle/cycle_rate" not in row and "oracle/cycle_rate_run" not in summary


def json_summary(out):
    import json

    return json.loads((out / "summary.json").read_text())
