"""Exact preference games: the tabular backend on which COMAL's convergence claims are checked.

A game is a preference matrix ``M[i][j] = P(y_i ≻ y_j)`` over a finite response set, with
``M + Mᵀ = 1``; a policy is a distribution over the responses. This module holds the maths
only (no plugin is imported here):

* validation and loading of matrices and start policies (:func:`check_matrix`,
  :func:`check_policy`, :func:`load_matrix`);
* the exact Nash policy by linear programming (:func:`nash_policy`), the ground truth;
* the KL-regularised equilibrium π*_τ (:func:`regularized_equilibrium`), where INPO stops;
* batched metrics: duality gap, KL(π*‖π), L1/L2 distance to π* (:func:`game_metrics`);
* the batched dynamics engine (:func:`run_dynamics`) that drives any
  :class:`~comalkit.interfaces.SubgameSolver` with any
  :class:`~comalkit.interfaces.ReferenceUpdater` on a ``[B, n]`` batch of games.

Formulas follow ``shared/algorithms.md`` (the COMAL paper: Liu et al. 2025, "COMAL: A Convergent
Meta-Algorithm for Aligning LLMs with General Preferences").
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from comalkit.interfaces import ReferenceUpdater, SubgameSolver
from comalkit.registry import ConfigError

#: Default tolerance on ``M[i][j] + M[j][i] = 1`` and on a start policy's sum.
TOL = 1e-6
MATRIX_SUFFIXES = (".npy", ".csv", ".json")


class GameError(ConfigError):
    """A preference matrix or start policy is malformed; the message names the entry."""


# ---------------------------------------------------------------------------------------------
# Validation and loading
# ---------------------------------------------------------------------------------------------
def _as_array(values: Any, source: str) -> np.ndarray:
    """``values`` as a float64 array, with a clear message for ragged or non-numeric input."""
    if isinstance(values, (list, tuple)) and values and all(isinstance(r, (list, tuple)) for r in values):
        lengths = [len(r) for r in values]
        for i, length in enumerate(lengths):
            if length != lengths[0] and not any(isinstance(x, (list, tuple)) for x in values[i]):
                raise GameError(f"{source}: row {i} has {length} entries but row 0 has {lengths[0]}")
    try:
        return np.array(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise GameError(f"{source}: expected numbers, got {values!r} ({exc})") from exc


def _entry(index: tuple[int, ...]) -> tuple[str, str]:
    """(``"game 3: "`` inside a batch or ``""``, ``"M[0][2]"``) for an index into a matrix."""
    *game, i, j = index
    return (f"game {game[0]}: " if game else ""), f"M[{i}][{j}]"


def check_matrix(matrix: Any, *, tol: float = TOL, source: str = "game matrix") -> np.ndarray:
    """Validate one preference matrix ``[n, n]`` or a batch ``[B, n, n]``; return it as float64.

    Rejects non-square shapes, non-finite values, entries outside [0, 1] and violations of
    ``M[i][j] + M[j][i] = 1`` beyond ``tol``. Accepted matrices are projected onto the exact
    constraint, ``M ← (M + 1 − Mᵀ) / 2``, so that the Nash policy has a gap of exactly 0.
    """
    m = _as_array(matrix, source)
    if m.ndim not in (2, 3) or m.shape[-1] != m.shape[-2]:
        raise GameError(
            f"{source}: expected a square n×n matrix (or a B×n×n batch), got shape {list(m.shape)}"
        )
    if m.shape[-1] < 2:
        raise GameError(f"{source}: a game needs at least 2 responses, got shape {list(m.shape)}")
    bad = np.argwhere(~np.isfinite(m))
    if len(bad):
        idx = tuple(int(x) for x in bad[0])
        game, entry = _entry(idx)
        raise GameError(f"{source}: {game}{entry}={m[idx]} is not finite")
    bad = np.argwhere((m < 0) | (m > 1))
    if len(bad):
        idx = tuple(int(x) for x in bad[0])
        game, entry = _entry(idx)
        raise GameError(f"{source}: {game}{entry}={m[idx]:g} is outside [0, 1]")
    total = m + np.swapaxes(m, -1, -2)
    bad = np.argwhere(np.abs(total - 1.0) > tol)
    if len(bad):
        idx = tuple(int(x) for x in bad[0])
        game, entry = _entry(idx)
        if idx[-1] == idx[-2]:
            raise GameError(f"{source}: {game}{entry}={m[idx]:g}, expected 0.5 (a response ties with itself)")
        mirror = (*idx[:-2], idx[-1], idx[-2])
        raise GameError(
            f"{source}: {game}{entry}={m[idx]:g} and {_entry(mirror)[1]}={m[mirror]:g} sum to "
            f"{total[idx]:g}; a preference matrix needs M[i][j] + M[j][i] = 1 (tolerance {tol:g})"
        )
    return (m + 1.0 - np.swapaxes(m, -1, -2)) / 2.0


def check_policy(policy: Any, n: int, *, tol: float = TOL, source: str = "start") -> np.ndarray:
    """Validate a policy ``[n]`` (or ``[B, n]``) strictly inside the simplex; return it renormalised.

    Zero entries are rejected: multiplicative-weights updates can never bring a response
    with probability 0 back, so such a start would silently restrict the game.
    """
    p = _as_array(policy, source)
    if p.ndim not in (1, 2) or p.shape[-1] != n:
        raise GameError(f"{source}: expected {n} probabilities (one per response), got shape {list(p.shape)}")
    for idx in np.ndindex(p.shape):
        where = f"{source}[{']['.join(map(str, idx))}]"
        if not np.isfinite(p[idx]):
            raise GameError(f"{source}: {where}={p[idx]} is not finite")
        if p[idx] <= 0:
            raise GameError(
                f"{source}: {where}={p[idx]:g} must be > 0 (a response at probability 0 never comes back)"
            )
    sums = p.sum(-1)
    for idx in np.ndindex(sums.shape):
        if abs(sums[idx] - 1.0) > tol:
            row = f"{source}[{idx[0]}]" if idx else source
            raise GameError(f"{source}: {row} sums to {sums[idx]:.9g}, expected 1 (tolerance {tol:g})")
    return p / sums[..., None]


def _read_matrix_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".csv":
        return np.loadtxt(path, delimiter=",", ndmin=2, comments="#")
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        if "matrix" not in data:
            raise GameError(f"matrix file {path}: a JSON object needs a 'matrix' key, found {sorted(data)}")
        data = data["matrix"]
    return data


def load_matrix(spec: Any, *, tol: float = TOL) -> tuple[np.ndarray, str]:
    """A validated matrix from a path (.npy, .csv, .json) or an inline (nested) list; and its source.

    A string that starts with ``[`` is read as an inline JSON list, so
    ``game.matrix='[[0.5,0.3],[0.7,0.5]]'`` works quoted or not. Errors name the file.
    """
    if isinstance(spec, str) and spec.lstrip().startswith("["):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise GameError(f"game.matrix: cannot parse the inline list {spec!r}: {exc}") from exc
    if isinstance(spec, (list, tuple, np.ndarray)):
        return check_matrix(spec, tol=tol, source="game.matrix"), "inline matrix"
    if not isinstance(spec, (str, Path)):
        raise GameError(
            f"game.matrix: expected a file path or a nested list, got {type(spec).__name__} {spec!r}"
        )
    path = Path(spec).expanduser()
    if path.suffix.lower() not in MATRIX_SUFFIXES:
        raise GameError(
            f"matrix file {path}: unknown format '{path.suffix}', expected one of {', '.join(MATRIX_SUFFIXES)}"
        )
    if not path.is_file():
        raise GameError(f"matrix file {path} does not exist (relative paths are read from {Path.cwd()})")
    try:
        data = _read_matrix_file(path)
    except GameError:
        raise
    except Exception as exc:  # numpy and json raise many types; the user needs the file name
        raise GameError(f"matrix file {path}: cannot read it: {exc}") from exc
    return check_matrix(data, tol=tol, source=f"matrix file {path}"), str(path)


# ---------------------------------------------------------------------------------------------
# Games as data
# ---------------------------------------------------------------------------------------------
@dataclass
class GameBatch:
    """``B`` validated games of ``n`` responses each, with their start policies."""

    matrices: np.ndarray  # [B, n, n]
    start: np.ndarray  # [B, n]
    source: str = "game"
    labels: list[str] = field(default_factory=list)  # response names, for plots

    def __post_init__(self) -> None:
        if self.matrices.ndim == 2:
            self.matrices = self.matrices[None]
        if self.start.ndim == 1:
            self.start = np.broadcast_to(self.start, self.matrices.shape[:2]).copy()
        if self.start.shape != self.matrices.shape[:2]:
            raise GameError(
                f"{self.source}: start policies have shape {list(self.start.shape)}, "
                f"expected {list(self.matrices.shape[:2])} for {len(self.matrices)} game(s)"
            )
        if not self.labels:
            self.labels = [f"y{i + 1}" for i in range(self.n)]

    @property
    def count(self) -> int:
        return self.matrices.shape[0]

    @property
    def n(self) -> int:
        return self.matrices.shape[-1]


class GameSource(ABC):
    """What a ``game=<name>`` plugin provides: a batch of validated games."""

    @abstractmethod
    def build(self) -> GameBatch:
        """Generate or load the games (validated) and their start policies."""


# ---------------------------------------------------------------------------------------------
# Exact solutions
# ---------------------------------------------------------------------------------------------
def _nash_one(m: np.ndarray) -> np.ndarray:
    from scipy.optimize import linprog

    n = m.shape[0]
    # min t  s.t.  M π ≤ t·1,  Σπ = 1,  π ≥ 0.  At the optimum t = ½ (the game is symmetric).
    c = np.r_[np.zeros(n), 1.0]
    a_ub = np.c_[m, -np.ones(n)]
    a_eq = np.r_[np.ones(n), 0.0][None]
    bounds = [(0, None)] * n + [(None, None)]
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), A_eq=a_eq, b_eq=[1.0], bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"the Nash linear program failed: {res.message}")
    pi = np.clip(res.x[:n], 0.0, None)
    pi /= pi.sum()
    return _polish_on_support(m, pi)


def _polish_on_support(m: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """Refine an LP solution to machine precision: every response in the support of π* wins
    exactly ½ against π*, so π*_S solves ``(M_SS − ½) π_S = 0, Σ π_S = 1``."""
    support = pi > 1e-9
    rows = np.r_[m[np.ix_(support, support)] - 0.5, np.ones((1, support.sum()))]
    rhs = np.r_[np.zeros(support.sum()), 1.0]
    sol, *_ = np.linalg.lstsq(rows, rhs, rcond=None)
    if np.any(sol < 0):
        return pi
    polished = np.zeros_like(pi)
    polished[support] = sol / sol.sum()
    worst = lambda p: (m @ p).max()  # noqa: E731 - the exploitability of p
    return polished if worst(polished) <= worst(pi) + 1e-15 else pi


def nash_policy(matrix: np.ndarray) -> np.ndarray:
    """The Nash policy π* of each game (``[n]`` or ``[B, n]``), by linear programming.

    π* solves ``min_π max_y P(y ≻ π)`` over the simplex, i.e. ``min t s.t. Mπ ≤ t, π ∈ Δ``
    (scipy's HiGHS), then is refined on its support to ~1e-15. When a game has several
    Nash policies (degenerate games), one of them is returned.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim == 2:
        return _nash_one(m)
    return np.stack([_nash_one(g) for g in m])


def _log_softmax_np(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _fixed_point_residual(m: np.ndarray, log_mu: np.ndarray, tau: float, z: np.ndarray) -> np.ndarray:
    """``z − log softmax(log μ + M π / τ)`` with ``π = softmax(z)``: zero exactly at π*_τ."""
    pi = np.exp(z)
    return z - _log_softmax_np(log_mu + np.einsum("bij,bj->bi", m, pi) / tau)


def _newton(
    m: np.ndarray, log_mu: np.ndarray, tau: float, z: np.ndarray, tol: float, steps: int = 60
) -> np.ndarray:
    """Damped Newton on the fixed-point residual (batched), from a nearby ``z``."""
    n = m.shape[-1]
    eye = np.eye(n)
    for _ in range(steps):
        r = _fixed_point_residual(m, log_mu, tau, z)
        norm = np.abs(r).max(-1)
        if norm.max() < tol:
            break
        pi = np.exp(z)
        q = np.exp(z - r)  # softmax(log μ + Mπ/τ)
        d_softmax = pi[..., :, None] * eye - pi[..., :, None] * pi[..., None, :]
        d_logsoftmax = eye - np.ones((n, 1)) * q[..., None, :]
        jac = eye - d_logsoftmax @ (m / tau) @ d_softmax
        step = np.linalg.solve(jac, -r[..., None])[..., 0]
        scale = np.ones(len(z))
        for _ in range(30):  # backtracking: accept a step only where it lowers the residual
            trial = _log_softmax_np(z + scale[:, None] * step)
            better = np.abs(_fixed_point_residual(m, log_mu, tau, trial)).max(-1) < norm
            if better.all():
                break
            scale = np.where(better, scale, scale / 2)
        z = _log_softmax_np(z + scale[:, None] * step)
    return z


def regularized_equilibrium(
    matrix: np.ndarray, reference: np.ndarray, tau: float, *, tol: float = 1e-13
) -> np.ndarray:
    """The Nash policy π*_τ of the KL-regularised game ``J_τ(·, ·; μ)`` (algorithms.md, "The game").

    It is the unique fixed point of ``π ∝ μ · exp(M π / τ)``. Solved by Newton's method along
    a homotopy in τ (from a large τ, where π*_τ ≈ μ, down to the target), to a residual
    below ``tol`` in log-space. Shapes: ``[n, n]`` and ``[n]``, or batched ``[B, n, n]``, ``[B, n]``.
    """
    if tau <= 0:
        raise ValueError(f"tau={tau}: the regularisation strength must be > 0")
    m = np.asarray(matrix, dtype=np.float64)
    single = m.ndim == 2
    m = m[None] if single else m
    log_mu = np.log(np.broadcast_to(np.asarray(reference, dtype=np.float64), m.shape[:2]))
    log_mu = _log_softmax_np(log_mu)
    z = log_mu.copy()
    level = max(tau, 4.0)
    while True:
        z = _newton(m, log_mu, level, z, tol if level == tau else 1e-10)
        if level == tau:
            break
        level = max(tau, level * 0.6)
    residual = np.abs(_fixed_point_residual(m, log_mu, tau, z)).max()
    if not residual < max(tol, 1e-11):
        raise RuntimeError(f"regularized_equilibrium(tau={tau}) did not converge: residual {residual:.3g}")
    pi = np.exp(z)
    return pi[0] if single else pi


# ---------------------------------------------------------------------------------------------
# Metrics (torch, batched over any leading dims)
# ---------------------------------------------------------------------------------------------
def win_rates(matrix: Tensor, policy: Tensor) -> Tensor:
    """``P(y ≻ π)`` for every response y: ``M π``, shape ``[..., n]``."""
    return (matrix @ policy[..., None])[..., 0]


def duality_gap(matrix: Tensor, policy: Tensor) -> Tensor:
    """``gap(π) = 2 · max_y P(y ≻ π) − 1`` (algorithms.md): 0 only at a Nash policy."""
    return 2.0 * win_rates(matrix, policy).amax(-1) - 1.0


def kl_divergence(target: Tensor, logp: Tensor) -> Tensor:
    """``KL(p ‖ π) = Σ p (log p − log π)`` with ``0 · log 0 = 0``; ``π`` given by its log-probs."""
    safe = torch.where(target > 0, target, torch.ones_like(target))
    return torch.where(target > 0, target * (safe.log() - logp), torch.zeros_like(target)).sum(-1)


def game_metrics(matrix: Tensor, logp: Tensor, nash: Tensor) -> dict[str, Tensor]:
    """Gap, ``KL(π*‖π)`` and the L2/L1 distances to π* of policies given by log-probs ``[..., n]``."""
    policy = logp.exp()
    diff = policy - nash
    return {
        "gap": duality_gap(matrix, policy),
        "kl_to_nash": kl_divergence(nash, logp),
        "l2_to_nash": diff.norm(dim=-1),
        "l1_to_nash": diff.abs().sum(-1),
    }


# ---------------------------------------------------------------------------------------------
# The batched dynamics engine
# ---------------------------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) is CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Trajectory:
    """What :func:`run_dynamics` records; every tensor is on the CPU.

    ``steps[r]`` is the iteration after which record ``r`` was taken (0 = the start);
    ``metrics[name]`` and ``policies`` are indexed ``[r, game]`` (``policies`` is None
    unless kept). ``round_policies[t]`` is the policy each time the reference moved:
    COMAL's outer iterates π_{t+1}, after ``round_ends[t]`` iterations.
    """

    steps: Tensor  # [R]
    metrics: dict[str, Tensor]  # name -> [R, B]
    policies: Tensor | None  # [R, B, n]
    final_logp: Tensor  # [B, n]
    nash: Tensor  # [B, n]
    round_ends: list[int]
    round_policies: Tensor  # [T, B, n]

    @property
    def final(self) -> dict[str, Tensor]:
        """The metrics of the last iterate, ``[B]`` each."""
        return {k: v[-1] for k, v in self.metrics.items()}


def record_steps(iterations: int, every: int) -> list[int]:
    """The iterations at which metrics are recorded: 0, every, 2·every, … and always the last."""
    steps = list(range(0, iterations + 1, every))
    if steps[-1] != iterations:
        steps.append(iterations)
    return steps


class _Recorder:
    """Copies log-policies into a device buffer (one copy per record, no host sync) and turns
    each full buffer into metrics in one batched pass, so recording barely slows the loop."""

    CHUNK = 256

    def __init__(self, m: Tensor, nash: Tensor, records: int, keep_policies: bool) -> None:
        self.m, self.nash, self.records = m, nash, records
        self.buffer = torch.empty(min(records, self.CHUNK), *nash.shape, dtype=m.dtype, device=m.device)
        self.metrics: dict[str, Tensor] = {}
        self.policies = torch.empty(records, *nash.shape, dtype=m.dtype) if keep_policies else None
        self.filled = 0  # records written so far
        self.pending = 0  # records in the buffer not yet turned into metrics

    def add(self, logp: Tensor) -> None:
        self.buffer[self.pending].copy_(logp)
        self.pending += 1
        if self.pending == len(self.buffer):
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        chunk = self.buffer[: self.pending]
        for key, value in game_metrics(self.m.unsqueeze(0), chunk, self.nash).items():
            if key not in self.metrics:
                self.metrics[key] = torch.empty(self.records, *value.shape[1:], dtype=value.dtype)
            self.metrics[key][self.filled : self.filled + self.pending] = value.cpu()
        if self.policies is not None:
            self.policies[self.filled : self.filled + self.pending] = chunk.exp().cpu()
        self.filled += self.pending
        self.pending = 0


#: Below this many matrix entries per batch (B·n²), a CPU run uses one thread: the ops are too
#: small to split (on the 2-core CI machine, 2 threads made B=1000, n=50 three times slower).
SINGLE_THREAD_BELOW = 1 << 24


@contextmanager
def _threads_for(m: Tensor) -> Iterator[None]:
    if m.device.type != "cpu" or m.numel() >= SINGLE_THREAD_BELOW:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_dynamics(
    matrices: np.ndarray | Tensor,
    start: np.ndarray | Tensor,
    solver: SubgameSolver,
    reference: ReferenceUpdater,
    iterations: int,
    *,
    nash: np.ndarray | Tensor | None = None,
    record_every: int = 1,
    keep_policies: bool = True,
    device: str | torch.device | None = "auto",
) -> Trajectory:
    """Run ``iterations`` population updates of ``solver`` on a batch of games at once.

    Per iteration k (0-based): ``log π ← solver.population_update(log π, log μ, win_rate)``
    with ``win_rate(log π) = M softmax(log π)``; then ``reference.update`` may move μ (the
    tabular snapshot is ``{"logits": log π}``), and at the start of each outer round
    ``solver.set_strength(reference.strength(round))`` when that is not None. The reference
    starts at the start policy. Metrics against π* (the LP solution unless ``nash`` is
    given) are recorded every ``record_every`` iterations; ``keep_policies=False`` drops
    the recorded policies (``[R, B, n]``) for big batches. Everything is float64.
    """
    dev = resolve_device(device)
    m = torch.as_tensor(np.asarray(matrices) if not isinstance(matrices, Tensor) else matrices)
    m = m.to(dev, torch.float64)
    m = m[None] if m.dim() == 2 else m
    p0 = torch.as_tensor(np.asarray(start) if not isinstance(start, Tensor) else start)
    p0 = p0.to(dev, torch.float64).expand(m.shape[:2])
    if nash is None:
        nash = nash_policy(m.cpu().numpy())
    pi_star = torch.as_tensor(np.asarray(nash) if not isinstance(nash, Tensor) else nash)
    pi_star = pi_star.to(dev, torch.float64).expand(m.shape[:2])

    def win_rate(logp: Tensor) -> Tensor:
        return win_rates(m, logp.softmax(-1))

    steps = record_steps(iterations, record_every)
    recorder = _Recorder(m, pi_star, len(steps), keep_policies)
    logp = p0.log().log_softmax(-1)
    ref: dict[str, Tensor] = {"logits": logp.clone()}
    ref_logp = logp.clone()
    round_index = reference.round_of(0)
    _apply_strength(solver, reference, round_index)
    round_ends: list[int] = []
    round_policies: list[Tensor] = []
    recorder.add(logp)
    slot = 1
    with _threads_for(m), torch.no_grad():  # the dynamics never need gradients
        for k in range(iterations):
            this_round = reference.round_of(k)
            if this_round != round_index:
                round_index = this_round
                _apply_strength(solver, reference, round_index)
            logp = solver.population_update(logp, ref_logp, win_rate)
            moved = reference.update(ref, {"logits": logp}, k)
            if moved is not None:
                ref = moved
                ref_logp = ref["logits"].to(dev, torch.float64).log_softmax(-1)
                round_ends.append(k + 1)
                round_policies.append(logp.exp())
            if slot < len(steps) and steps[slot] == k + 1:
                recorder.add(logp)
                slot += 1
        recorder.flush()
    _check_finite(recorder.metrics["gap"], steps)
    empty = torch.empty(0, *m.shape[:2], dtype=torch.float64)
    return Trajectory(
        steps=torch.tensor(steps),
        metrics=recorder.metrics,
        policies=recorder.policies,
        final_logp=logp.cpu(),
        nash=pi_star.cpu(),
        round_ends=round_ends,
        round_policies=torch.stack(round_policies).cpu() if round_policies else empty,
    )


def _apply_strength(solver: SubgameSolver, reference: ReferenceUpdater, round_index: int) -> None:
    value = reference.strength(round_index)
    if value is not None:
        solver.set_strength(value)


def _check_finite(gaps: Tensor, steps: Sequence[int]) -> None:
    bad = torch.nonzero(~torch.isfinite(gaps).all(-1))
    if len(bad):
        raise FloatingPointError(
            f"the policy became non-finite by iteration {steps[int(bad[0])]}: the solver diverged "
            "(lower its step size or raise its regularisation)"
        )
