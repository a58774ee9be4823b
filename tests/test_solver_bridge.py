"""The bridge from language-model losses to game dynamics, through the shared contract suite.

For every language-model solver, :func:`comalkit.testing.check_solver` minimises the solver's
own ``loss`` on a tabular softmax policy with exact expectations (every ordered pair, weighted
``π_t(y) π_t(y') P(y ≻ y')``) by L-BFGS in float64, and requires the minimiser to equal
``population_update`` to 1e-6, and the update to move π_t. For the closed-form solvers this
checks that the loss that trains a language model implements the game dynamics; for DPO and
SPPO it checks the Newton solvers against plain descent (docs/solvers.md).
"""

import pytest

from comalkit.__main__ import load_plugins
from comalkit.interfaces import GameOnlySolver
from comalkit.registry import registry
from comalkit.testing import check_solver, contract_games

load_plugins()

LM_SOLVERS = [
    name for name in registry.names("solver") if not issubclass(registry.get("solver", name), GameOnlySolver)
]
#: the paper's 3×3 game from its start, and seeded random 5×5 games σ(A − Aᵀ) (seeds 0, 1, 2)
GAMES = contract_games(seeds=(0, 1, 2))


@pytest.mark.parametrize(
    "game_index", range(len(GAMES)), ids=["paper3", "random5-0", "random5-1", "random5-2"]
)
@pytest.mark.parametrize("strength", [None, 0.5])
@pytest.mark.parametrize("name", LM_SOLVERS)
def test_loss_minimiser_is_the_population_update(name, strength, game_index):
    cls = registry.get("solver", name)
    if strength is not None:
        cls().set_strength(strength)  # every language-model solver takes a per-round strength
    check_solver(cls, strengths=(strength,), games=[GAMES[game_index]], atol=1e-6)


def test_every_language_model_solver_is_covered():
    assert {"dpo", "ipo", "iter_ipo", "sppo", "sppo_hard", "inpo", "mpo"} <= set(LM_SOLVERS)
    assert not {"nash_md", "extragradient"} & set(LM_SOLVERS)
