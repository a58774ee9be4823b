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

Formulas follow the COMAL paper (Liu et al. 2025, "COMAL: A Convergent
Meta-Algorithm for Aligning LLMs with General Preferences").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from comalkit.interfaces import ReferenceUpdater, Snapshot, SubgameSolver
from comalkit.registry import ConfigError
from comalkit.schedule import RoundSchedule

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
#: Default duality-gap tolerance at which ``task=synthetic`` stops (``task.tol``).
GAP_TOL = 1e-8
#: Default number of iterations between two convergence checks (``task.check_every``).
CHECK_EVERY = 100
#: Default number of iterations between two progress reports (``on_progress``) of a long run.
PROGRESS_EVERY = 1_000_000
#: On CPU, batches of at most this many matrix entries (B·n²) run on numpy when the solver
#: allows it (``numpy_update``): a torch op costs ~3 µs of dispatch against ~1 µs in numpy,
#: and single-threaded numpy stayed ahead of torch up to about 2.5M entries (docs/games.md, "Speed").
NUMPY_MAX_ENTRIES = 1 << 20
BACKENDS = ("auto", "numpy", "torch")
#: With ``record_every=0``, every iteration is recorded up to this one, then every 10th up to
#: ten times it, every 100th up to a hundred times it, and so on (a few thousand records).
AUTO_RECORD_DENSE = 1000
#: A single game's ``Σ exp(logits)`` inside this range is summed without the max shift.
_SAFE_SUM = (1e-300, 1e300)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"`` (or None) is CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def normalise_numpy(logits: np.ndarray) -> np.ndarray:
    """``logits − log Σ exp(logits)`` over the last axis: the solvers' ``normalise`` on numpy.

    For one game (1-D) the sum is taken without the max shift when it lies well inside the
    float range, which is the common case and saves a reduction; otherwise, and for
    batches, the usual max-shifted form. Both are exact to rounding.
    """
    if logits.ndim == 1:
        total = float(_add_reduce(_exp(logits)))
        if _SAFE_SUM[0] < total < _SAFE_SUM[1]:
            return logits - math.log(total)
        shifted = logits - _max_reduce(logits)
        return shifted - math.log(float(_add_reduce(_exp(shifted))))
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


# ufuncs called directly: ndarray.sum/max go through Python wrappers that cost ~1 µs each
_exp, _add_reduce, _max_reduce = np.exp, np.add.reduce, np.maximum.reduce


@dataclass
class Trajectory:
    """What :func:`run_dynamics` records; every tensor is on the CPU.

    ``steps[r]`` is the iteration after which record ``r`` was taken (0 = the start);
    ``metrics[name]`` and ``policies`` are indexed ``[r, game]`` (``policies`` is None
    unless kept). ``round_policies[t]`` is the policy each time the reference moved:
    COMAL's outer iterates π_{t+1}, after ``round_ends[t]`` iterations. ``iterations`` is
    how many were run (fewer than asked when the gap fell below ``tol`` first), and
    ``converged`` whether every game's final gap is below ``tol`` (None without one).
    """

    steps: Tensor  # [R]
    metrics: dict[str, Tensor]  # name -> [R, B]
    policies: Tensor | None  # [R, B, n]
    final_logp: Tensor  # [B, n]
    nash: Tensor  # [B, n]
    round_ends: list[int]
    round_policies: Tensor  # [T, B, n]
    iterations: int = 0
    converged: bool | None = None
    backend: str = "torch"

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
    """Copies log-policies into a buffer (one copy per record, no host sync) and turns each
    full buffer into metrics in one batched torch pass, so recording barely slows the loop.
    The buffer is a device tensor, or a numpy array on the numpy path."""

    CHUNK = 256

    def __init__(self, m: Tensor, nash: Tensor, keep_policies: bool, on_numpy: bool) -> None:
        self.m, self.nash, self.on_numpy = m, nash, on_numpy
        if on_numpy:
            self.m_np, self.nash_np = m.cpu().numpy(), nash.cpu().numpy()
        shape = (self.CHUNK, *nash.shape)
        self.buffer = np.empty(shape) if on_numpy else torch.empty(shape, dtype=m.dtype, device=m.device)
        self.steps: list[int] = []
        self.metrics: dict[str, list[Tensor]] = {}
        self.policies: list[Tensor] | None = [] if keep_policies else None
        self.pending = 0  # records in the buffer not yet turned into metrics

    def add(self, step: int, logp: Any) -> None:
        self.buffer[self.pending] = logp
        self.steps.append(step)
        self.pending += 1
        if self.pending == self.CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        chunk = self.buffer[: self.pending]
        if self.on_numpy:  # no torch op: torch's idle worker threads would spin on the CPU
            values = {
                k: torch.from_numpy(v) for k, v in _metrics_numpy(self.m_np, chunk, self.nash_np).items()
            }
        else:
            values = {k: v.cpu() for k, v in game_metrics(self.m.unsqueeze(0), chunk, self.nash).items()}
        for key, value in values.items():
            self.metrics.setdefault(key, []).append(value)
        if self.policies is not None:
            self.policies.append(torch.from_numpy(np.exp(chunk)) if self.on_numpy else chunk.exp().cpu())
        self.pending = 0

    def result(self) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        self.flush()
        metrics = {key: torch.cat(chunks) for key, chunks in self.metrics.items()}
        policies = torch.cat(self.policies) if self.policies is not None else None
        return torch.tensor(self.steps), metrics, policies


def _metrics_numpy(m: np.ndarray, logp: np.ndarray, nash: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`game_metrics` on numpy arrays (``m`` ``[B, n, n]``, ``logp`` ``[R, B, n]``)."""
    policy = np.exp(logp)
    diff = policy - nash
    safe = np.where(nash > 0, nash, 1.0)
    return {
        "gap": 2.0 * np.matmul(m, policy[..., None])[..., 0].max(-1) - 1.0,
        "kl_to_nash": np.where(nash > 0, nash * (np.log(safe) - logp), 0.0).sum(-1),
        "l2_to_nash": np.sqrt((diff * diff).sum(-1)),
        "l1_to_nash": np.abs(diff).sum(-1),
    }


class _ArraySnapshot(Mapping):
    """``{"logits": log π}`` for the reference updater, made a tensor only if the updater reads
    it (prox reads it once per round): building a tensor every iteration would cost more
    than the numpy update itself. It shares memory with the array, which is never modified.
    The loop reuses one instance and points it at each new array; an updater that returns
    it as the new reference gets a copy instead."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __getitem__(self, key: str) -> Tensor:
        if key != "logits":
            raise KeyError(key)
        return torch.from_numpy(self.array)

    def __iter__(self) -> Iterator[str]:
        return iter(("logits",))

    def __len__(self) -> int:
        return 1


class _Ops:
    """What the loop needs from an array library: win rates, the gap, snapshots (torch)."""

    def __init__(self, m: Tensor, on_numpy: bool) -> None:
        self.shape = m.shape[:2]
        if not on_numpy:
            self.win_rate = lambda logp: win_rates(m, logp.softmax(-1))
            self.snapshot = None
            return
        a = m.cpu().numpy()
        if a.shape[0] == 1:  # one game: 1-D policies, a plain mat-vec
            a2, dot = a[0], np.dot
            self.win_rate = lambda logp: dot(a2, _exp(logp))
        else:
            self.win_rate = lambda logp: np.matmul(a, _exp(logp)[..., None])[..., 0]
        self.snapshot = _ArraySnapshot(np.empty(0))
        self.on_numpy = on_numpy
        self.array = a[0] if a.shape[0] == 1 else a

    def bind(self, solver: SubgameSolver, ref_logp: Any) -> Callable[[Any, Any, Any], Any]:
        """The update to call until the reference or the strength next changes.

        On numpy, a solver whose update is ``normalise(a·log π + b·log μ + c·M π)``
        (``log_linear_update``) gets it fused: ``b·log μ`` and ``c·M`` are computed here once
        per round, leaving five array operations and the normalisation per iteration.
        """
        hook = getattr(solver, "log_linear_update", None)  # duck-typed solvers have none
        coefficients = hook() if hook is not None and getattr(self, "on_numpy", False) else None
        if coefficients is None:
            return solver.population_update
        a, b, c = coefficients
        base = b * ref_logp if b else 0.0
        if getattr(self, "_scaled", (None,))[0] != c:  # c·M changes with the strength only
            self._scaled = (c, c * self.array)
        scaled = self._scaled[1]
        if scaled.ndim == 2:
            dot, low, high = np.dot, *_SAFE_SUM

            def update(logp: np.ndarray, _ref: Any, _win: Any) -> np.ndarray:
                logits = a * logp + base + dot(scaled, _exp(logp))
                total = float(_add_reduce(_exp(logits)))  # normalise_numpy's shortcut, inlined
                return logits - math.log(total) if low < total < high else normalise_numpy(logits)

            return update
        matmul = np.matmul
        return lambda logp, _ref, _win: normalise_numpy(
            a * logp + base + matmul(scaled, _exp(logp)[..., None])[..., 0]
        )

    def start(self, p0: Tensor) -> Any:
        logp = p0.log().log_softmax(-1)
        if getattr(self, "on_numpy", False):
            logp = logp.cpu().numpy()
            return logp[0] if self.shape[0] == 1 else logp
        return logp

    def gap(self, logp: Any) -> float:
        return 2.0 * float(self.win_rate(logp).max()) - 1.0

    def reference(self, snapshot: Snapshot, like: Any) -> Any:
        """log μ from the updater's snapshot, normalised, in the loop's array type."""
        logits = snapshot["logits"]
        if not isinstance(like, np.ndarray):
            return logits.to(like.device, torch.float64).log_softmax(-1)
        if logits.dtype != torch.float64 or logits.device.type != "cpu" or logits.requires_grad:
            logits = logits.detach().to("cpu", torch.float64)
        array = logits.numpy()
        return normalise_numpy(array if array.shape == like.shape else array.reshape(like.shape))

    def tensor(self, logp: Any) -> Tensor:
        """``[B, n]`` float64 on the CPU."""
        if isinstance(logp, np.ndarray):
            return torch.from_numpy(np.array(logp)).reshape(self.shape)
        return logp.cpu()


#: Below this many matrix entries per batch (B·n²), a CPU run uses one thread: the ops are too
#: small to split (on the 2-core CI machine, 2 threads made B=1000, n=50 three times slower).
SINGLE_THREAD_BELOW = 1 << 24


@contextmanager
def _threads_for(m: Tensor, backend: str) -> Iterator[None]:
    # numpy needs no torch threads; and changing them back costs the next torch op ~30 ms
    if backend == "numpy" or m.device.type != "cpu" or m.numel() >= SINGLE_THREAD_BELOW:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def choose_backend(backend: str, device: torch.device, solver: SubgameSolver, entries: int) -> str:
    """``numpy`` or ``torch`` for a run; ``auto`` takes numpy for small CPU batches when it can."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    able = getattr(solver, "numpy_update", False)  # duck-typed solvers run on torch
    if backend == "numpy":
        if not able or device.type != "cpu":
            why = "its population update is torch-only" if not able else f"the device is {device}"
            raise ConfigError(f"backend=numpy: solver {type(solver).__name__} cannot run on numpy ({why})")
        return "numpy"
    if backend == "auto" and able and device.type == "cpu" and entries <= NUMPY_MAX_ENTRIES:
        return "numpy"
    return "torch"


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
    tol: float | None = None,
    check_every: int = CHECK_EVERY,
    backend: str = "auto",
    on_progress: Callable[[int, float], None] | None = None,
    progress_every: int = PROGRESS_EVERY,
) -> Trajectory:
    """Run up to ``iterations`` population updates of ``solver`` on a batch of games at once.

    Per iteration k (0-based): ``log π ← solver.population_update(log π, log μ, win_rate)``
    with ``win_rate(log π) = M π``; then ``reference.update`` may move μ (the tabular
    snapshot is ``{"logits": log π}``), and at the start of each outer round the
    :class:`~comalkit.schedule.RoundSchedule` gives the solver that round's strength. The reference
    starts at the start policy. With ``tol``, every ``check_every`` iterations the worst
    game's duality gap is computed, and the run stops once it is below ``tol``.
    Metrics against π* (the LP solution unless ``nash`` is given) are recorded every
    ``record_every`` iterations (0: densely early and sparser each decade, see
    :data:`AUTO_RECORD_DENSE`) and at the last; ``keep_policies=False`` drops the recorded
    policies (``[R, B, n]``) and the round policies (one ``[B, n]`` per move of μ, which a run
    to a cap of millions of iterations would otherwise hold by the gigabyte) for big batches and
    long runs. Everything is float64. ``backend``: small CPU
    batches run on numpy (``auto``) when the solver's update allows, else torch.
    ``on_progress(iterations, worst gap)`` is called every ``progress_every`` iterations, so that
    a run of millions of iterations can say how far it is.
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
    chosen = choose_backend(backend, dev, solver, m.numel())
    ops = _Ops(m, chosen == "numpy")
    recorder = _Recorder(m, pi_star, keep_policies, chosen == "numpy")
    with _threads_for(m, chosen), torch.no_grad():  # the dynamics never need gradients
        logp, done, round_ends, round_policies = _loop(
            ops,
            recorder,
            p0,
            solver,
            reference,
            iterations,
            record_every,
            tol,
            check_every,
            keep_policies,
            on_progress,
            progress_every,
        )
    steps, metrics, policies = recorder.result()
    _check_finite(metrics["gap"], steps.tolist())
    shape = (len(round_policies), *m.shape[:2])
    if not round_policies:
        rounds = torch.empty(shape, dtype=torch.float64)
    elif isinstance(logp, np.ndarray):  # one conversion, not one per round
        rounds = torch.from_numpy(np.exp(np.stack(round_policies))).reshape(shape)
    else:
        rounds = torch.stack(round_policies).cpu().exp()
    return Trajectory(
        steps=steps,
        metrics=metrics,
        policies=policies,
        final_logp=ops.tensor(logp),
        nash=pi_star.cpu(),
        round_ends=round_ends,
        round_policies=rounds,
        iterations=done,
        converged=None if tol is None else bool((metrics["gap"][-1] < tol).all()),
        backend=chosen,
    )


def _loop(
    ops: _Ops,
    recorder: _Recorder,
    p0: Tensor,
    solver: SubgameSolver,
    reference: ReferenceUpdater,
    iterations: int,
    record_every: int,
    tol: float | None,
    check_every: int,
    keep_rounds: bool,
    on_progress: Callable[[int, float], None] | None,
    progress_every: int,
) -> tuple[Any, int, list[int], list[Any]]:
    """The iterations themselves; ``(final log π, iterations run, round ends, round policies)``."""
    logp = ops.start(p0)
    ref: Snapshot = {"logits": ops.tensor(logp).reshape(p0.shape).to(p0.device).clone()}
    ref_logp = ops.reference(ref, logp)
    schedule = RoundSchedule(reference, solver)
    round_index = schedule.round_of(0)
    schedule.apply(round_index)
    round_ends: list[int] = []
    round_policies: list[Any] = []
    recorder.add(0, logp)
    win_rate, snapshot, round_of = ops.win_rate, ops.snapshot, schedule.round_of
    update = ops.bind(solver, ref_logp)
    # record_every=0: every iteration up to AUTO_RECORD_DENSE, then ten times sparser each decade
    stride, decade = (record_every, 0) if record_every else (1, AUTO_RECORD_DENSE)
    done = 0
    for k in range(iterations):
        this_round = round_of(k)
        if this_round != round_index:
            round_index = this_round
            if schedule.apply(round_index) is not None:
                update = ops.bind(solver, ref_logp)
        logp = update(logp, ref_logp, win_rate)
        if snapshot is None:
            moved = reference.update(ref, {"logits": logp}, k)
        else:
            snapshot.array = logp
            moved = reference.update(ref, snapshot, k)
        if moved is not None:
            ref = {"logits": moved["logits"].clone()} if moved is snapshot else moved
            ref_logp = ops.reference(ref, logp)
            update = ops.bind(solver, ref_logp)
            round_ends.append(k + 1)
            if keep_rounds:
                round_policies.append(logp)
        done = k + 1
        if done == decade:
            stride, decade = stride * 10, decade * 10
        # below the tolerance, or not finite (which _check_finite then reports)
        stop = tol is not None and done % check_every == 0 and not ops.gap(logp) >= tol
        if stop or done % stride == 0 or done == iterations:
            recorder.add(done, logp)
        if stop:
            break
        if on_progress is not None and done % progress_every == 0:
            on_progress(done, ops.gap(logp))
    return logp, done, round_ends, round_policies


def _check_finite(gaps: Tensor, steps: Sequence[int]) -> None:
    bad = torch.nonzero(~torch.isfinite(gaps).all(-1))
    if len(bad):
        raise FloatingPointError(
            f"the policy became non-finite by iteration {steps[int(bad[0])]}: the solver diverged "
            "(lower its step size or raise its regularisation)"
        )
