"""The bridge from language-model losses to game dynamics.

For every language-model solver: on a tabular softmax policy (the logits are the
parameters), the solver's own ``loss`` with exact expectations (every ordered pair (y, y'),
y = y' included, weighted ``π_t(y) π_t(y') P(y ≻ y')`` through ``PairLogps.weight``) is
minimised by L-BFGS in float64. The minimiser must equal ``population_update`` to 1e-6. For
the closed-form solvers this checks that the loss that trains a language model implements
the game dynamics; for DPO and SPPO it checks the Newton solvers against plain descent.
"""

import pytest
import torch

from comalkit.__main__ import load_plugins
from comalkit.interfaces import PairLogps, SubgameSolver
from comalkit.registry import registry

load_plugins()

LM_SOLVERS = [name for name in registry.names("solver") if registry.get("solver", name).language_model]
PAPER3 = torch.tensor([[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]], dtype=torch.float64)


def game(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, log π_t, log μ): the paper's game from its start, or a seeded random 5×5 game σ(A), A skew."""
    if name == "paper3":
        return (
            PAPER3,
            torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64).log(),
            torch.full((3,), 1 / 3).double().log(),
        )
    g = torch.Generator().manual_seed(int(name.removeprefix("random5-")))
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    last, ref = torch.randn(2, 5, generator=g, dtype=torch.float64).log_softmax(-1)
    return torch.sigmoid(a - a.T), last, ref


def exact_pairs(logp: torch.Tensor, last: torch.Tensor, ref: torch.Tensor, m: torch.Tensor) -> PairLogps:
    """All ordered pairs (i wins, j loses) with their population weights: exact expectations."""
    n = m.shape[-1]
    i, j = (k.flatten() for k in torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"))
    p = m @ last.exp()  # P(y ≻ π_t)
    return PairLogps(
        policy_chosen=logp[i], policy_rejected=logp[j], last_chosen=last[i], last_rejected=last[j],
        ref_chosen=ref[i], ref_rejected=ref[j], chosen_winprob=p[i], rejected_winprob=p[j],
        weight=last.exp()[i] * last.exp()[j] * m[i, j],
    )  # fmt: skip


def minimise_loss(
    solver: SubgameSolver, last: torch.Tensor, ref: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """The tabular policy minimising ``solver.loss`` in expectation, by L-BFGS from π_t."""
    theta = last.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=0.0,
                            history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        batch = exact_pairs(theta.log_softmax(-1), last, ref, m)
        loss = solver.loss(batch).mean(batch.weight)  # what the training module minimises
        loss.backward()
        return loss

    for _ in range(10):
        opt.step(closure)
        if theta.grad.abs().max() < 1e-12:
            break
    return theta.detach().softmax(-1)


@pytest.mark.parametrize("game_name", ["paper3", "random5-0", "random5-1", "random5-2"])
@pytest.mark.parametrize("strength", [None, 0.5])
@pytest.mark.parametrize("name", LM_SOLVERS)
def test_loss_minimiser_is_the_population_update(name, strength, game_name):
    solver = registry.get("solver", name)()
    if strength is not None:
        solver.set_strength(strength)
    m, last, ref = game(game_name)
    expected = solver.population_update(last, ref, lambda logp: m @ logp.softmax(-1)).exp()
    got = minimise_loss(solver, last, ref, m)
    assert (got - expected).abs().max() < 1e-6, (got, expected)
    assert not torch.allclose(expected, last.exp(), atol=1e-3)  # the update moves: the check has teeth


def test_every_language_model_solver_is_covered():
    assert {"dpo", "ipo", "iter_ipo", "sppo", "sppo_hard", "inpo", "mpo"} <= set(LM_SOLVERS)
    assert not {"nash_md", "extragradient"} & set(LM_SOLVERS)
