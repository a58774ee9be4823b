"""The plugin contract suite (comalkit.testing) on every registered built-in, and proof that it bites.

The built-ins are enumerated from the registry, so a new built-in is checked without editing
this file (an oracle that needs set-up beyond its defaults gets a factory in ``ORACLES``). The
example package's components are checked in tests/test_example_package.py, through the same calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest
import torch
from comalkit_plugins.oracles.rule import RuleOracle
from comalkit_plugins.references.updaters import ProxReference
from comalkit_plugins.solvers.ipo import IPO
from tiny import tiny_policy

from comalkit.__main__ import load_plugins
from comalkit.interfaces import PreferenceOracle, Snapshot
from comalkit.judge_prompt import JudgePrompt
from comalkit.judge_server import JudgeServer, JudgeService
from comalkit.registry import registry
from comalkit.testing import ContractError, check_oracle, check_sampler, check_solver, check_updater

load_plugins()


# ---------------------------------------------------------------------------------------------
# Every built-in
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", registry.names("solver"))
def test_builtin_solver_contract(name):
    check_solver(registry.get("solver", name))


@pytest.mark.parametrize("name", registry.names("reference"))
def test_builtin_updater_contract(name):
    cls = registry.get("reference", name)
    check_updater(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    if "period" in fields:  # the non-default schedules too
        check_updater(lambda: cls(period=3))
    if "strengths" in fields:
        check_updater(lambda: cls(period=2, strengths=[0.5, 0.2, 0.1]))


@pytest.fixture(scope="module")
def judge_server() -> Iterator[JudgeServer]:
    """A real OpenAI-compatible judge server on loopback (comalkit.judge_server) for http_judge."""
    with JudgeServer(JudgeService(RuleOracle(kind="longer"), JudgePrompt.load("pairwise"))) as server:
        yield server


#: Oracles whose defaults need a model or a server: name -> (fixtures) -> factory.
ORACLES: dict[str, Callable[[pytest.FixtureRequest], Callable[[], PreferenceOracle]]] = {
    "llm_judge": lambda req: (
        lambda: registry.get("oracle", "llm_judge")(
            judge=str(req.getfixturevalue("tiny_judge_dir")), batch_size=4
        )
    ),
    "reward_model": lambda req: (
        lambda: registry.get("oracle", "reward_model")(
            judge=str(req.getfixturevalue("tiny_judge_dir")), batch_size=4
        )
    ),
    "http_judge": lambda req: (
        lambda: registry.get("oracle", "http_judge")(
            base_url=req.getfixturevalue("judge_server").url, timeout_s=10.0
        )
    ),
    "mixture": lambda req: (
        lambda: registry.get("oracle", "mixture")(
            components=[
                {"oracle": "rule", "weight": 2.0, "kind": "longer"},
                {"oracle": "rule", "kind": "rps"},
            ]
        )
    ),
}


@pytest.mark.parametrize("name", registry.names("oracle"))
def test_builtin_oracle_contract(name, request):
    factory = ORACLES[name](request) if name in ORACLES else registry.get("oracle", name)
    check_oracle(factory)


def test_rule_oracle_kinds_pass():
    check_oracle(lambda: RuleOracle(kind="rps", win_prob=0.8))
    check_oracle(lambda: RuleOracle(kind="keyword", keywords={"paris": 1.0, "please": -0.5}))


@pytest.fixture(scope="module")
def small_policy():
    return tiny_policy(max_length=96, max_prompt_length=64)


def test_policy_sampling_contract(small_policy, one_thread):
    """The policy's own sampler (the HF path) on the tiny model."""
    out = check_sampler(small_policy, n=3, max_new_tokens=6)
    assert len(out) == 2 and all(len(row) == 3 for row in out)


@pytest.mark.parametrize("name", registry.names("sampler"))
def test_builtin_sampler_contract(name, small_policy, one_thread):
    """Sampler plugins drive the tiny policy. vLLM's engine loads a model directory, which the
    in-memory tiny model has not: it passes the same check on SmolLM2 in tests/test_samplers.py."""
    if name == "vllm":
        pytest.skip("vLLM needs a model directory; checked on SmolLM2 in tests/test_samplers.py")
    sampler = registry.get("sampler", name)()
    try:
        check_sampler(sampler, policy=small_policy, n=2, max_new_tokens=6)
    finally:
        getattr(sampler, "close", lambda: None)()


# ---------------------------------------------------------------------------------------------
# The suite catches what it claims to catch
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class HalfStepIPO(IPO):
    """IPO whose population update takes half the loss's step: the bridge must fail."""

    def population_update(self, last_logp, ref_logp, win_rate):
        return (ref_logp + win_rate(last_logp) / (2 * self.tau)).log_softmax(-1)


class UnnormalisedIPO(IPO):
    def population_update(self, last_logp, ref_logp, win_rate):
        return ref_logp + win_rate(last_logp) / self.tau


class NanGradIPO(IPO):
    def pair_losses(self, batch):
        out = super().pair_losses(batch)
        out.losses = out.losses * torch.sqrt(batch.policy_chosen - batch.policy_chosen - 1)
        return out


@pytest.mark.parametrize(
    ("solver", "message"),
    [
        (HalfStepIPO, "minimising the loss with exact expectations gives"),
        (UnnormalisedIPO, "not normalised"),
        (NanGradIPO, "LossOutput.losses must be a finite tensor"),
    ],
)
def test_solver_contract_catches(solver, message):
    with pytest.raises(ContractError, match=message):
        check_solver(solver)


class AsymmetricOracle(RuleOracle):
    def win_matrix(self, prompt, candidates):
        m = super().win_matrix(prompt, candidates)
        m[0, 1] = m[1, 0] = 0.7
        return m


class AddressOracle(RuleOracle):
    def identity(self) -> str:
        return object.__repr__(self)


class CountingOracle(RuleOracle):
    """Its identity counts the comparisons it has judged: unstable."""

    def compare(self, comparisons):
        self.calls = getattr(self, "calls", 0) + 1
        return super().compare(comparisons)

    def identity(self) -> str:
        return f"counting{getattr(self, 'calls', 0)}"


@pytest.mark.parametrize(
    ("oracle", "message"),
    [
        (AsymmetricOracle, r"P\[i\]\[j\] \+ P\[j\]\[i\] = 1"),
        (AddressOracle, "memory address"),
        (CountingOracle, "identity\\(\\) changed after judging"),
    ],
)
def test_oracle_contract_catches(oracle, message):
    with pytest.raises(ContractError, match=message):
        check_oracle(oracle)


@dataclasses.dataclass
class CountingReference(ProxReference):
    """Moves μ on every third call it has seen: state outside the snapshot, lost on resume."""

    def update(self, reference: Snapshot, policy: Snapshot, iteration: int) -> Snapshot | None:
        self.calls = getattr(self, "calls", 0) + 1
        return dict(policy) if self.calls % 3 == 0 else None


class HalfPrecisionReference(ProxReference):
    def update(self, reference, policy, iteration):
        return {k: v.half() for k, v in policy.items()}


@pytest.mark.parametrize(
    ("updater", "message"),
    [
        (CountingReference, "resumed after iteration 0"),
        (HalfPrecisionReference, "lost the snapshot's keys, shapes or dtypes"),
    ],
)
def test_updater_contract_catches(updater, message):
    with pytest.raises(ContractError, match=message):
        check_updater(updater)


class ShortSampler:
    """Returns one response fewer than asked."""

    def sample(self, prompts, n, **kwargs):
        return [[f"{p} {k}" for k in range(n - 1)] for p in prompts]


class UnseededSampler:
    def __init__(self) -> None:
        self.calls = 0

    def sample(self, prompts, n, **kwargs):
        self.calls += 1
        return [[f"{p} {self.calls}"] * n for p in prompts]


@pytest.mark.parametrize(
    ("sampler", "message"),
    [(ShortSampler(), "should get a list of 3 strings"), (UnseededSampler(), "same seed")],
)
def test_sampler_contract_catches(sampler, message):
    with pytest.raises(ContractError, match=message):
        check_sampler(sampler)
