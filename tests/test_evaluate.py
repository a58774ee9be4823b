"""Evaluation maths on synthetic responses with deterministic oracles, output files, and the task end to end."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from comalkit.evaluate import (
    RoundRobin,
    WinRate,
    bootstrap_ci,
    hard_wins,
    prompt_win_rates,
    round_robin,
    win_rate,
    win_rate_stats,
    write_results,
)
from comalkit.interfaces import Comparison, PreferenceOracle


class LengthJudge(PreferenceOracle):
    """P(a ≻ b) = ½ + 0.1·sign(len a − len b) + bias: longer wins, and the first position gets ``bias``.

    Judged in both orders the bias cancels: ½[(½ + 0.1s + β) + 1 − (½ − 0.1s + β)] = ½ + 0.1s.
    """

    def __init__(self, bias: float = 0.0) -> None:
        self.bias = bias
        self.asked: list[Comparison] = []

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        self.asked += comparisons
        sign = [(len(c.a) > len(c.b)) - (len(c.a) < len(c.b)) for c in comparisons]
        return torch.tensor([0.5 + 0.1 * s + self.bias for s in sign], dtype=torch.float64)


class RockPaperScissors(PreferenceOracle):
    """The non-transitive game: paper ≻ rock, scissors ≻ paper, rock ≻ scissors, with certainty."""

    BEATS = {("paper", "rock"), ("scissors", "paper"), ("rock", "scissors")}

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        return torch.tensor(
            [
                1.0 if (c.a, c.b) in self.BEATS else 0.0 if (c.b, c.a) in self.BEATS else 0.5
                for c in comparisons
            ]
        )


PROMPTS = ["x", "y"]


def test_win_rate_judges_both_orders_and_cancels_position_bias():
    a, b = ["a long answer", "s"], ["short", "a much longer one"]  # a wins on x, loses on y
    for bias in (0.0, 0.2, -0.3):
        judge = LengthJudge(bias)
        assert win_rate(judge, PROMPTS, a, b) == pytest.approx(0.5)
        assert prompt_win_rates(judge, PROMPTS, a, b).tolist() == pytest.approx([0.6, 0.4])
    judge = LengthJudge(0.2)
    win_rate(judge, ["x"], ["aaa"], ["b"])
    assert [(c.a, c.b) for c in judge.asked] == [("aaa", "b"), ("b", "aaa")]
    assert math.isnan(win_rate(LengthJudge(), [], [], []))  # no prompts, no estimate


def test_multiple_samples_meet_all_samples_and_identical_ones_are_exactly_half():
    judge = LengthJudge(0.25)
    # a's samples "aa" (beats "a": 0.6) and "a" (identical to b's: 0.5, never asked) -> 0.55
    assert win_rate(judge, ["x"], [["aa", "a"]], [["a"]]) == pytest.approx(0.55)
    assert {(c.a, c.b) for c in judge.asked} == {("aa", "a"), ("a", "aa")}
    judge = LengthJudge()
    assert win_rate(judge, PROMPTS, ["same", "same"], ["same", "same"]) == 0.5
    assert judge.asked == []


def test_response_shape_errors():
    with pytest.raises(ValueError, match="responses_b: 1 entries for 2 prompts"):
        win_rate(LengthJudge(), PROMPTS, ["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"responses_a\[1\]: expected a response string or a non-empty list"):
        win_rate(LengthJudge(), PROMPTS, ["a", []], ["a", "b"])


def test_hard_wins_count_prompts_won_and_ties_as_half():
    per_prompt = torch.tensor([0.51, 0.49, 0.5, 0.5 + 1e-12, 0.9], dtype=torch.float64)
    assert hard_wins(per_prompt).tolist() == [1.0, 0.0, 0.5, 0.5, 1.0]
    assert torch.equal(hard_wins(1 - per_prompt), 1 - hard_wins(per_prompt))


def test_a_policy_preferred_on_every_prompt_has_a_soft_rate_near_half_but_a_hard_rate_of_one():
    """The likelihood judge's failure mode (issue 13): probabilities just above ½ on every prompt."""
    stats = WinRate.of(torch.full((40,), 0.52, dtype=torch.float64))
    assert stats.soft == pytest.approx(0.52) and stats.hard == 1.0
    assert stats.hard_ci == (1.0, 1.0) and stats.soft_ci == pytest.approx((0.52, 0.52))
    assert stats.num_prompts == 40


def test_bootstrap_interval_covers_the_mean_is_reproducible_and_mirrors():
    generator = torch.Generator().manual_seed(1)
    values = torch.rand(200, generator=generator, dtype=torch.float64)
    low, high = bootstrap_ci(values).tolist()
    mean = float(values.mean())
    assert low < mean < high
    se = float(values.std()) / math.sqrt(len(values))
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.15)  # close to the normal interval
    assert bootstrap_ci(values).tolist() == [low, high]  # fixed seed: same interval every call
    assert bootstrap_ci(1 - values).tolist() == pytest.approx([1 - high, 1 - low])
    rows = bootstrap_ci(torch.stack([values, 1 - values]))  # rows share resamples: one call, both
    # the batched matrix product may sum in another order than the one-row one: equal to rounding
    assert rows.shape == (2, 2) and rows[0].tolist() == pytest.approx([low, high], rel=1e-12, abs=0)
    assert bootstrap_ci(values, level=0.5).tolist()[0] > low  # a narrower level, a narrower interval
    assert all(math.isnan(v) for v in bootstrap_ci(torch.zeros(0)).tolist())
    with pytest.raises(ValueError, match=r"resamples=0: expected at least 1 bootstrap resample"):
        bootstrap_ci(values, resamples=0)
    with pytest.raises(ValueError, match=r"level=1.5: expected an interval level in \(0, 1\)"):
        bootstrap_ci(values, level=1.5)


def test_win_rate_stats_and_flat_metrics():
    stats = win_rate_stats(LengthJudge(0.2), PROMPTS, ["a long answer", "s"], ["short", "a much longer one"])
    assert stats.soft == pytest.approx(0.5) and stats.hard == 0.5  # wins x (0.6), loses y (0.4)
    assert stats.soft_ci == pytest.approx((0.4, 0.6)) and stats.hard_ci == (0.0, 1.0)
    metrics = stats.metrics("win_rate/initial")
    assert list(metrics) == [
        "win_rate/initial",
        "win_rate/initial_low",
        "win_rate/initial_high",
        "win_rate/initial_hard",
        "win_rate/initial_hard_low",
        "win_rate/initial_hard_high",
    ]
    assert metrics["win_rate/initial"] == stats.soft and metrics["win_rate/initial_hard_high"] == 1.0
    empty = win_rate_stats(LengthJudge(), [], [], [])
    assert empty.num_prompts == 0 and math.isnan(empty.soft) and math.isnan(empty.hard_ci[0])


def test_round_robin_matrix_minimum_and_worst_opponent():
    # per prompt: A longest, B middle, C shortest -> A beats B and C (0.6), B beats C (0.6)
    responses = {"A": ["aaaa", "aaaa"], "B": ["bbb", "bb"], "C": ["c", "c"]}
    judge = LengthJudge(0.1)
    result = round_robin(judge, PROMPTS, responses)
    expected = [[0.5, 0.6, 0.6], [0.4, 0.5, 0.6], [0.4, 0.4, 0.5]]
    assert result.win_rates.tolist() == [pytest.approx(row) for row in expected]
    assert torch.allclose(result.win_rates + result.win_rates.T, torch.ones(3, 3, dtype=torch.float64))
    assert result.min_win_rate == pytest.approx({"A": 0.6, "B": 0.4, "C": 0.4})
    assert result.worst_opponent == {"A": "B", "B": "A", "C": "A"}
    assert result.mean_win_rate == pytest.approx({"A": 0.6, "B": 0.5, "C": 0.4})
    assert result.least_exploitable == "A"
    assert result.stderr.tolist() == [[0.0] * 3] * 3  # every prompt agrees
    assert len(judge.asked) == 3 * 2 * 2  # 3 games x 2 prompts x 2 orders, in one batched call


def test_a_nash_mixture_is_not_exploitable_in_a_cyclic_game():
    """The paper's point on a tiny scale: each pure strategy loses to another; the uniform mix wins ≥ 50%."""
    responses = {
        "rock": [["rock"] * 3],
        "paper": [["paper"] * 3],
        "scissors": [["scissors"] * 3],
        "mixed": [["rock", "paper", "scissors"]],
    }
    result = round_robin(RockPaperScissors(), ["play"], responses)
    assert result.min_win_rate == pytest.approx({"rock": 0.0, "paper": 0.0, "scissors": 0.0, "mixed": 0.5})
    assert result.worst_opponent["rock"] == "paper"
    assert result.least_exploitable == "mixed"
    assert result.samples_per_prompt == 3


def test_stderr_over_prompts():
    # A wins prompt x (0.6) and loses prompt y (0.4): per-prompt std = 0.1414, stderr = 0.1
    result = round_robin(LengthJudge(), PROMPTS, {"A": ["aa", "a"], "B": ["a", "aa"]})
    assert float(result.win_rates[0, 1]) == pytest.approx(0.5)
    assert result.stderr[0, 1].item() == pytest.approx(0.1)
    assert result.stderr[1, 0].item() == pytest.approx(0.1)


def test_round_robin_errors():
    with pytest.raises(ValueError, match="at least two contestants"):
        round_robin(LengthJudge(), PROMPTS, {"A": ["a", "b"]})
    with pytest.raises(ValueError, match="at least one prompt"):
        round_robin(LengthJudge(), [], {"A": [], "B": []})
    with pytest.raises(ValueError, match="same number of samples per prompt"):
        round_robin(LengthJudge(), ["x"], {"A": [["a", "b"]], "B": [["a"]]})


def test_outputs_json_csv_markdown_and_heatmap(tmp_path: Path):
    result = round_robin(LengthJudge(), PROMPTS, {"A": ["aaaa", "aaaa"], "B": ["bbb", "bb"], "C": ["c", "c"]})
    control = WinRate.of(torch.tensor([0.4, 0.6], dtype=torch.float64))
    paths = write_results(result, tmp_path, extra={"seed": 3}, control=control, control_label="A again")
    data = json.loads(paths["json"].read_text())
    assert data["checkpoints"] == ["A", "B", "C"] and data["seed"] == 3
    assert data["control"] == {
        "label": "A again",
        "soft": pytest.approx(0.5),
        "soft_ci": pytest.approx([0.4, 0.6]),
        "hard": 0.5,
        "hard_ci": [0.0, 1.0],
        "num_prompts": 2,
    }
    assert data["min_win_rate"] == pytest.approx({"A": 0.6, "B": 0.4, "C": 0.4})
    assert data["min_win_rate_ci"]["A"] == pytest.approx([0.6, 0.6])
    assert data["win_rates"][0] == pytest.approx([0.5, 0.6, 0.6])
    assert data["hard_win_rates"][0] == [0.5, 1.0, 1.0] and data["win_rates_ci"][0][1] == pytest.approx(
        [0.6, 0.6]
    )
    rows = list(csv.reader(paths["csv"].read_text().splitlines()))
    assert rows[0] == [
        "checkpoint",
        "A",
        "B",
        "C",
        "min_win_rate",
        "min_win_rate_low",
        "min_win_rate_high",
        "worst_opponent",
        "mean_win_rate",
        "min_hard_win_rate",
    ]
    assert rows[3][0] == "C" and float(rows[3][1]) == pytest.approx(0.4) and rows[3][7] == "A"
    markdown = paths["markdown"].read_text()
    assert "| A | – | 0.60 [0.60, 0.60] | 0.60 [0.60, 0.60] | 0.60 [0.60, 0.60] |" in markdown
    assert "| C | 0.00 [0.00, 0.00] | 0.00 [0.00, 0.00] | – | 0.00 [0.00, 0.00] |" in markdown  # hard table
    assert "**untrained control** (A again): soft 0.50 [0.40, 0.60], hard 0.50 [0.00, 1.00]." in markdown
    png = paths["heatmap"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_round_robin_to_dict_is_plain_json():
    per_prompt = torch.tensor([[[0.5] * 4, [0.6, 0.8, 0.7, 0.7]], [[0.4, 0.2, 0.3, 0.3], [0.5] * 4]])
    result = RoundRobin(["a", "b"], per_prompt, samples_per_prompt=1)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["least_exploitable"] == "a" and data["num_prompts"] == 4
    assert data["win_rates"] == [[0.5, pytest.approx(0.7)], [pytest.approx(0.3), 0.5]]
    assert data["hard_win_rates"] == [[0.5, 1.0], [0.0, 0.5]]
    assert data["min_hard_win_rate_ci"] == {"a": [1.0, 1.0], "b": [0.0, 0.0]}
    assert data["interval"]["level"] == 0.95 and len(data["per_prompt_win_rates"][0][1]) == 4
    assert result.mean_win_rate == pytest.approx({"a": 0.7, "b": 0.3})
    assert result.worst_opponent == {"a": "b", "b": "a"}
    with pytest.raises(
        ValueError, match=r"per_prompt: expected shape \[2, 2, prompts >= 1\] .* got \(2, 2\)"
    ):
        RoundRobin(["a", "b"], per_prompt.mean(-1), samples_per_prompt=1)


def test_round_robin_intervals_hard_matrix_and_minimum_interval():
    # A beats B on 15 of 20 prompts by a little (0.55) and loses 5 (0.45); C loses to both everywhere
    prompts = [f"p{i}" for i in range(20)]
    a = ["aaaa" if i < 15 else "a" for i in range(20)]
    b = ["aa"] * 20
    c = [""] * 20
    result = round_robin(LengthJudge(-0.1), prompts, {"A": a, "B": b, "C": c})
    assert float(result.win_rates[0, 1]) == pytest.approx(0.55)  # soft: 15·0.6 + 5·0.4 over 20
    assert float(result.hard_win_rates[0, 1]) == pytest.approx(0.75)  # hard: 15 of 20 prompts
    assert float(result.hard_win_rates[0, 2]) == 1.0 and float(result.hard_win_rates[2, 0]) == 0.0
    for matrix, ci in (
        (result.win_rates, result.win_rates_ci),
        (result.hard_win_rates, result.hard_win_rates_ci),
    ):
        assert torch.all(ci[..., 0] <= matrix + 1e-12) and torch.all(matrix <= ci[..., 1] + 1e-12)
        assert torch.allclose(ci[..., 0] + ci.transpose(0, 1)[..., 1], torch.ones(3, 3, dtype=torch.float64))
    low, high = result.hard_win_rates_ci[0, 1].tolist()
    assert 0.5 < low < 0.75 < high < 1.0  # 15/20 won: the interval excludes a coin flip
    assert result.win_rates_ci[0, 2].tolist() == pytest.approx([0.6, 0.6])  # every prompt the same
    # the minimum's interval is the bootstrap of the minimum, not the interval of the worst cell
    assert result.min_win_rate == pytest.approx({"A": 0.55, "B": 0.45, "C": 0.4})
    assert result.min_win_rate_ci["C"] == pytest.approx((0.4, 0.4))
    lo, hi = result.min_win_rate_ci["A"]
    assert lo <= 0.55 <= hi and (lo, hi) == pytest.approx(tuple(result.win_rates_ci[0, 1].tolist()))
    assert result.min_hard_win_rate == pytest.approx({"A": 0.75, "B": 0.25, "C": 0.0})
    h2h = result.head_to_head("A", "B")
    assert h2h.soft == pytest.approx(0.55) and h2h.hard_ci == (low, high) and h2h.num_prompts == 20


# -- the task, end to end on model=tiny --------------------------------------------------------------
def tiny_checkpoints(root: Path) -> list[Path]:
    """Run A's checkpoint is the untrained adapter (LoRA B = 0: the base model); run B's is perturbed."""
    from comalkit_plugins.models.tiny import TinyModel

    policy = TinyModel().build()
    first = policy.save_checkpoint(root / "runA" / "checkpoints" / "iter_000")
    generator = torch.Generator().manual_seed(0)
    snapshot = {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in policy.snapshot().items()}
    policy.load_snapshot(snapshot)
    second = policy.save_checkpoint(root / "runB" / "checkpoints" / "iter_000")
    return [first, second]


def test_evaluate_task_end_to_end_on_tiny_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from comalkit_plugins.tasks import evaluate as task_module

    from comalkit.testing import run_job

    tiny_checkpoints(tmp_path)
    overrides = [
        "experiment=evaluate",
        "model=tiny",
        "oracle=rule",
        "task.include_initial=true",
        f"task.checkpoints=[{tmp_path / 'runA'},{tmp_path / 'runB'}]",
        "task.max_prompts=2",
        "task.max_new_tokens=4",
        "sampler.batch_size=8",
    ]
    out = tmp_path / "eval"
    summary = run_job(overrides, out)
    assert summary["checkpoints"] == ["initial", "runA/iter_000", "runB/iter_000"]
    data = json.loads((out / "win_rates.json").read_text())
    rates = data["win_rates"]
    # the untrained adapter is the base model: same seed, same responses, exactly even
    assert rates[0][1] == 0.5 and rates[1][0] == 0.5
    assert all(abs(rates[i][j] + rates[j][i] - 1) < 1e-9 for i in range(3) for j in range(3))
    assert data["num_prompts"] == 2 and set(data["sources"]) == set(summary["checkpoints"])
    assert summary["min_win_rate"]["initial"] == min(rates[0][1], rates[0][2])
    assert data["hard_win_rates"][0][1] == 0.5 and data["win_rates_ci"][0][1] == [0.5, 0.5]
    assert set(summary["min_win_rate_ci"]) == set(summary["checkpoints"]) and "min_hard_win_rate" in summary
    assert "win_rates" not in summary and "per_prompt_win_rates" not in summary  # matrices stay in the JSON
    assert (out / "win_rates.csv").is_file() and (out / "win_rates.png").stat().st_size > 0
    assert "hard win rate" in (out / "win_rates.md").read_text()
    # the control: the untrained model with the next seed, against itself; not a contestant
    control = data["control"]
    assert control["label"] == "initial sampled with seed 1 against initial with seed 0"
    assert control["soft_ci"][0] <= control["soft"] <= control["soft_ci"][1] and control["num_prompts"] == 2
    assert summary["control"] == control and "initial-control" not in data["checkpoints"]
    assert "**untrained control** (initial sampled with seed 1" in (out / "win_rates.md").read_text()
    assert len(list((out / "responses").glob("*.json"))) == 4

    def no_sampling(*args, **kwargs):
        raise AssertionError("a rerun must reuse the saved responses")

    monkeypatch.setattr(task_module, "load_policy", no_sampling)
    assert run_job(overrides, out)["min_win_rate"] == summary["min_win_rate"]


def test_evaluate_task_config_errors(tmp_path: Path):
    from comalkit_plugins.tasks.evaluate import resolve_checkpoints, short_names

    from comalkit.registry import ConfigError
    from comalkit.testing import run_job

    with pytest.raises(
        ConfigError, match=r"at least two contestants, got none: give task.checkpoints=\[dir1,dir2"
    ):
        run_job(["experiment=evaluate", "model=tiny", "oracle=rule"], tmp_path / "none")
    with pytest.raises(ConfigError, match=r"'.*nowhere\*' matches no path"):
        resolve_checkpoints([str(tmp_path / "nowhere*")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"is not a checkpoint \(no adapter_config.json or config.json\)"):
        resolve_checkpoints([str(tmp_path / "empty")])
    paths = [
        Path("/r/runA/checkpoints/iter_001"),
        Path("/r/runB/checkpoints/iter_001"),
        Path("/r/runB/final"),
    ]
    assert short_names(paths) == ["runA/iter_001", "runB/iter_001", "runB/final"]
    assert short_names([Path("/r/a/x"), Path("/r/b/y")]) == ["x", "y"]
