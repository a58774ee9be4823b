"""Game-iterations per second: the game engine (``run_dynamics``) against a plain numpy loop.

Both run COMAL (INPO population updates, reference moved to the policy every ``period``
iterations) on the same seeded random games, and their final policies are checked to agree.
The numpy baseline is the obvious implementation: one game at a time, one update at a time;
it runs on the first ``--numpy-games`` games of each batch (its rate does not depend on the
batch size). The engine picks its backend as ``task=synthetic`` does (numpy for small CPU
batches, torch otherwise; the ``backend`` column). Each row alternates the two ``--repeats``
times and reports the median rates, so that a load change hits both sides. Usage:

    .venv/bin/python bench/bench_games.py [--sizes 3 10 50] [--batches 1 10 1000] [--iterations 2000]
    .venv/bin/python bench/bench_games.py --convergence --sizes 5 7 10 20   # iterations COMAL needs

Rates are per second of process CPU time (``time.process_time``), which a busy machine
disturbs far less than wall-clock time; the engine runs single-threaded at these sizes.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import numpy as np
import torch


def numpy_comal(
    matrix: np.ndarray, start: np.ndarray, iterations: int, beta: float, ratio: float, period: int
) -> np.ndarray:
    """COMAL with INPO, one game: ``log π ← r log μ + (1 − r) log π + M π / β``, normalised; μ ← π every period."""
    logp = np.log(start)
    ref = logp.copy()
    for k in range(iterations):
        logits = ratio * ref + (1 - ratio) * logp + matrix @ np.exp(logp) / beta
        logits -= logits.max()
        logp = logits - np.log(np.exp(logits).sum())
        if (k + 1) % period == 0:
            ref = logp.copy()
    return np.exp(logp)


def run_engine(batch, nash, iterations, device, settings):
    """One engine run of COMAL (``experiment=synthetic``'s INPO + prox) with only the end recorded."""
    from comalkit.games import run_dynamics
    from comalkit.registry import registry

    beta, ratio, period = settings
    solver = registry.get("solver", "inpo")(beta=beta, ratio=ratio)
    reference = registry.get("reference", "prox")(period=period)
    return run_dynamics(
        batch.matrices,
        batch.start,
        solver,
        reference,
        iterations,
        nash=nash,
        record_every=iterations,
        keep_policies=False,
        device=device,
    )


def convergence(sizes: list[int], families: list[str], count: int, seed: int) -> None:
    """Iterations COMAL needs (``experiment=synthetic``'s settings and cap) to reach the task's tolerance."""
    from comalkit_plugins.tasks.synthetic import CONVERGENT_CAP

    from comalkit.games import GAP_TOL, nash_policy, run_dynamics
    from comalkit.registry import instantiate, registry
    from comalkit.testing import compose

    cfg = compose(["experiment=synthetic"])
    print(f"COMAL to gap < {GAP_TOL:g}, cap {CONVERGENT_CAP:,}; {count} games per row, seed {seed}")
    print(f"{'family':>10} {'n':>4} {'interior':>8} {'median':>9} {'max':>9} {'not converged':>13}")
    for family in families:
        for n in sizes:
            batch = registry.get("game", "random")(family=family, size=n, count=count, seed=seed).build()
            interior = int((nash_policy(batch.matrices) > 1e-9).all(-1).sum())
            done = []
            for g in range(count):  # one game at a time: each stops at its own check
                traj = run_dynamics(
                    batch.matrices[g],
                    batch.start[g],
                    instantiate(cfg.solver),
                    instantiate(cfg.reference),
                    CONVERGENT_CAP,
                    record_every=10**9,
                    keep_policies=False,
                    device="cpu",
                    tol=GAP_TOL,
                )
                done.append(traj.iterations if traj.converged else None)
            reached = [d for d in done if d is not None]
            median = f"{int(np.median(reached)):,}" if reached else "-"
            worst = f"{max(reached):,}" if reached else "-"
            print(
                f"{family:>10} {n:>4} {interior:>8} {median:>9} {worst:>9} {done.count(None):>13}", flush=True
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 10, 50])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 10, 1000])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5, help="alternations of engine and numpy per row")
    parser.add_argument("--numpy-games", type=int, default=4, help="games the numpy loop runs per batch")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--convergence", action="store_true", help="instead: iterations COMAL needs on random game families"
    )
    parser.add_argument("--families", nargs="+", default=["interior", "cyclic", "gaussian"])
    parser.add_argument("--count", type=int, default=8, help="games per family and size (--convergence)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the games (--convergence)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.convergence:
        from comalkit.__main__ import load_plugins

        load_plugins()
        convergence(args.sizes, args.families, args.count, args.seed)
        return

    from comalkit.__main__ import load_plugins
    from comalkit.games import nash_policy, resolve_device
    from comalkit.registry import registry

    load_plugins()
    beta, ratio, period = 0.5, 1 / 3, 10  # experiment=synthetic's COMAL settings
    device = resolve_device(args.device)
    print(
        f"device={device} torch={torch.__version__} numpy={np.__version__} threads={torch.get_num_threads()} "
        f"iterations={args.iterations} repeats={args.repeats} load average={os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'n':>4} {'games':>6} {'backend':>8} {'engine game-it/s':>17} {'numpy game-it/s':>16} "
        f"{'ratio':>6} {'max |Δπ|':>9}"
    )
    for n in args.sizes:
        for count in args.batches:
            batch = registry.get("game", "random")(size=n, count=count, seed=0, scale=2.0).build()
            nash = nash_policy(batch.matrices)  # the LP ground truth, outside the timed region
            games = min(count, args.numpy_games)

            engine = functools.partial(
                run_engine, batch, nash, args.iterations, device, (beta, ratio, period)
            )
            engine()  # warm-up
            engine_rates, numpy_rates = [], []
            for _ in range(args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                started = time.process_time()
                traj = engine()
                engine_rates.append(count * args.iterations / (time.process_time() - started))
                started = time.process_time()
                finals = [
                    numpy_comal(batch.matrices[g], batch.start[g], args.iterations, beta, ratio, period)
                    for g in range(games)
                ]
                numpy_rates.append(games * args.iterations / (time.process_time() - started))
            diff = np.abs(np.stack(finals) - traj.final_logp.exp().numpy()[:games]).max()
            fast, slow = statistics.median(engine_rates), statistics.median(numpy_rates)
            print(
                f"{n:>4} {count:>6} {traj.backend:>8} {fast:>17,.0f} {slow:>16,.0f} {fast / slow:>6.2f} {diff:>9.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
