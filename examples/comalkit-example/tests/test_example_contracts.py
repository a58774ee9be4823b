"""What a plugin author runs: comalkit's contract suite on this package's components.

pip install ./examples/comalkit-example && pytest examples/comalkit-example/tests
"""

import pytest
from comalkit_example.oracle import NoisyOracle
from comalkit_example.reference import GrowingProx
from comalkit_example.solver import ConservativeDPO

from comalkit.testing import check_oracle, check_solver, check_updater, load_plugins

load_plugins()  # the built-ins too: oracle=noisy wraps one of them

RULE = {"oracle": "rule", "kind": "longer"}


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_cdpo_loss_minimiser_is_its_population_update(epsilon):
    check_solver(lambda: ConservativeDPO(epsilon=epsilon))


@pytest.mark.parametrize("flip", [0.0, 0.2, 0.5])
def test_noisy_oracle_gives_valid_win_matrices(flip):
    check_oracle(lambda: NoisyOracle(base=RULE, flip=flip))
    check_oracle(lambda: NoisyOracle(base={"oracle": "rule", "kind": "rps"}, flip=flip))


@pytest.mark.parametrize(("first", "growth"), [(1, 2.0), (2, 1.5), (3, 1.0)])
def test_growing_prox_survives_a_resume(first, growth):
    check_updater(lambda: GrowingProx(first=first, growth=growth, strengths=[0.5, 0.2]))


def test_growing_prox_schedule():
    ref = GrowingProx(first=1, growth=2.0)
    assert [ref.round_end(r) for r in range(4)] == [1, 3, 7, 15]
    assert [ref.round_of(k) for k in range(8)] == [0, 1, 1, 2, 2, 2, 2, 3]
    moved = [k for k in range(15) if ref.update({}, {}, k) is not None]
    assert moved == [0, 2, 6, 14]
