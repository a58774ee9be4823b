"""Each solver's loss on numbers small enough to check by hand, and the properties of its update."""

import math

import pytest
import torch
from comalkit_plugins.solvers.sppo import lambert_w
from omegaconf import OmegaConf

from comalkit.__main__ import load_plugins
from comalkit.interfaces import (
    LAST_ITERATE_LOGPS,
    REFERENCE_LOGPS,
    WIN_PROBS,
    GameOnlySolver,
    PairLogps,
    SubgameSolver,
    require_language_model_solver,
)
from comalkit.registry import ConfigError, instantiate, registry, validate

load_plugins()

PAPER3 = torch.tensor([[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]], dtype=torch.float64)
NASH3 = torch.tensor([4 / 11, 3 / 11, 4 / 11], dtype=torch.float64)


def solver(name, **kwargs):
    return registry.get("solver", name)(**kwargs)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def win_rate_of(m):
    return lambda logp: (m @ logp.softmax(-1)[..., None])[..., 0]


def pairs(pc, pr, **kw):
    return PairLogps(t(*pc), t(*pr), **{k: t(*v) for k, v in kw.items()})


# ---------------------------------------------------------------------------------------------
# Losses by hand
# ---------------------------------------------------------------------------------------------
def test_dpo_by_hand():
    # Δ_θ = -1 - (-2) = 1, Δ_ref = 0, β = 0.5: loss = log(1 + e^-0.5); rewards ±0.25
    out = solver("dpo", beta=0.5).loss(pairs([-1.0], [-2.0], ref_chosen=[-1.5], ref_rejected=[-1.5]))
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-0.5)))
    assert out.chosen_rewards.item() == pytest.approx(0.25)
    assert out.rejected_rewards.item() == pytest.approx(-0.25)


def test_dpo_is_ln2_when_policy_equals_reference():
    logps = torch.randn(2, 6, dtype=torch.float64)
    batch = PairLogps(logps[0], logps[1], ref_chosen=logps[0], ref_rejected=logps[1])
    out = solver("dpo", beta=0.3).loss(batch)
    assert torch.allclose(out.losses, torch.full((6,), math.log(2), dtype=torch.float64))
    assert not out.chosen_rewards.any() and not out.rejected_rewards.any()


def test_ipo_by_hand_summed_and_per_token():
    ipo = solver("ipo", tau=0.5)  # target margin 1/(2τ) = 1
    batch = pairs(
        [-1.0, 0.0],
        [-4.0, -4.0],
        ref_chosen=[-2.0, -1.0],
        ref_rejected=[-3.0, -1.0],
        chosen_tokens=[2, 2],
        rejected_tokens=[4, 4],
    )
    # summed: Δ_θ - Δ_ref = 3 - 1 = 2 -> (2 - 1)^2 = 1;  4 - 0 = 4 -> 9
    assert ipo.loss(batch).losses.tolist() == pytest.approx([1.0, 9.0])
    # per token: (1/2 - (-1)/4) = 0.75 -> 0.0625;  (1/2 - (-3)/4) = 1.25 -> 0.0625
    ipo.average_log_prob = True
    assert ipo.loss(batch).losses.tolist() == pytest.approx([0.0625, 0.0625])
    # rewards are τ · summed log-ratio, as TRL logs them for IPO
    assert ipo.loss(batch).chosen_rewards.tolist() == pytest.approx([0.5, 0.5])


def test_ipo_per_token_needs_token_counts():
    batch = pairs([-1.0], [-2.0], ref_chosen=[-1.0], ref_rejected=[-2.0])
    with pytest.raises(ValueError, match="chosen_tokens"):
        solver("ipo", average_log_prob=True).loss(batch)


def test_iter_ipo_regresses_against_the_last_iterate():
    batch = pairs([0.0], [-3.0], last_chosen=[-1.0], last_rejected=[-1.0])
    # Δ_θ - Δ_t = 3, target margin 1/(2·0.25) = 2 -> (3 - 2)^2 = 1
    assert solver("iter_ipo", tau=0.25).loss(batch).losses.item() == pytest.approx(1.0)


def test_sppo_soft_and_hard_by_hand():
    # β = 0.5: η = 2. Log-ratios against the last iterate: chosen 1.5, rejected 0.5.
    batch = pairs(
        [0.0], [0.0], last_chosen=[-1.5], last_rejected=[-0.5], chosen_winprob=[0.75], rejected_winprob=[0.25]
    )
    # soft targets η(p - ½) = ±0.5: (1.5 - 0.5)^2 + (0.5 + 0.5)^2 = 2
    assert solver("sppo", beta=0.5).loss(batch).losses.item() == pytest.approx(2.0)
    # hard targets ±η/2 = ±1: (1.5 - 1)^2 + (0.5 + 1)^2 = 2.5
    assert solver("sppo_hard", beta=0.5).loss(batch).losses.item() == pytest.approx(2.5)


def test_inpo_by_hand():
    inpo = solver("inpo", beta=0.25, ratio=0.5)  # target margin 2
    batch = pairs(
        [0.0, 0.0],
        [-3.0, -3.0],
        ref_chosen=[0.0, 0.0],
        ref_rejected=[-2.0, -2.0],
        last_chosen=[0.0, 0.0],
        last_rejected=[0.0, -2.0],
    )
    # h = 3 - ½·2 - ½·0 = 2 -> 0;   h = 3 - ½·2 - ½·2 = 1 -> (1 - 2)^2 = 1
    out = inpo.loss(batch)
    assert out.losses.tolist() == pytest.approx([0.0, 1.0])
    # reward = β (ℓ_θ - r ℓ_ref - (1 - r) ℓ_t) for the rejected of pair 2: 0.25·(-3 + 1 + 1)
    assert out.rejected_rewards[1].item() == pytest.approx(-0.25)


def test_mpo_is_the_mmd_step_in_inpo_form():
    mpo = solver("mpo", eta=1.0, alpha=1.0)  # r = ηα/(1+ηα) = ½, c = (1+ηα)/η = 2
    assert (mpo.ratio, mpo.coefficient) == (0.5, 2.0)
    batch = pairs(
        [0.0], [-1.0], ref_chosen=[0.0], ref_rejected=[-1.0], last_chosen=[0.0], last_rejected=[0.0]
    )
    # h = 1 - ½·1 - 0 = ½, margin 1/(2c) = ¼ -> (¼)^2
    assert mpo.loss(batch).losses.item() == pytest.approx(1 / 16)


def test_weights_and_batch_checks():
    dpo = solver("dpo", beta=1.0)
    batch = pairs([0.0, 0.0], [0.0, -5.0], ref_chosen=[0.0, 0.0], ref_rejected=[0.0, 0.0], weight=[1.0, 0.0])
    assert dpo.loss(batch).mean(batch.weight).item() == pytest.approx(math.log(2))  # zero weight: ignored
    batch.weight = t(-1.0, 1.0)
    with pytest.raises(ValueError, match="negative"):
        dpo.loss(batch)
    with pytest.raises(ValueError, match="ref_chosen"):
        dpo.loss(pairs([0.0], [0.0]))
    with pytest.raises(ValueError, match=r"last_rejected has shape \(2,\)"):
        solver("iter_ipo").loss(pairs([0.0], [0.0], last_chosen=[0.0], last_rejected=[0.0, 1.0]))
    with pytest.raises(ValueError, match="chosen_winprob"):
        solver("sppo").loss(pairs([0.0], [0.0], last_chosen=[0.0], last_rejected=[0.0]))


def test_declared_inputs_match_what_each_loss_reads():
    expected = {  # (reference, last iterate, win probabilities)
        "dpo": (True, False, False),
        "ipo": (True, False, False),
        "iter_ipo": (False, True, False),
        "sppo": (False, True, True),
        "sppo_hard": (False, True, False),
        "inpo": (True, True, False),
        "mpo": (True, True, False),
    }
    for name, flags in expected.items():
        s = solver(name)
        declared = (REFERENCE_LOGPS in s.inputs, LAST_ITERATE_LOGPS in s.inputs, WIN_PROBS in s.inputs)
        assert declared == flags, name
        assert not isinstance(s, GameOnlySolver)
        # a batch with exactly the flagged inputs is accepted (the loop computes only those)
        kw = {"ref": flags[0], "last": flags[1]}
        extra = {f"{k}_{side}": [-1.0] for k, on in kw.items() if on for side in ("chosen", "rejected")}
        if flags[2]:
            extra |= {"chosen_winprob": [0.6], "rejected_winprob": [0.4]}
        assert s.loss(pairs([-0.5], [-2.0], **extra)).losses.isfinite().all()


def test_game_only_solvers_refuse_pairs():
    for name in ("nash_md", "extragradient"):
        s = solver(name)
        assert isinstance(s, GameOnlySolver)
        with pytest.raises(NotImplementedError, match="exact-game solver"):
            s.loss(pairs([0.0], [0.0], ref_chosen=[0.0], ref_rejected=[0.0]))


def test_set_strength_and_config_ranges():
    for name, field in [
        ("dpo", "beta"),
        ("ipo", "tau"),
        ("iter_ipo", "tau"),
        ("sppo", "beta"),
        ("inpo", "beta"),
        ("mpo", "alpha"),
        ("nash_md", "tau"),
    ]:
        s = solver(name)
        s.set_strength(0.7 if name != "nash_md" else 0.5)
        assert getattr(s, field) == (0.7 if name != "nash_md" else 0.5), name
        with pytest.raises(ConfigError, match="must be > 0"):
            s.set_strength(0.0)
    with pytest.raises(ConfigError, match="no KL strength"):
        solver("extragradient").set_strength(0.1)
    with pytest.raises(ConfigError, match="ητ ≤ 1"):
        solver("nash_md", eta=2.0, tau=1.0)
    cfg = OmegaConf.create({"solver": OmegaConf.structured(registry.schema("solver", "inpo"))})
    assert instantiate(cfg.solver).ratio == pytest.approx(1 / 3)
    cfg.solver.ratio = 1.5
    with pytest.raises(ConfigError, match=r"solver.ratio=1.5: expected a value <= 1.0"):
        validate(cfg)


# ---------------------------------------------------------------------------------------------
# Population updates
# ---------------------------------------------------------------------------------------------
def test_ipo_update_by_hand():
    # from uniform π_t, P(y ≻ π_t) is the row mean of M; μ uniform, τ = 1: π ∝ exp(row mean)
    uniform = torch.full((3,), 1 / 3, dtype=torch.float64).log()
    rows = [sum(r) / 3 for r in PAPER3.tolist()]
    expected = t(*[math.exp(r) for r in rows])
    got = solver("ipo", tau=1.0).population_update(uniform, uniform, win_rate_of(PAPER3)).exp()
    assert torch.allclose(got, expected / expected.sum(), atol=1e-15)


def test_dpo_update_on_bradley_terry_is_the_dpo_closed_form():
    # with P(i ≻ j) = σ(r_i - r_j), DPO's minimiser is π ∝ μ exp(r/β) (Rafailov et al., Eq. 4), for any π_t
    g = torch.Generator().manual_seed(3)
    r = torch.randn(6, generator=g, dtype=torch.float64)
    m = torch.sigmoid(r[:, None] - r[None, :])
    last, ref = torch.randn(2, 6, generator=g, dtype=torch.float64).log_softmax(-1)
    for beta in (0.1, 1.0, 5.0):
        got = solver("dpo", beta=beta).population_update(last, ref, win_rate_of(m))
        assert torch.allclose(got, (ref + r / beta).log_softmax(-1), atol=1e-9), beta


def test_dpo_update_on_a_deterministic_transitive_game_is_finite_and_collapses():
    # DPO's logits diverge when y_0 always wins: the update stops where the curvature underflows
    m = torch.tensor([[0.5, 1.0, 1.0], [0.0, 0.5, 1.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    start = t(0.2, 0.5, 0.3).log()
    got = solver("dpo", beta=1.0).population_update(start, start, win_rate_of(m))
    assert got.isfinite().all() and got.exp()[0] > 1 - 1e-12


def test_sppo_update_is_not_multiplicative_weights_but_its_stationary_point():
    last = t(0.2, 0.5, 0.3).log()
    sppo = solver("sppo", beta=0.2)  # η = 5
    p = win_rate_of(PAPER3)(last)
    got = sppo.population_update(last, last, win_rate_of(PAPER3))
    mwu = (last + p / sppo.beta).log_softmax(-1)
    assert (got.exp() - mwu.exp()).abs().max() > 1e-2
    # stationarity: log π + λ π/π_t = a with one λ ≥ 0 for every response
    target = last + (p - 0.5) / sppo.beta
    lam = (target - got) * last.exp() / got.exp()
    assert torch.allclose(lam, lam.mean().expand(3), atol=1e-12) and lam.mean() > 0
    assert torch.allclose(
        solver("sppo_hard", beta=0.2).population_update(last, last, win_rate_of(PAPER3)), got
    )


def test_lambert_w():
    from scipy.special import lambertw

    log_x = torch.linspace(-700, 700, 14001, dtype=torch.float64)
    expected = torch.from_numpy(lambertw(log_x.exp().numpy()).real)
    assert torch.allclose(lambert_w(log_x), expected, rtol=1e-14, atol=0)
    log_x = torch.logspace(0, 6, 61, dtype=torch.float64)  # x beyond float64: W e^W = x in logs
    w = lambert_w(log_x)
    assert torch.allclose(w.log() + w, log_x, rtol=1e-14, atol=0)
    assert lambert_w(torch.tensor(1.0, dtype=torch.float64)).item() == pytest.approx(
        1.0, abs=1e-15
    )  # W(e) = 1


def _iterate(s, logp, ref, m, steps):
    for _ in range(steps):
        logp = s.population_update(logp, ref, win_rate_of(m))
    return logp


@pytest.mark.parametrize(
    ("name", "kwargs", "tau"),
    [
        ("inpo", {"beta": 0.5, "ratio": 0.5}, 0.25),
        ("mpo", {"eta": 1.0, "alpha": 0.4}, 0.4),
    ],
)
def test_regularised_methods_converge_to_the_regularised_equilibrium(name, kwargs, tau):
    """With μ fixed, the last iterate reaches π*_τ: π ∝ μ exp(P(· ≻ π)/τ)."""
    mu = t(0.5, 0.2, 0.3).log()
    pi = _iterate(solver(name, **kwargs), t(0.2, 0.5, 0.3).log(), mu, PAPER3, 400)
    assert torch.allclose(pi, (mu + win_rate_of(PAPER3)(pi) / tau).log_softmax(-1), atol=1e-10)


def test_nash_md_fixed_point_and_its_approach_to_the_regularised_equilibrium():
    """Nash-MD's fixed point solves π ∝ μ exp(P(· ≻ π^μ)/τ) (π^μ the mixture); it tends to π*_τ as η → 0."""
    mu, tau = t(0.5, 0.2, 0.3).log(), 0.3
    errors = []
    for eta in (1.0, 0.1):
        s = solver("nash_md", eta=eta, tau=tau)
        pi = _iterate(s, t(0.2, 0.5, 0.3).log(), mu, PAPER3, int(400 / eta))
        mix = ((1 - eta * tau) * pi + eta * tau * mu).log_softmax(-1)
        assert torch.allclose(pi, (mu + win_rate_of(PAPER3)(mix) / tau).log_softmax(-1), atol=1e-10)
        errors.append((pi - (mu + win_rate_of(PAPER3)(pi) / tau).log_softmax(-1)).abs().max())
    assert errors[1] < errors[0] / 5


def test_extragradient_reaches_nash_and_updates_are_batched():
    start = t(0.2, 0.5, 0.3).log()
    pi = _iterate(solver("extragradient", eta=0.5), start, start, PAPER3, 3000).exp()
    assert torch.allclose(pi, NASH3, atol=1e-8)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, 5, generator=g, dtype=torch.float64)
    m = torch.sigmoid(a - a.transpose(-1, -2))
    last, ref = torch.randn(2, 4, 5, generator=g, dtype=torch.float64).log_softmax(-1)
    for name in registry.names("solver"):
        s = solver(name)
        batched = s.population_update(last, ref, win_rate_of(m))
        assert torch.allclose(batched.logsumexp(-1), torch.zeros(4, dtype=torch.float64), atol=1e-12), name
        for k in range(4):
            single = s.population_update(last[k], ref[k], win_rate_of(m[k]))
            assert torch.allclose(batched[k], single, atol=1e-10), name
        assert s.population_update(last.float(), ref.float(), win_rate_of(m.float())).dtype == torch.float32


def test_solvers_declare_inputs_not_flags():
    with pytest.raises(TypeError, match="declare the inputs"):

        class Flagged(SubgameSolver):
            needs_reference = False

    with pytest.raises(TypeError, match="unknown inputs"):

        class Misspelt(SubgameSolver):
            inputs = frozenset({"reference"})


def test_one_check_refuses_game_only_solvers_for_language_models():
    require_language_model_solver(solver("dpo"))
    for name in ("nash_md", "extragradient"):
        with pytest.raises(ConfigError, match="exact games only"):
            require_language_model_solver(solver(name))
