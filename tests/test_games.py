"""comalkit.games: validation, loading, the LP Nash policy, metrics, the dynamics engine, and the
COMAL paper's convergence claims (its synthetic study) on paper3 and on seeded random 5×5 and 10×10 games.

The claims run the methods with the settings ``experiment=synthetic`` ships (its conf/tuning/
files), built from the composed config exactly as ``python -m comalkit`` builds them.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest
import torch

from comalkit.games import (
    GameError,
    check_matrix,
    check_policy,
    duality_gap,
    game_metrics,
    kl_divergence,
    load_matrix,
    nash_policy,
    record_steps,
    regularized_equilibrium,
    run_dynamics,
)
from comalkit.registry import ConfigError, instantiate
from comalkit.testing import compose

PAPER3 = [[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]]
RPS = [[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[0.5, 0.2, 1.3], [0.8, 0.5, 0.4], [-0.3, 0.6, 0.5]], r"M\[0\]\[2\]=1.3 is outside \[0, 1\]"),
        ([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], r"square .* got shape \[2, 3\]"),
        ([[0.5, 0.2], [0.8]], r"row 1 has 1 entries but row 0 has 2"),
        ([[0.5, float("nan")], [0.5, 0.5]], r"M\[0\]\[1\]=nan is not finite"),
        ([[0.5, 0.3], [0.6, 0.5]], r"M\[0\]\[1\]=0.3 and M\[1\]\[0\]=0.6 sum to 0.9"),
        ([[0.4, 0.3], [0.7, 0.5]], r"M\[0\]\[0\]=0.4, expected 0.5"),
        ([[0.5]], r"at least 2 responses"),
        ([["a", "b"], ["c", "d"]], r"expected numbers"),
    ],
)
def test_check_matrix_rejects_with_the_entry_named(matrix, message):
    with pytest.raises(GameError, match=message):
        check_matrix(matrix)


def test_check_matrix_names_the_game_of_a_batch_and_projects_within_tolerance():
    bad = np.array([PAPER3, PAPER3])
    bad[1, 2, 0] = 0.25
    with pytest.raises(GameError, match=r"game 1: M\[0\]\[2\]=0.8 and M\[2\]\[0\]=0.25"):
        check_matrix(bad)
    nearly = np.array(PAPER3) + np.array([[0, 3e-7, 0], [0, 0, 0], [0, 0, 0]])
    fixed = check_matrix(nearly)
    assert np.array_equal(fixed + fixed.T, np.ones((3, 3)))  # projected exactly onto M + Mᵀ = 1


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ([0.5, 0.5], r"expected 3 probabilities"),
        ([0.5, 0.6, -0.1], r"start\[2\]=-0.1 must be > 0"),
        ([0.5, 0.5, 0.0], r"start\[2\]=0 must be > 0"),
        ([0.2, 0.2, 0.2], r"sums to 0.6, expected 1"),
        ([0.5, float("inf"), 0.5], r"start\[1\]=inf is not finite"),
    ],
)
def test_check_policy_rejects_points_off_the_simplex(policy, message):
    with pytest.raises(GameError, match=message):
        check_policy(policy, 3)


def test_check_policy_renormalises_within_tolerance():
    p = check_policy([0.2, 0.5, 0.3 + 1e-8], 3)
    assert p.sum() == pytest.approx(1.0, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npy", ".csv", ".json", "object.json"])
def test_load_matrix_from_each_file_format(tmp_path, suffix):
    path = tmp_path / ("m" + suffix if suffix.startswith(".") else suffix)
    if suffix == ".npy":
        np.save(path, np.array(PAPER3))
    elif suffix == ".csv":
        path.write_text("# a, b, c\n" + "\n".join(",".join(map(str, row)) for row in PAPER3) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(PAPER3))
    else:
        path.write_text(json.dumps({"matrix": PAPER3, "note": "paper3"}))
    matrix, source = load_matrix(str(path))
    assert source == str(path)
    np.testing.assert_allclose(matrix, PAPER3, atol=1e-15)


def test_load_matrix_inline_list_and_inline_string():
    np.testing.assert_allclose(load_matrix(PAPER3)[0], PAPER3)
    np.testing.assert_allclose(load_matrix("[[0.5, 0.7], [0.3, 0.5]]")[0], [[0.5, 0.7], [0.3, 0.5]])


def test_load_matrix_errors_name_the_file(tmp_path):
    with pytest.raises(GameError, match=r"matrix file .*missing.csv does not exist"):
        load_matrix(str(tmp_path / "missing.csv"))
    with pytest.raises(GameError, match=r"unknown format '.txt', expected one of .npy, .csv, .json"):
        load_matrix(str(tmp_path / "m.txt"))
    bad = tmp_path / "bad.csv"
    bad.write_text("0.5,0.2\n0.8,zebra\n")
    with pytest.raises(GameError, match=r"matrix file .*bad.csv: cannot read it"):
        load_matrix(str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([[0.5, 1.3], [-0.3, 0.5]]))
    with pytest.raises(GameError, match=r"matrix file .*wrong.json: M\[0\]\[1\]=1.3 is outside \[0, 1\]"):
        load_matrix(str(wrong))
    keyless = tmp_path / "keyless.json"
    keyless.write_text(json.dumps({"M": PAPER3}))
    with pytest.raises(GameError, match=r"keyless.json: a JSON object needs a 'matrix' key"):
        load_matrix(str(keyless))


# ---------------------------------------------------------------------------------------------
# Exact solutions and metrics
# ---------------------------------------------------------------------------------------------
def test_nash_policy_of_hand_solvable_games():
    np.testing.assert_allclose(nash_policy(np.array(PAPER3)), [4 / 11, 3 / 11, 4 / 11], atol=1e-14)
    np.testing.assert_allclose(nash_policy(np.array(RPS)), [1 / 3, 1 / 3, 1 / 3], atol=1e-14)
    # a Condorcet winner (response 1 beats both others) is the pure Nash policy
    transitive = np.array([[0.5, 0.4, 0.7], [0.6, 0.5, 0.9], [0.3, 0.1, 0.5]])
    np.testing.assert_allclose(nash_policy(transitive), [0, 1, 0], atol=1e-14)


def test_nash_policy_is_unexploitable_on_random_games():
    rng = np.random.default_rng(3)
    upper = np.triu(rng.normal(0, 2, size=(16, 9, 9)), 1)
    games = check_matrix(1 / (1 + np.exp(-(upper - np.swapaxes(upper, 1, 2)))))
    pi = nash_policy(games)
    assert np.all(pi >= 0) and np.allclose(pi.sum(-1), 1, atol=1e-14)
    # no response wins more than half against π*: gap(π*) = 0
    assert np.abs(np.einsum("bij,bj->bi", games, pi).max(-1) - 0.5).max() < 1e-13


def test_metrics_on_numbers_checked_by_hand():
    m = torch.tensor(PAPER3, dtype=torch.float64)
    start = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    # P(· ≻ start) = [0.39, 0.46, 0.64]: c wins most, gap = 2·0.64 − 1
    assert duality_gap(m, start).item() == pytest.approx(0.28, abs=1e-15)
    nash = torch.tensor([4 / 11, 3 / 11, 4 / 11], dtype=torch.float64)
    metrics = game_metrics(m, start.log(), nash)
    expected_kl = sum(p * np.log(p / q) for p, q in zip(nash.tolist(), start.tolist()))
    assert metrics["kl_to_nash"].item() == pytest.approx(expected_kl, abs=1e-15)
    assert metrics["l1_to_nash"].item() == pytest.approx(float((start - nash).abs().sum()), abs=1e-15)
    assert duality_gap(m, nash).item() == pytest.approx(0.0, abs=1e-15)
    # 0 · log 0 = 0: a pure target gives −log π(y) of its response
    pure = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    assert kl_divergence(pure, start.log()).item() == pytest.approx(-np.log(0.5), abs=1e-15)


def test_regularized_equilibrium_solves_its_fixed_point():
    rng = np.random.default_rng(0)
    upper = np.triu(rng.normal(0, 1, size=(4, 6, 6)), 1)
    games = check_matrix(1 / (1 + np.exp(-(upper - np.swapaxes(upper, 1, 2)))))
    mu = rng.dirichlet(np.ones(6), size=4)
    for tau in (1.0, 0.05, 0.002):
        pi = regularized_equilibrium(games, mu, tau)
        target = mu * np.exp(np.einsum("bij,bj->bi", games, pi) / tau)
        np.testing.assert_allclose(pi, target / target.sum(-1, keepdims=True), rtol=1e-10, atol=1e-14)
    # as τ → 0 it approaches π*; as τ grows it approaches μ
    paper3, start = np.array(PAPER3), np.array([0.2, 0.5, 0.3])
    assert np.abs(regularized_equilibrium(paper3, start, 1e-4) - nash_policy(paper3)).max() < 1e-3
    assert np.abs(regularized_equilibrium(paper3, start, 1e4) - start).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
@cache
def method(solver: str, reference: str) -> tuple[str, str]:
    """The composed ``experiment=synthetic`` config nodes of a method (cached: composing is slow)."""
    cfg = compose(["experiment=synthetic", f"solver={solver}", f"reference={reference}"])
    return cfg.solver, cfg.reference


def build(solver: str, reference: str, **solver_overrides):
    solver_cfg, reference_cfg = method(solver, reference)
    return instantiate(solver_cfg, **solver_overrides), instantiate(reference_cfg)


def test_record_steps():
    assert record_steps(10, 1) == list(range(11))
    assert record_steps(10, 4) == [0, 4, 8, 10]


def test_engine_moves_the_reference_and_applies_the_strength_schedule():
    solver, _ = build("inpo", "prox")
    reference = instantiate(compose(["experiment=synthetic", "reference.strengths=[0.5,0.25]"]).reference)
    traj = run_dynamics(
        np.array(PAPER3), [0.2, 0.5, 0.3], solver, reference, 35, record_every=10, device="cpu"
    )
    assert traj.round_ends == [10, 20, 30]
    assert solver.beta == 0.25  # rounds ≥ 1 use the schedule's last value
    assert traj.steps.tolist() == [0, 10, 20, 30, 35]
    assert traj.policies.shape == (5, 1, 3) and traj.round_policies.shape == (3, 1, 3)
    np.testing.assert_allclose(traj.policies[-1], traj.final_logp.exp(), atol=1e-15)
    np.testing.assert_allclose(traj.policies[0, 0], [0.2, 0.5, 0.3], atol=1e-15)
    # a long run need not hold every outer iterate: keep_policies=False keeps only where μ moved
    lean = run_dynamics(
        np.array(PAPER3), [0.2, 0.5, 0.3], *build("inpo", "prox"), 35, keep_policies=False, device="cpu"
    )
    assert lean.round_ends == [10, 20, 30] and lean.round_policies.shape == (0, 1, 3)
    assert lean.policies is None


def test_a_long_run_reports_its_progress():
    seen = []
    traj = run_dynamics(
        np.array(PAPER3),
        [0.2, 0.5, 0.3],
        *build("inpo", "prox"),
        350,
        record_every=50,
        device="cpu",
        on_progress=lambda done, gap: seen.append((done, gap)),
        progress_every=100,
    )
    assert [done for done, _ in seen] == [100, 200, 300]
    recorded = dict(zip(traj.steps.tolist(), traj.metrics["gap"][:, 0].tolist(), strict=True))
    for done, gap in seen:
        assert gap == pytest.approx(recorded[done], rel=1e-12)


def test_engine_batch_equals_separate_runs():
    rng = np.random.default_rng(1)
    upper = np.triu(rng.normal(0, 1, size=(3, 4, 4)), 1)
    games = check_matrix(1 / (1 + np.exp(-(upper - np.swapaxes(upper, 1, 2)))))
    starts = rng.dirichlet(np.ones(4), size=3)
    batched = run_dynamics(games, starts, *build("inpo", "prox"), 50, device="cpu")
    for g in range(3):
        alone = run_dynamics(games[g], starts[g], *build("inpo", "prox"), 50, device="cpu")
        torch.testing.assert_close(batched.final_logp[g], alone.final_logp[0], rtol=0, atol=1e-13)
        torch.testing.assert_close(
            batched.metrics["gap"][:, g], alone.metrics["gap"][:, 0], rtol=0, atol=1e-13
        )


def test_engine_reports_divergence():
    class Exploding:
        def population_update(self, last_logp, ref_logp, win_rate):
            return last_logp * float("nan")

        def set_strength(self, value):
            pass

    _, reference = build("inpo", "fixed")
    with pytest.raises(FloatingPointError, match="non-finite by iteration 1"):
        run_dynamics(np.array(PAPER3), [0.2, 0.5, 0.3], Exploding(), reference, 3, device="cpu")


# ---------------------------------------------------------------------------------------------
# The paper's claims
# ---------------------------------------------------------------------------------------------
def random_games(family: str, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four seeded ``game=random`` games (decisive preferences, scale 2), all with a mixed Nash policy."""
    game = instantiate(
        compose(
            [
                "experiment=synthetic",
                "game=random",
                f"game.family={family}",
                f"game.size={size}",
                f"game.seed={seed}",
                "game.count=4",
                "game.scale=2",
            ]
        ).game
    )
    batch = game.build()
    assert (nash_policy(batch.matrices) > 1e-9).sum(-1).min() >= 3  # the claims are about mixed equilibria
    return batch.matrices, batch.start


GAMES = {
    "paper3": lambda: (np.array(PAPER3), np.array([0.2, 0.5, 0.3])),
    "cyclic5": lambda: random_games("cyclic", 5, 0),
    "gaussian10": lambda: random_games("gaussian", 10, 5),
}


@pytest.mark.parametrize("game", GAMES)
def test_iter_ipo_keeps_a_gap(game):
    """Iter-IPO (multiplicative weights) cycles away from π*: gap ≥ 0.1 through iterations 9001-10⁴."""
    matrices, start = GAMES[game]()
    traj = run_dynamics(
        matrices, start, *build("iter_ipo", "fixed"), 10_000, keep_policies=False, device="cpu"
    )
    assert traj.metrics["gap"][-1000:].min() >= 0.1


@pytest.mark.parametrize("game", ["paper3", pytest.param("random", marks=pytest.mark.slow)])
def test_sppo_keeps_a_gap(game):
    """SPPO likewise (its exact update needs a Lambert-W solve per step: ~1 ms, so random games are slow)."""
    cases = [GAMES["paper3"]()] if game == "paper3" else [GAMES["cyclic5"](), GAMES["gaussian10"]()]
    for matrices, start in cases:
        traj = run_dynamics(
            matrices, start, *build("sppo", "fixed"), 10_000, keep_policies=False, device="cpu"
        )
        assert traj.metrics["gap"][-1000:].min() >= 0.1


@pytest.mark.parametrize("game", GAMES)
def test_inpo_plateaus_at_the_regularised_equilibrium(game):
    """INPO with a fixed reference converges to π*_τ (τ = r·β), whose gap is > 0: it never reaches π*."""
    matrices, start = GAMES[game]()
    solver, reference = build("inpo", "fixed")
    traj = run_dynamics(matrices, start, solver, reference, 3000, record_every=100, device="cpu")
    pi_tau = regularized_equilibrium(matrices, start, solver.ratio * solver.beta)
    gap_tau = duality_gap(torch.as_tensor(matrices), torch.as_tensor(pi_tau))
    final = traj.final["gap"]
    assert final.min() > 0.01
    torch.testing.assert_close(final, gap_tau.reshape(final.shape), rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        traj.final_logp.exp().numpy(), pi_tau.reshape(traj.final_logp.shape), atol=1e-10
    )
    # a plateau, not a slow approach: the last 1000 iterations did not move the gap
    assert (traj.metrics["gap"][-10:] - final).abs().max() < 1e-10


@pytest.mark.parametrize("game", GAMES)
def test_comal_last_iterate_converges_and_kl_never_increases(game):
    """COMAL (inpo + prox): last-iterate gap < 1e-6, and KL(π*‖π_t) is non-increasing over the
    outer rounds (Theorem 1), up to floating-point rounding."""
    matrices, start = GAMES[game]()
    iterations = 2000 if game == "paper3" else 10_000
    traj = run_dynamics(matrices, start, *build("inpo", "prox"), iterations, record_every=100, device="cpu")
    assert traj.final["gap"].max() < 1e-6
    kl = kl_divergence(traj.nash, traj.round_policies.log())  # [rounds, games]
    assert len(kl) == iterations // 10
    assert (kl[1:] - kl[:-1]).max() <= 1e-12


# ---------------------------------------------------------------------------------------------
# Stopping, recording and the numpy path
# ---------------------------------------------------------------------------------------------
def test_the_run_stops_at_the_first_check_below_the_tolerance():
    solver, reference = build("inpo", "prox")
    traj = run_dynamics(np.array(PAPER3), [0.2, 0.5, 0.3], solver, reference, 10**6, tol=1e-8, check_every=50)
    assert traj.converged and traj.iterations % 50 == 0 and traj.steps[-1] == traj.iterations
    assert traj.final["gap"].item() < 1e-8
    again = run_dynamics(np.array(PAPER3), [0.2, 0.5, 0.3], *build("inpo", "prox"), traj.iterations - 50)
    assert again.final["gap"].item() >= 1e-8  # the check before did not pass yet


def test_a_diverging_run_stops_at_the_next_check():
    class Exploding:
        def population_update(self, last_logp, ref_logp, win_rate):
            return last_logp * float("nan")

    _, reference = build("inpo", "fixed")
    with pytest.raises(FloatingPointError, match="non-finite by iteration 1"):
        run_dynamics(
            np.array(PAPER3), [0.2, 0.5, 0.3], Exploding(), reference, 10**9, tol=1e-8, check_every=10
        )


def test_automatic_recording_is_dense_early_and_sparser_each_decade():
    traj = run_dynamics(
        np.array(PAPER3), [0.2, 0.5, 0.3], *build("iter_ipo", "fixed"), 25_000, record_every=0
    )
    expected = [*range(0, 1001), *range(1010, 10_001, 10), *range(10_100, 25_001, 100)]
    assert traj.steps.tolist() == expected and traj.iterations == 25_000 and traj.converged is None


@pytest.mark.parametrize(
    ("solver", "reference"),
    [
        ("inpo", "prox"),
        ("inpo", "ema"),
        ("iter_ipo", "fixed"),
        ("nash_md", "prox"),
        ("extragradient", "fixed"),
    ],
)
@pytest.mark.parametrize("count", [1, 3])
def test_the_numpy_path_equals_the_torch_path(solver, reference, count):
    rng = np.random.default_rng(11)
    upper = np.triu(rng.normal(0, 1, size=(count, 5, 5)), 1)
    games = check_matrix(1 / (1 + np.exp(-(upper - np.swapaxes(upper, 1, 2)))))
    starts = rng.dirichlet(np.ones(5), size=count)
    runs = {
        backend: run_dynamics(games, starts, *build(solver, reference), 300, record_every=7, backend=backend)
        for backend in ("numpy", "torch")
    }
    fast, slow = runs["numpy"], runs["torch"]
    assert (fast.backend, slow.backend) == ("numpy", "torch")
    assert fast.round_ends == slow.round_ends and fast.steps.tolist() == slow.steps.tolist()
    torch.testing.assert_close(fast.final_logp, slow.final_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.policies, slow.policies, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.round_policies, slow.round_policies, rtol=0, atol=1e-12)
    for key in fast.metrics:
        torch.testing.assert_close(fast.metrics[key], slow.metrics[key], rtol=0, atol=1e-11)


def test_backend_choice():
    solver, reference = build("inpo", "prox")
    assert (
        run_dynamics(np.array(PAPER3), [0.2, 0.5, 0.3], solver, reference, 5, device="cpu").backend == "numpy"
    )
    big, uniform = np.full((500, 50, 50), 0.5), np.full((500, 50), 0.02)  # 1.25M matrix entries: torch
    assert run_dynamics(big, uniform, solver, reference, 5, nash=uniform, device="cpu").backend == "torch"
    sppo, _ = build("sppo", "fixed")  # its Lambert-W update is torch-only
    assert (
        run_dynamics(np.array(PAPER3), [0.2, 0.5, 0.3], sppo, reference, 5, device="cpu").backend == "torch"
    )
    with pytest.raises(ConfigError, match=r"backend=numpy: solver SPPO cannot run on numpy"):
        run_dynamics(np.array(PAPER3), [0.2, 0.5, 0.3], sppo, reference, 5, backend="numpy")
    with pytest.raises(ConfigError, match=r"backend='jax': expected one of auto, numpy, torch"):
        run_dynamics(np.array(PAPER3), [0.2, 0.5, 0.3], solver, reference, 5, backend="jax")


def test_the_fused_numpy_update_follows_a_strength_schedule():
    """INPO's update is fused on numpy (log_linear_update); a new strength each round must reach it."""
    reference_cfg = compose(["experiment=synthetic", "reference.strengths=[0.8,0.4,0.25]"]).reference
    runs = {}
    for backend in ("numpy", "torch"):
        solver, _ = build("inpo", "prox")
        runs[backend] = run_dynamics(
            np.array(PAPER3), [0.2, 0.5, 0.3], solver, instantiate(reference_cfg), 60, backend=backend
        )
        assert solver.beta == 0.25
    torch.testing.assert_close(runs["numpy"].policies, runs["torch"].policies, rtol=0, atol=1e-13)
