"""What a plugin's tests call: config helpers and the plugin contract suite.

``compose`` returns the same config ``python -m comalkit`` would build (plugins loaded, the
ConfigStore filled); ``run_job`` executes it into a chosen directory, as a Hydra job would.

The contract suite checks what the meta-loop assumes of each kind of plugin, through the
same calls the loop makes (docs/writing-a-plugin.md): :func:`check_oracle`,
:func:`check_solver`, :func:`check_updater` and :func:`check_sampler`. Each raises
:class:`ContractError` with a message naming the broken rule; comalkit's own tests run them on
every registered built-in.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from comalkit.__main__ import load_plugins
from comalkit.app import CONF_DIR
from comalkit.interfaces import (
    INPUT_FIELDS,
    LAST_ITERATE_LOGPS,
    REFERENCE_LOGPS,
    WIN_PROBS,
    Comparison,
    GameOnlySolver,
    PairLogps,
    PreferenceOracle,
    ReferenceUpdater,
    Snapshot,
    SubgameSolver,
)
from comalkit.registry import ConfigError


def compose(overrides: Sequence[str] = (), *, with_hydra: bool = False) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides``; keep the ``hydra`` node only if asked."""
    load_plugins()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="comalkit"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    if not with_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def run_job(overrides: Sequence[str], out_dir: str | Path) -> dict[str, Any]:
    """Compose and execute one job writing into ``out_dir``; return its summary."""
    from comalkit.app import execute

    out_dir = Path(out_dir)
    cfg = compose([*overrides, f"hydra.run.dir={out_dir}"], with_hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return execute(cfg, str(out_dir))


# ---------------------------------------------------------------------------------------------
# The plugin contract suite
# ---------------------------------------------------------------------------------------------
class ContractError(AssertionError):
    """A plugin breaks a contract the meta-loop relies on; the message names the rule."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ContractError(message)


def _fresh(component: Any) -> Any:
    """``component()`` for a class or a zero-argument factory, else a deep copy of the instance."""
    return component() if callable(component) else copy.deepcopy(component)


# -- oracles ----------------------------------------------------------------------------------
#: Candidates that differ in length, wording and keywords, so that rule-based oracles disagree on them.
ORACLE_CANDIDATES = (
    "Paris.",
    "The capital of France is Paris.",
    "I think it is Lyon, but please check.",
    "Paris is the capital and largest city of France, on the Seine.",
    "",
)


def check_oracle(
    oracle: PreferenceOracle | Callable[[], PreferenceOracle],
    prompt: str = "What is the capital of France?",
    candidates: Sequence[str] = ORACLE_CANDIDATES,
    atol: float = 1e-6,
) -> None:
    """An oracle's win matrices are valid and its cache identity is stable.

    Checks ``win_matrix`` (K×K, finite, values in [0, 1], ``P[i][j] + P[j][i] = 1``, diagonal
    ½), that ``compare`` gives one probability in [0, 1] per comparison and agrees with the
    matrix, and that ``identity()`` is a non-empty string that judging does not change. Given
    a class or factory, two builds must also share one identity (the on-disk cache keys on it),
    and the oracle is closed afterwards.
    """
    built = callable(oracle)
    subject = oracle() if built else oracle
    name = type(subject).__name__
    try:
        before = subject.identity()
        _require(isinstance(before, str) and before, f"oracle {name}: identity() must be a non-empty string")
        _require(
            " at 0x" not in before,
            f"oracle {name}: identity() {before!r} contains a memory address, so it changes every run; "
            "build it from the oracle's settings (e.g. a dataclass repr or settings_identity)",
        )
        k = len(candidates)
        m = subject.win_matrix(prompt, list(candidates))
        _require(
            isinstance(m, torch.Tensor) and tuple(m.shape) == (k, k),
            f"oracle {name}: win_matrix of {k} candidates must be a {k}x{k} tensor, got "
            f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}",
        )
        m = m.double()
        _require(bool(torch.isfinite(m).all()), f"oracle {name}: win_matrix has non-finite entries:\n{m}")
        _require(
            bool(((m >= 0) & (m <= 1)).all()), f"oracle {name}: win_matrix entries must lie in [0, 1]:\n{m}"
        )
        _require(
            bool(torch.allclose(m + m.T, torch.ones_like(m), atol=atol, rtol=0)),
            f"oracle {name}: win_matrix must satisfy P[i][j] + P[j][i] = 1:\n{m}",
        )
        _require(
            bool((m.diagonal() - 0.5).abs().max() <= atol),
            f"oracle {name}: win_matrix diagonal must be 1/2, got {m.diagonal().tolist()}",
        )
        pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
        p = subject.compare([Comparison(prompt, candidates[i], candidates[j]) for i, j in pairs])
        p = torch.as_tensor(p).double()
        _require(
            tuple(p.shape) == (len(pairs),),
            f"oracle {name}: compare of {len(pairs)} comparisons returned shape {tuple(p.shape)}",
        )
        _require(bool(((p >= 0) & (p <= 1)).all()), f"oracle {name}: compare returned values outside [0, 1]")
        expected = torch.tensor([float(m[i, j]) for i, j in pairs], dtype=torch.float64)
        _require(
            bool(torch.allclose(p, expected, atol=1e-4, rtol=0)),
            f"oracle {name}: compare disagrees with win_matrix: {p.tolist()} vs {expected.tolist()}",
        )
        after = subject.identity()
        _require(after == before, f"oracle {name}: identity() changed after judging: {before!r} -> {after!r}")
        if built:
            twin = oracle()
            try:
                again = twin.identity()
            finally:
                twin.close()
            _require(
                again == before,
                f"oracle {name}: two builds with one config have different identities: "
                f"{before!r} vs {again!r}",
            )
    finally:
        if built:
            subject.close()


# -- solvers ----------------------------------------------------------------------------------
PAPER3 = ((0.5, 0.1, 0.8), (0.9, 0.5, 0.1), (0.2, 0.9, 0.5))


def contract_games(seeds: Sequence[int] = (0,)) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(M, log π_t, log μ)`` test games: the COMAL paper's 3×3 game (Liu et al. 2025, Fig. 1) from
    its start, and a seeded random 5×5 game ``σ(A − Aᵀ)`` with random π_t and μ per seed."""
    games = [
        (
            torch.tensor(PAPER3, dtype=torch.float64),
            torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64).log(),
            torch.full((3,), 1 / 3, dtype=torch.float64).log(),
        )
    ]
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(5, 5, generator=g, dtype=torch.float64)
        last, ref = torch.randn(2, 5, generator=g, dtype=torch.float64).log_softmax(-1)
        games.append((torch.sigmoid(a - a.T), last, ref))
    return games


def exact_pairs(
    solver: SubgameSolver, logp: torch.Tensor, last: torch.Tensor, ref: torch.Tensor, m: torch.Tensor
) -> PairLogps:
    """Every ordered pair (i wins, j loses) of a tabular game with its population weight
    ``π_t(i) π_t(j) M_ij``: exact expectations. Only the inputs ``solver`` declares are filled,
    as the loop computes only those; a response is one token."""
    n = m.shape[-1]
    i, j = (k.flatten() for k in torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"))
    pi_t = last.exp()
    p = m @ pi_t  # P(y ≻ π_t)
    ones = torch.ones(n * n, dtype=logp.dtype)
    batch = PairLogps(
        policy_chosen=logp[i],
        policy_rejected=logp[j],
        chosen_tokens=ones,
        rejected_tokens=ones,
        weight=pi_t[i] * pi_t[j] * m[i, j],
    )
    values = {LAST_ITERATE_LOGPS: last, REFERENCE_LOGPS: ref, WIN_PROBS: p}
    for name in solver.inputs:
        chosen, rejected = INPUT_FIELDS[name]
        setattr(batch, chosen, values[name][i])
        setattr(batch, rejected, values[name][j])
    return batch


def minimise_loss(
    solver: SubgameSolver, last: torch.Tensor, ref: torch.Tensor, m: torch.Tensor
) -> torch.Tensor:
    """The tabular policy minimising ``solver.loss`` in expectation (L-BFGS in float64, from π_t)."""
    theta = last.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-13,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        batch = exact_pairs(solver, theta.log_softmax(-1), last, ref, m)
        loss = solver.loss(batch).mean(batch.weight)  # what the training module minimises
        loss.backward()
        return loss

    for _ in range(10):
        opt.step(closure)
        if theta.grad.abs().max() < 1e-12:
            break
    return theta.detach().softmax(-1)


def check_solver(
    solver: SubgameSolver | Callable[[], SubgameSolver],
    strengths: Sequence[float | None] = (None, 0.5),
    games: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    atol: float = 1e-6,
) -> None:
    """A solver's loss trains a tabular policy, and its minimiser is its population update.

    For each KL strength (``None``: the solver's own; a strength the solver does not take,
    :class:`~comalkit.registry.ConfigError` from ``set_strength``, is skipped) and each game:
    ``population_update`` returns normalised, finite log-probs of the input's shape, a batch
    of games gives what each game gives alone, and the update moves π_t (else the bridge
    check proves nothing). For a language-model solver (not a ``GameOnlySolver``) the loss,
    fed only the inputs it declares (``inputs``), gives finite per-pair losses and rewards of
    shape [B] and finite gradients, and minimising it with exact expectations (every ordered
    pair, weighted ``π_t(y) π_t(y') P(y ≻ y')``) lands on ``population_update`` within ``atol``:
    the loss that trains a language model implements the game dynamics (docs/solvers.md).
    """
    games = list(games) if games is not None else contract_games()
    for strength in strengths:
        subject = _fresh(solver)
        name = type(subject).__name__
        if strength is not None:
            try:
                subject.set_strength(strength)
            except ConfigError:
                continue
        for m, last, ref in games:
            where = f"solver {name} (strength {strength}, {m.shape[-1]} responses)"
            update = subject.population_update(last, ref, lambda logp, m=m: m @ logp.softmax(-1))
            _require(
                tuple(update.shape) == tuple(last.shape), f"{where}: population_update changed the shape"
            )
            _require(
                bool(torch.isfinite(update).all()), f"{where}: population_update is not finite: {update}"
            )
            total = float(update.exp().sum())
            _require(abs(total - 1) < 1e-9, f"{where}: population_update is not normalised (sums to {total})")
            _require(
                not torch.allclose(update.exp(), last.exp(), atol=1e-3),
                f"{where}: population_update does not move the policy; pick a game where it must",
            )
            batch_m, batch_last, batch_ref = m.expand(2, -1, -1), last.expand(2, -1), ref.expand(2, -1)
            batched = subject.population_update(
                batch_last, batch_ref, lambda logp, bm=batch_m: (bm @ logp.softmax(-1)[..., None])[..., 0]
            )
            _require(
                tuple(batched.shape) == (2, m.shape[-1])
                and bool(torch.allclose(batched, update.expand(2, -1), atol=1e-9, rtol=0)),
                f"{where}: population_update on a batch of games differs from one game at a time",
            )
            if not isinstance(subject, GameOnlySolver):
                _check_loss(subject, where, m, last, ref)
                got = minimise_loss(subject, last, ref, m)
                gap = float((got - update.exp()).abs().max())
                _require(
                    gap < atol,
                    f"{where}: minimising the loss with exact expectations gives {got.tolist()}, but "
                    f"population_update gives {update.exp().tolist()} (max difference {gap:.2e})",
                )


def _check_loss(
    solver: SubgameSolver, where: str, m: torch.Tensor, last: torch.Tensor, ref: torch.Tensor
) -> None:
    theta = (last + 0.3 * torch.linspace(-1, 1, last.shape[-1], dtype=last.dtype)).requires_grad_(True)
    batch = exact_pairs(solver, theta.log_softmax(-1), last, ref, m)
    out = solver.loss(batch)
    size = batch.policy_chosen.shape
    for field in ("losses", "chosen_rewards", "rejected_rewards"):
        value = getattr(out, field)
        _require(
            isinstance(value, torch.Tensor) and value.shape == size and bool(torch.isfinite(value).all()),
            f"{where}: LossOutput.{field} must be a finite tensor of shape {tuple(size)}",
        )
    loss = out.mean(batch.weight)
    _require(
        loss.dim() == 0 and math.isfinite(float(loss.detach())),
        f"{where}: the weighted mean loss is not finite",
    )
    loss.backward()
    _require(
        theta.grad is not None
        and bool(torch.isfinite(theta.grad).all())
        and bool(theta.grad.abs().sum() > 0),
        f"{where}: the loss has no finite, non-zero gradient in the policy logits: {theta.grad}",
    )


# -- reference updaters -----------------------------------------------------------------------
def _policies(like: Snapshot, iterations: int, seed: int) -> list[Snapshot]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            k: v + 0.5 * (t + 1) * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
            for k, v in like.items()
        }
        for t in range(iterations)
    ]


#: A tabular policy over a batch of two games (what task=synthetic passes) and a LoRA-like adapter.
SNAPSHOTS: tuple[Snapshot, ...] = (
    {"logits": torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], dtype=torch.float64).log()},
    {"layer.lora_A.weight": torch.zeros(4, 8), "layer.lora_B.weight": torch.full((8, 4), 0.01)},
)


def check_updater(
    updater: ReferenceUpdater | Callable[[], ReferenceUpdater],
    iterations: int = 12,
    snapshots: Sequence[Snapshot] = SNAPSHOTS,
) -> None:
    """An updater's state survives a checkpoint round trip, as the online loop resumes it.

    The loop saves the reference after every iteration (safetensors), and a resumed run
    rebuilds the updater from its config and loads that file. So a run stopped after any
    iteration and resumed this way must give the same references, rounds and strengths as an
    uninterrupted one: an updater must keep no state outside the reference snapshot and the
    iteration index. Returned references must keep the snapshot's keys, shapes and dtypes.
    Pass a class or factory (it builds a fresh updater, as a resumed run does) or an
    instance (deep-copied).
    """
    from comalkit.loop import load_snapshot, save_snapshot

    for index, start in enumerate(snapshots):
        policies = _policies(start, iterations, seed=index)
        trace = _trace(_fresh(updater), start, policies, range(iterations))
        name = type(_fresh(updater)).__name__
        for k, (reference, _, _) in enumerate(trace):
            _require(
                reference.keys() == start.keys()
                and all(
                    reference[key].shape == start[key].shape and reference[key].dtype == start[key].dtype
                    for key in start
                ),
                f"updater {name}: the reference after iteration {k} lost the snapshot's keys, shapes or dtypes",
            )
        with tempfile.TemporaryDirectory() as tmp:
            for stop in range(1, iterations):
                path = Path(tmp) / f"reference_{stop}.safetensors"
                save_snapshot(path, trace[stop - 1][0])
                resumed = _trace(_fresh(updater), load_snapshot(path), policies, range(stop, iterations))
                for k, (got, want) in enumerate(zip(resumed, trace[stop:]), start=stop):
                    same = all(torch.equal(got[0][key], want[0][key]) for key in start)
                    _require(
                        same and got[1:] == want[1:],
                        f"updater {name}: resumed after iteration {stop - 1} (rebuilt from config, reference "
                        f"loaded from its checkpoint) it gives a different reference, round or strength at "
                        f"iteration {k}; keep no state outside the reference snapshot and the iteration index",
                    )


def _trace(
    updater: ReferenceUpdater, reference: Snapshot, policies: Sequence[Snapshot], steps: range
) -> list[tuple[Snapshot, int, float | None]]:
    """(reference, round, strength) after each iteration in ``steps``, as the loop calls the updater."""
    out = []
    for k in steps:
        round_index = updater.round_of(k)
        strength = updater.strength(round_index)
        new = updater.update(reference, {key: v.clone() for key, v in policies[k].items()}, k)
        reference = reference if new is None else new
        out.append((reference, round_index, strength))
    return out


# -- samplers ---------------------------------------------------------------------------------
def check_sampler(
    sampler: Any,
    prompts: Sequence[Any] = ("What is the capital of France?", "Name a colour."),
    n: int = 3,
    *,
    policy: Any = None,
    **kwargs: Any,
) -> list[list[str]]:
    """A sampler returns what it was asked for: ``n`` strings per prompt, in prompt order.

    ``sampler`` is any object with a ``sample`` method: a policy (``sample(prompts, n, ...)``)
    or, with ``policy`` given, a sampler plugin (``sample(policy, prompts, n, ...)``, see
    :class:`comalkit.interfaces.Sampler`). ``kwargs`` go to every call; ``temperature=1``,
    ``top_p=1`` and ``max_new_tokens=8`` unless given. Also checks that one seed gives the
    same responses twice, and that one prompt with ``n=1`` gives ``[[str]]``. Returns the responses.
    """
    name = type(sampler).__name__
    _require(callable(getattr(sampler, "sample", None)), f"sampler {name} has no sample(...) method")
    settings = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8, **kwargs}

    def draw(batch: Sequence[Any], count: int) -> Any:
        head = (list(batch), count) if policy is None else (policy, list(batch), count)
        return sampler.sample(*head, seed=0, **settings)

    out = draw(prompts, n)
    _require(
        isinstance(out, list) and len(out) == len(prompts),
        f"sampler {name}: expected a list of {len(prompts)} lists (one per prompt), got "
        f"{type(out).__name__} of length {len(out) if hasattr(out, '__len__') else '?'}",
    )
    for i, row in enumerate(out):
        _require(
            isinstance(row, list) and len(row) == n and all(isinstance(r, str) for r in row),
            f"sampler {name}: prompt {i} should get a list of {n} strings, got {row!r}",
        )
    _require(draw(prompts, n) == out, f"sampler {name}: the same seed gave different responses")
    single = draw(list(prompts)[:1], 1)
    _require(
        isinstance(single, list)
        and len(single) == 1
        and isinstance(single[0], list)
        and len(single[0]) == 1
        and isinstance(single[0][0], str),
        f"sampler {name}: one prompt with n=1 should give [[str]], got {single!r}",
    )
    return out
