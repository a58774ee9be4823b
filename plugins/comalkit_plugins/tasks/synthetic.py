"""``task=synthetic``: run a solver + reference updater on exact preference games (the COMAL paper's synthetic study)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from comalkit.games import GameBatch, GameSource, Trajectory, nash_policy, resolve_device, run_dynamics
from comalkit.interfaces import RunContext, Task
from comalkit.registry import ConfigError, current_choice, instantiate, param, plugin

log = logging.getLogger(__name__)
#: Policies are logged per iteration only for games this small (they are always in summary.json).
LOG_POLICY_MAX_N = 16


@plugin("task", "synthetic")
@dataclass
class SyntheticTask(Task):
    """Builds ``game``, ``solver`` and ``reference`` from the config and runs their exact dynamics.

    Uses each solver's population update (the fast path) on a batch of games at once, with
    the LP Nash policy as ground truth. Writes ``metrics.jsonl`` (one row per recorded
    iteration), ``gap.png`` and, for 3-response games, ``simplex.png``. With several games,
    ``gap`` and ``kl_to_nash`` are the worst game's (``*_mean`` the average).
    """

    iterations: int = param(2000, ge=1, help="population updates to run")
    record_every: int = param(1, ge=1, help="record metrics every k-th iteration (and always the last)")
    device: str = param("auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    plots: bool = param(True, help="write gap.png (and simplex.png for 3-response games)")

    def run(self, cfg: Any, run: RunContext) -> dict[str, Any]:
        for group in ("game", "solver", "reference"):
            if cfg.get(group) is None:
                raise ConfigError(f"task=synthetic needs {group}=<option> (for example experiment=synthetic)")
        game = instantiate(cfg.game)
        if not isinstance(game, GameSource):
            raise ConfigError(f"game={type(game).__name__} is not a comalkit.games.GameSource")
        solver = instantiate(cfg.solver)
        reference = instantiate(cfg.reference)
        batch = game.build()
        nash = nash_policy(batch.matrices)
        log.info(
            "%s: %d game(s) of %d responses, %d iterations",
            batch.source,
            batch.count,
            batch.n,
            self.iterations,
        )
        started = time.perf_counter()
        traj = run_dynamics(
            batch.matrices, batch.start, solver, reference, self.iterations,
            nash=nash, record_every=self.record_every, device=self.device,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        self._log_metrics(traj, run)
        figures = self._plot(traj, batch, run, cfg) if self.plots else []
        summary = _summary(traj, batch, nash)
        summary.update(
            iterations=self.iterations,
            device=str(resolve_device(self.device)),
            seconds=seconds,
            game_iterations_per_second=batch.count * self.iterations / max(seconds, 1e-12),
            figures=figures,
        )
        return summary

    @staticmethod
    def _log_metrics(traj: Trajectory, run: RunContext) -> None:
        ends = np.asarray(traj.round_ends, dtype=np.int64)
        single = traj.policies.shape[1] == 1
        for r, step in enumerate(traj.steps.tolist()):
            row: dict[str, Any] = {"round": int(np.searchsorted(ends, step, side="right"))}
            for key, values in traj.metrics.items():
                row[key] = float(values[r].max())
                if not single:
                    row[f"{key}_mean"] = float(values[r].mean())
            if single and traj.policies.shape[-1] <= LOG_POLICY_MAX_N:
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
                )  # fmt: skip
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
