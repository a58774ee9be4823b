"""Pair builders on win matrices small enough to check by hand, and the solver compatibility check."""

from __future__ import annotations

import re

import pytest
import torch
from comalkit_plugins.pairs.builders import AllPairs, BestVsSecond, BestVsWorst

from comalkit.__main__ import load_plugins
from comalkit.pairing import PairRecords, check_compatible, ranking, response_win_rates
from comalkit.registry import ConfigError, registry

# Transitive: c ≻ a ≻ b, the best response sampled last so that ranking, not index, decides.
#   rates (row means, itself at ½): a = (.5+.6+.2)/3 = 13/30, b = (.4+.5+.1)/3 = 1/3, c = (.8+.9+.5)/3 = 22/30
TEXTS = ["a", "b", "c"]
M = torch.tensor([[0.5, 0.6, 0.2], [0.4, 0.5, 0.1], [0.8, 0.9, 0.5]])
RATE = {"a": 13 / 30, "b": 1 / 3, "c": 22 / 30}
# Rock-paper-scissors: b ≻ a, c ≻ b, a ≻ c; every rate is ½.
CYCLE = torch.tensor([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])


def build(builder, matrices, responses=None, prompts=None):
    responses = responses or [TEXTS] * len(matrices)
    prompts = prompts or [f"x{i}" for i in range(len(matrices))]
    return builder.build(prompts, responses, matrices)


def test_win_rates_and_ranking():
    rates = response_win_rates(M)
    assert torch.allclose(rates, torch.tensor([RATE["a"], RATE["b"], RATE["c"]]))
    assert ranking(rates) == [2, 0, 1]
    assert ranking(torch.tensor([0.4, 0.6, 0.6, 0.4])) == [1, 2, 0, 3]  # ties keep sampling order


def test_best_vs_worst_and_best_vs_second_pick_by_mean_win_rate():
    (worst,) = build(BestVsWorst(), [M])
    assert worst == {"prompt": "x0", "chosen": "c", "rejected": "b"}
    (second,) = build(BestVsSecond(), [M])
    assert second == {"prompt": "x0", "chosen": "c", "rejected": "a"}


def test_win_probs_are_mean_win_rates_against_the_sampled_set():
    (record,) = build(BestVsSecond(win_probs=True), [M])
    assert record["chosen_winprob"] == pytest.approx(RATE["c"])
    assert record["rejected_winprob"] == pytest.approx(RATE["a"])
    assert BestVsSecond(win_probs=True).provides_win_probs and not BestVsWorst().provides_win_probs


def test_all_pairs_orients_every_pair_by_the_oracle_with_soft_labels():
    records = build(AllPairs(), [M])
    pairs = {(r["chosen"], r["rejected"]) for r in records}
    assert pairs == {("a", "b"), ("c", "a"), ("c", "b")}
    for r in records:
        assert r["chosen_winprob"] == pytest.approx(RATE[r["chosen"]])
        assert r["rejected_winprob"] == pytest.approx(RATE[r["rejected"]])
        assert r["weight"] == pytest.approx(1 / 3)
    assert "weight" not in build(AllPairs(per_prompt_weight=False), [M])[0]


def test_cyclic_preferences_have_no_ranking_but_all_pairs_still_learns():
    assert len(build(BestVsWorst(), [CYCLE])) == 0
    assert {(r["chosen"], r["rejected"]) for r in build(AllPairs(), [CYCLE])} == {
        ("b", "a"),
        ("c", "b"),
        ("a", "c"),
    }
    assert all(r["chosen_winprob"] == 0.5 for r in build(AllPairs(), [CYCLE]))


def test_tied_and_identical_prompts_are_skipped_and_counted():
    even = torch.full((3, 3), 0.5)
    identical = ["same", "same", "same"]
    for builder in (BestVsWorst(), BestVsSecond(), AllPairs()):
        out = build(builder, [even, M, M], responses=[TEXTS, identical, TEXTS])
        assert isinstance(out, PairRecords) and isinstance(out, list)
        assert out.prompts == 3 and out.skipped == 2
        assert {r["prompt"] for r in out} == {"x2"}


def test_second_best_skips_ties_with_the_best_and_duplicate_texts():
    tie = torch.tensor([[0.5, 0.5, 0.8], [0.5, 0.5, 0.8], [0.2, 0.2, 0.5]])  # rates .6, .6, .3
    (record,) = build(BestVsSecond(), [tie], responses=[["p", "q", "r"]])
    assert (record["chosen"], record["rejected"]) == ("p", "r")
    duplicate = torch.tensor([[0.5, 0.5, 0.9], [0.5, 0.5, 0.9], [0.1, 0.1, 0.5]])
    (record,) = build(BestVsSecond(), [duplicate], responses=[["x", "x", "y"]])
    assert (record["chosen"], record["rejected"]) == ("x", "y")
    # a noisy judge ranks one copy of "x" first and the other last: the worst distinct text is "y"
    noisy = torch.tensor([[0.5, 0.6, 0.9], [0.4, 0.5, 0.7], [0.1, 0.3, 0.5]])
    (record,) = build(BestVsWorst(), [noisy], responses=[["x", "y", "x"]])
    assert (record["chosen"], record["rejected"]) == ("x", "y")


def test_all_pairs_drops_even_and_identical_pairs():
    m = torch.tensor([[0.5, 0.5, 0.7], [0.5, 0.5, 0.9], [0.3, 0.1, 0.5]])
    records = build(AllPairs(), [m], responses=[["a", "b", "b2"]])
    assert [(r["chosen"], r["rejected"]) for r in records] == [("a", "b2"), ("b", "b2")]
    assert all(r["weight"] == 0.5 for r in records)
    same_text = torch.tensor([[0.5, 0.7], [0.3, 0.5]])
    assert len(build(AllPairs(), [same_text], responses=[["z", "z"]])) == 0


def test_stacked_matrices_and_stats():
    out = build(BestVsWorst(win_probs=True), torch.stack([M, CYCLE]))
    assert out.stats() == pytest.approx(
        {
            "pairs": 1,
            "pairs/prompts_skipped": 1,
            "pairs/chosen_winprob": RATE["c"],
            "pairs/rejected_winprob": RATE["b"],
        }
    )
    assert build(BestVsWorst(), [M]).stats() == {"pairs": 1, "pairs/prompts_skipped": 0}


@pytest.mark.parametrize(
    ("responses", "matrix", "message"),
    [
        (
            [["a"]],
            torch.full((1, 1), 0.5),
            "prompt 0: 1 response(s); a pair needs at least 2 samples per prompt",
        ),
        (
            [TEXTS],
            torch.full((2, 2), 0.5),
            "prompt 0: win matrix of shape (2, 2) for 3 responses; expected (3, 3)",
        ),
        (
            [TEXTS],
            torch.tensor([[0.5, 0.6, 0.2], [0.6, 0.5, 0.1], [0.8, 0.9, 0.5]]),
            "prompt 0: win matrix violates M[i][j] + M[j][i] = 1",
        ),
        ([TEXTS], M * 2, "prompt 0: win matrix entries must be probabilities in [0, 1]"),
    ],
)
def test_bad_matrices_name_the_prompt(responses, matrix, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BestVsWorst().build(["x"], responses, [matrix])


def test_mismatched_lengths():
    with pytest.raises(ValueError, match="got 2 prompts, 1 response lists and 1 win matrices"):
        BestVsWorst().build(["x", "y"], [TEXTS], [M])


def test_builders_are_registered():
    assert registry.get("pairs", "best_vs_worst") is BestVsWorst
    assert registry.get("pairs", "best_vs_second") is BestVsSecond
    assert registry.get("pairs", "all_pairs") is AllPairs


def test_check_compatible_rejects_soft_label_solvers_without_win_probs():
    load_plugins()  # the real solver plugins, as the app sees them
    sppo = registry.get("solver", "sppo")()
    with pytest.raises(ConfigError) as err:
        check_compatible(sppo, BestVsSecond())
    message = str(err.value)
    assert message.startswith("solver=sppo needs per-response win probabilities")
    assert "but pairs=best_vs_second gives none" in message
    assert "set pairs.win_probs=true" in message and "use pairs=all_pairs" in message
    check_compatible(sppo, BestVsSecond(win_probs=True))
    check_compatible(sppo, AllPairs())
    check_compatible(registry.get("solver", "dpo")(), BestVsWorst())
    check_compatible(registry.get("solver", "sppo_hard")(), BestVsWorst())
