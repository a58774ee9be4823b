"""The judge check set (tuning and held-out halves) and the default judge's acceptance test.

The fast tests check the shipped files; the slow one is the done-when test of the default
judge: at least 90 % right on the held-out half, each pair asked in both orders.
"""

from __future__ import annotations

from collections import Counter

import pytest
from comalkit_plugins.oracles.checks import HALVES, KINDS, check_report, load_check_set
from comalkit_plugins.oracles.rule import RuleOracle

from comalkit.registry import instantiate
from comalkit.testing import compose


@pytest.fixture(scope="module")
def halves() -> dict[str, list[dict]]:
    return {half: load_check_set(half) for half in HALVES}


def test_rows_follow_the_schema(halves: dict[str, list[dict]]) -> None:
    for half, rows in halves.items():
        for n, r in enumerate(rows, 1):
            where = f"{half}.jsonl:{n}"
            assert set(r) == {"kind", "prompt", "good", "bad"}, where
            assert r["kind"] in KINDS, where
            assert all(isinstance(r[k], str) for k in r), where
            assert r["prompt"].strip() and r["good"].strip() and r["good"] != r["bad"], where


def test_at_least_120_pairs_in_two_non_empty_halves(halves: dict[str, list[dict]]) -> None:
    sizes = [len(rows) for rows in halves.values()]
    assert sum(sizes) >= 120 and min(sizes) >= 60


def test_halves_are_stratified_by_kind_and_every_kind_is_present(halves: dict[str, list[dict]]) -> None:
    counts = {half: Counter(r["kind"] for r in rows) for half, rows in halves.items()}
    tune, held = counts["checks_tune"], counts["checks_heldout"]
    assert set(tune) == set(held) == set(KINDS)
    for kind in KINDS:
        assert abs(tune[kind] - held[kind]) <= 1, (kind, tune[kind], held[kind])
    big = [k for k in KINDS if k not in ("gibberish", "empty")]
    assert all(tune[k] + held[k] >= 10 for k in big)  # each main kind has at least 10 pairs


def test_no_pair_is_duplicated_or_in_both_halves(halves: dict[str, list[dict]]) -> None:
    prompts = [r["prompt"] for rows in halves.values() for r in rows]
    answers = [a for rows in halves.values() for r in rows for a in (r["good"], r["bad"]) if a.strip()]
    assert len(prompts) == len(set(prompts))  # a prompt belongs to one pair, in one half
    assert len(answers) == len(set(answers))  # no answer is reused by another pair


def test_check_report_counts_both_orders() -> None:
    rows = [
        {"prompt": "q", "good": "a b c", "bad": "a"},  # longer wins: right in both orders
        {"prompt": "q", "good": "a", "bad": "a b c"},  # wrong in both orders
        {"prompt": "q", "good": "a b", "bad": "c d"},  # a tie: right in neither
    ]
    report = check_report(RuleOracle(kind="longer", temperature=1.0), rows)
    assert report["first"] == report["second"] == report["both"] == pytest.approx(1 / 3)
    assert report["near_half"] == pytest.approx(1 / 3)  # the tie, in both orders
    assert report["log_loss"] > 0


#: the held-out half's first 66 rows, the pairs it had before issue 13 added 20 fresh ones
ORIGINAL_HELD_OUT = 66


@pytest.fixture(scope="module")
def default_judge_report(halves: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    judge = instantiate(compose([]).oracle)  # exactly what `python -m comalkit` judges with
    held = halves["checks_heldout"]
    report = {"all": check_report(judge, held), "original": check_report(judge, held[:ORIGINAL_HELD_OUT])}
    judge.close()
    return report


@pytest.mark.slow
def test_default_judge_is_right_on_90_percent_of_the_held_out_half(
    default_judge_report: dict[str, dict[str, float]],
) -> None:
    # the done-when of issue 13; measured with the shipped code: 79/86 (docs/oracles.md)
    held_out, original = default_judge_report["all"], default_judge_report["original"]
    assert held_out["both"] >= 0.9, f"default judge held out: {held_out}"
    assert held_out["both"] >= 79 / 86 - 1e-9, held_out  # a guard against regressions
    assert original["both"] >= 61 / 66 - 1e-9, original
