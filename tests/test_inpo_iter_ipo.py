"""INPO with μ = π_t is Iter-IPO (Liu et al. 2025, COMAL, Sec. 5), on the tiny model.

INPO's loss ``(Δ_θ − r·Δ_ref − (1 − r)·Δ_t − 1/(2β))²`` with Δ_ref = Δ_t is Iter-IPO's
``(Δ_θ − Δ_t − 1/(2τ))²`` at τ = β. In exact arithmetic the two are identical; in float32,
``r·ℓ + (1 − r)·ℓ`` may differ from ℓ in the last bit (ℓ is a summed log-prob of order 100),
so the mean loss is compared with rtol 1e-5 and each gradient tensor by its relative L2 error,
at most 1e-4 (measured: 1.1e-5 at most). With a different μ they must differ.
"""

from __future__ import annotations

import logging

import pytest
import torch
from comalkit_plugins.data.preferences import SAMPLE_TRAIN
from comalkit_plugins.references.updaters import FixedReference, ProxReference
from comalkit_plugins.solvers.inpo import INPO, warn_if_iterated_ipo
from comalkit_plugins.solvers.ipo import IterIPO
from tiny import TRAINING_SIZES, tiny_policy

from comalkit.preference_data import load_preferences
from comalkit.testing import compose
from comalkit.training import PreferenceModule, precompute_logps

FP32 = {"accelerator": "cpu", "precision": "32-true", "max_epochs": 1, "lr": 5e-5, "lean_logps": False}


def loss_and_grads(policy, solver, records):
    """The solver's mean loss on ``records`` through the training module, and the trainable gradients."""
    module = PreferenceModule(policy, solver, FP32)
    policy.model.zero_grad(set_to_none=True)
    loss = solver.loss(module.pair_logps(module.collate(records))).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    policy = tiny_policy(**TRAINING_SIZES)
    gen = torch.Generator().manual_seed(1)  # leave the LoRA init so that B != 0 and the gradients are generic
    policy.load_snapshot(
        {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in policy.snapshot().items()}
    )
    last = policy.snapshot()
    # the policy being trained has moved off π_t, as after a few steps of an iteration
    policy.load_snapshot({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in last.items()})
    return policy, last, load_preferences(SAMPLE_TRAIN)[:6]


def test_inpo_with_reference_equal_to_last_iterate_is_iter_ipo(setup):
    policy, last, pairs = setup
    inpo, iter_ipo = INPO(beta=0.1), IterIPO(tau=0.1)
    records = precompute_logps(
        policy, pairs, inpo, last=last, reference=last
    )  # μ = π_t, as after a prox step
    assert all(
        r["ref_chosen"] == r["last_chosen"] and r["ref_rejected"] == r["last_rejected"] for r in records
    )
    loss_inpo, grads_inpo = loss_and_grads(policy, inpo, records)
    loss_ipo, grads_ipo = loss_and_grads(
        policy, iter_ipo, precompute_logps(policy, pairs, iter_ipo, last=last)
    )
    assert loss_inpo.item() > 1.0  # far from the target margin: the gradients are not vanishing
    torch.testing.assert_close(loss_inpo, loss_ipo, rtol=1e-5, atol=0.0)
    assert grads_inpo.keys() == grads_ipo.keys() and grads_inpo
    for name, grad in grads_inpo.items():
        assert grads_ipo[name].norm() > 0, name
        assert (grad - grads_ipo[name]).norm() <= 1e-4 * grads_ipo[name].norm(), name


def test_with_a_different_reference_inpo_is_not_iter_ipo(setup):
    policy, last, pairs = setup
    inpo, iter_ipo = INPO(beta=0.1), IterIPO(tau=0.1)
    initial = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in last.items()}  # μ = the LoRA init
    loss_inpo, _ = loss_and_grads(
        policy, inpo, precompute_logps(policy, pairs, inpo, last=last, reference=initial)
    )
    loss_ipo, _ = loss_and_grads(policy, iter_ipo, precompute_logps(policy, pairs, iter_ipo, last=last))
    assert abs(loss_inpo.item() - loss_ipo.item()) > 1e-3 * abs(loss_ipo.item())


def test_period_one_with_inpo_warns_that_it_is_iter_ipo(caplog):
    with caplog.at_level(logging.WARNING, logger="comalkit"):
        assert warn_if_iterated_ipo(INPO(), ProxReference(period=1))
    assert "Iter-IPO" in caplog.text and "reference.period >= 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="comalkit"):
        assert not warn_if_iterated_ipo(INPO(), ProxReference(period=2))
        assert not warn_if_iterated_ipo(INPO(), FixedReference())
        assert not warn_if_iterated_ipo(IterIPO(), ProxReference(period=1))
    assert not caplog.text


def test_the_default_online_run_is_comal_with_two_rounds_of_two_iterations():
    cfg = compose([])
    assert cfg.solver._target_.endswith("INPO") and cfg.reference._target_.endswith("ProxReference")
    period, iterations = cfg.reference.period, cfg.task.iterations
    assert period >= 2 and iterations // period >= 2
    assert compose(["experiment=synthetic"]).reference.period == 10  # the tuned synthetic value is kept
