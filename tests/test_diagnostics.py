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
