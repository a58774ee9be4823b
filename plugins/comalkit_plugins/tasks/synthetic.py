"""``task=synthetic``: run a solver + reference updater on exact preference games (the COMAL paper's synthetic study)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from comalkit.games import (
    AUTO_RECORD_DENSE,
    BACKENDS,
    CHECK_EVERY,
    GAP_TOL,
    GameBatch,
    Trajectory,
    nash_policy,
    resolve_device,
    run_dynamics,
)
from comalkit.interfaces import GameSource, ReferenceUpdater, RunContext, SubgameSolver, Task
from comalkit.registry import ConfigError, current_choice, instantiate, param, plugin

log = logging.getLogger(__name__)
#: Policies are logged per iteration only for games this small (they are always in summary.json).
LOG_POLICY_MAX_N = 16


#: The default iteration cap of a method expected to converge: random games with interior Nash
#: policies have a heavy tail of slow ones, held-out games included (docs/games.md, "Convergence").
#: A long run prints its gap every million iterations.
CONVERGENT_CAP = 100_000_000
#: The default cap of a method not expected to converge: its cycling or plateau shows by then.
OTHER_CAP = 10_000


def _log_progress(cap: int) -> Callable[[int, float], None]:
    def report(done: int, gap: float) -> None:
        log.info("iteration %s of at most %s: gap %.3g", f"{done:,}", f"{cap:,}", gap)

    return report


@plugin("task", "synthetic")
@dataclass
class SyntheticTask(Task):
    """Builds ``game``, ``solver`` and ``reference`` from the config and runs their exact dynamics.

    Uses each solver's population update (the fast path) on a batch of games at once, with
    the LP Nash policy as ground truth, until every game's duality gap is below ``tol`` or
    ``iterations`` have run. Writes ``metrics.jsonl`` (one row per recorded iteration),
    ``gap.png`` and, for 3-response games, ``simplex.png``. With several games, ``gap`` and
    ``kl_to_nash`` are the worst game's (``*_mean`` the average).
    """

    iterations: int = param(
        0,
        ge=0,
        help=f"most population updates to run; 0: {CONVERGENT_CAP:,} for a method expected to converge, "
        f"{OTHER_CAP:,} for the others",
    )
    tol: float = param(
        GAP_TOL, ge=0.0, help="stop once every game's duality gap is below this (0: never stop early)"
    )
    check_every: int = param(CHECK_EVERY, ge=1, help="iterations between two checks of the gap against tol")
    record_every: int = param(
        0,
        ge=0,
        help=f"record metrics every k-th iteration (and always the last); 0: every one up to "
        f"{AUTO_RECORD_DENSE:,}, then every 10th up to {10 * AUTO_RECORD_DENSE:,}, and so on",
    )
    device: str = param("auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    backend: str = param(
        "auto", choices=BACKENDS, help="auto: numpy for small CPU batches when the solver allows, else torch"
    )
    plots: bool = param(True, help="write gap.png (and simplex.png for 3-response games)")

    def run(self, cfg: Any, run: RunContext) -> dict[str, Any]:
        for group in ("game", "solver", "reference"):
            if cfg.get(group) is None:
                raise ConfigError(f"task=synthetic needs {group}=<option> (for example experiment=synthetic)")
        game = instantiate(cfg.game)
        if not isinstance(game, GameSource):
            raise ConfigError(f"game={type(game).__name__} is not a comalkit.interfaces.GameSource")
        solver = instantiate(cfg.solver)
        reference = instantiate(cfg.reference)
        expected, why = convergence_expectation(solver, reference)
        cap = self.iterations or (CONVERGENT_CAP if expected else OTHER_CAP)
        tol = self.tol if self.tol > 0 else None
        batch = game.build()
        nash = nash_policy(batch.matrices)
        log.info(
            "%s: %d game(s) of %d responses, until the gap is below %s or %d iterations",
            batch.source,
            batch.count,
            batch.n,
            f"{tol:g}" if tol else "0 (never)",
            cap,
        )
        if not expected:
            log.info("not expected to converge: %s", why)
        keep = batch.n == 3 or (batch.count == 1 and batch.n <= LOG_POLICY_MAX_N)
        started = time.perf_counter()
        traj = run_dynamics(
            batch.matrices,
            batch.start,
            solver,
            reference,
            cap,
            nash=nash,
            record_every=self.record_every,
            keep_policies=keep,
            device=self.device,
            tol=tol,
            check_every=self.check_every,
            backend=self.backend,
            on_progress=_log_progress(cap),
        )
        seconds = time.perf_counter() - started
        self._log_metrics(traj, run)
        figures = self._plot(traj, batch, run, cfg) if self.plots else []
        summary = _summary(traj, batch, nash)
        summary.update(
            converged=bool(traj.converged) if tol else False,
            iterations=traj.iterations,
            iteration_cap=cap,
            tol=self.tol,
            expected_to_converge=expected,
            expected_to_converge_reason=why,
            device=str(resolve_device(self.device)),
            backend=traj.backend,
            seconds=seconds,
            game_iterations_per_second=batch.count * traj.iterations / max(seconds, 1e-12),
            figures=figures,
        )
        if summary["converged"]:
            log.info(
                "converged: gap %.3g < %g after %d iterations", summary["gap"], self.tol, traj.iterations
            )
        else:
            log.info("not converged: gap %.3g after %d iterations (the cap)", summary["gap"], traj.iterations)
        return summary

    @staticmethod
    def _log_metrics(traj: Trajectory, run: RunContext) -> None:
        ends = np.asarray(traj.round_ends, dtype=np.int64)
        single = traj.final_logp.shape[0] == 1
        with_policy = single and traj.policies is not None and traj.policies.shape[-1] <= LOG_POLICY_MAX_N
        for r, step in enumerate(traj.steps.tolist()):
            row: dict[str, Any] = {"round": int(np.searchsorted(ends, step, side="right"))}
            for key, values in traj.metrics.items():
                row[key] = float(values[r].max())
                if not single:
                    row[f"{key}_mean"] = float(values[r].mean())
            if with_policy:
                row["policy"] = traj.policies[r, 0].tolist()
            run.log(row, step)

    @staticmethod
    def _plot(traj: Trajectory, batch: GameBatch, run: RunContext, cfg: Any) -> list[str]:
        from comalkit.plots import Curve, plot_curves, plot_simplex

        title = _method_name(cfg)
        steps = traj.steps.numpy()
        gaps = traj.metrics["gap"].numpy()
        curves = [
            Curve(f"game {g}" if batch.count > 1 else title, steps, gaps[:, g]) for g in range(batch.count)
        ]
        paths = [plot_curves(curves, run.out_dir / "gap.png", title=f"{title} on {batch.source}")]
        if batch.n == 3:
            titles = [f"{title}: game {g}" if batch.count > 1 else title for g in range(batch.count)]
            paths.append(
                plot_simplex(
                    traj.policies.numpy(),
                    traj.nash.numpy(),
                    run.out_dir / "simplex.png",
                    labels=batch.labels,
                    titles=titles,
                )
            )
        return [p.name for p in paths]


def _method_name(cfg: Any) -> str:
    """``solver + reference`` as chosen on the command line (class names outside Hydra), for titles."""
    names = []
    for group in ("solver", "reference"):
        choice = current_choice(group)
        names.append(choice if choice != "?" else cfg[group]._target_.rsplit(".", 1)[-1])
    return " + ".join(names)


def _summary(traj: Trajectory, batch: GameBatch, nash: np.ndarray) -> dict[str, Any]:
    """Final metrics; one game: flat lists, several: per-game lists with the worst game headlined."""
    final = {k: v.numpy() for k, v in traj.final.items()}
    policy = traj.final_logp.exp().numpy()
    single = batch.count == 1
    summary: dict[str, Any] = {
        "game": batch.source,
        "games": batch.count,
        "responses": batch.n,
        "final_policy": policy[0].tolist() if single else policy.tolist(),
        "nash_policy": nash.reshape(policy.shape)[0].tolist() if single else nash.tolist(),
        "rounds": len(traj.round_ends),
    }
    for key, values in final.items():
        summary[key] = float(values.max())
        if not single:
            summary[f"{key}_mean"] = float(values.mean())
            summary[f"{key}_per_game"] = values.tolist()
    summary["objective"] = summary["gap"]
    return summary


def convergence_expectation(solver: SubgameSolver, reference: ReferenceUpdater) -> tuple[bool, str]:
    """Whether the method's last iterate should reach the game's Nash policy π*, and why (one line).

    Following the COMAL paper (Liu et al. 2025, Sec. 5 and Theorem 1): only a prox step over
    KL-regularised subgames, each solved by several iterations (COMAL), or a method that
    converges by itself (extragradient) is expected to reach π*.
    """
    from comalkit_plugins.references.updaters import FixedReference, ProxReference
    from comalkit_plugins.solvers.dpo import DPO
    from comalkit_plugins.solvers.game_only import Extragradient, NashMD
    from comalkit_plugins.solvers.inpo import INPO
    from comalkit_plugins.solvers.ipo import IPO, IterIPO
    from comalkit_plugins.solvers.mpo import MPO
    from comalkit_plugins.solvers.sppo import SPPO

    name, ref = type(solver).__name__, type(reference).__name__
    if isinstance(solver, Extragradient):
        return (
            True,
            "extragradient: its last iterate converges on the unregularised game, no reference needed",
        )
    if isinstance(solver, (IterIPO, SPPO)):
        return False, f"{name} ignores the reference: multiplicative weights on the last iterate, which cycle"
    if isinstance(reference, FixedReference):
        return (
            False,
            f"{name} with a fixed reference converges to the regularised equilibrium π*_τ, not to π*",
        )
    if isinstance(solver, (IPO, DPO)):
        return (
            False,
            f"{name} with a moving reference is iterated {name} (one step per subgame), which cycles",
        )
    if isinstance(solver, (INPO, NashMD, MPO)) and isinstance(reference, ProxReference):
        if reference.period < 2:
            return (
                False,
                f"{name} with the reference moved every iteration (period 1) is Iter-IPO, which cycles",
            )
        return True, f"COMAL: {name} solves each KL-regularised subgame, then μ moves (prox point, Theorem 1)"
    return False, f"no last-iterate convergence result is known for solver {name} with reference {ref}"
