"""Game-iterations per second: the batched torch engine against a plain numpy loop.

Both run COMAL (INPO population updates, reference moved to the policy every ``period``
iterations) on the same seeded random games, and their final policies are checked to agree.
The numpy baseline is the obvious implementation: one game at a time, one update at a time;
it runs on the first ``--numpy-games`` games of each batch (its rate does not depend on the
batch size). Usage:

    .venv/bin/python bench/bench_games.py [--sizes 3 10 50] [--batches 1 100 1000] [--iterations 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def numpy_comal(
    matrix: np.ndarray, start: np.ndarray, iterations: int, beta: float, ratio: float, period: int
):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 10, 50])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--numpy-games", type=int, default=8, help="games the numpy loop runs per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from comalkit.__main__ import load_plugins
    from comalkit.games import nash_policy, resolve_device, run_dynamics
    from comalkit.registry import registry

    load_plugins()
    beta, ratio, period = 0.5, 1 / 3, 10  # experiment=synthetic's COMAL settings
    device = resolve_device(args.device)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} iterations={args.iterations}"
    )
    print(
        f"{'n':>4} {'games':>6} {'torch game-it/s':>16} {'numpy game-it/s':>16} {'ratio':>8} {'max |Δπ|':>10}"
    )
    for n in args.sizes:
        for count in args.batches:
            batch = registry.get("game", "random")(size=n, count=count, seed=0, scale=2.0).build()
            solver = registry.get("solver", "inpo")(beta=beta, ratio=ratio)
            reference = registry.get("reference", "prox")(period=period)
            nash = nash_policy(batch.matrices)  # the LP ground truth, outside the timed region
            run_dynamics(
                batch.matrices, batch.start, solver, reference, 10, nash=nash, device=device
            )  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            traj = run_dynamics(
                batch.matrices, batch.start, solver, reference, args.iterations,
                nash=nash, record_every=args.iterations, keep_policies=False, device=device,
            )  # fmt: skip
            torch_rate = count * args.iterations / (time.perf_counter() - started)
            games = min(count, args.numpy_games)
            started = time.perf_counter()
            finals = [numpy_comal(batch.matrices[g], batch.start[g], args.iterations, beta, ratio, period)
                      for g in range(games)]  # fmt: skip
            numpy_rate = games * args.iterations / (time.perf_counter() - started)
            diff = np.abs(np.stack(finals) - traj.final_logp.exp().numpy()[:games]).max()
            print(
                f"{n:>4} {count:>6} {torch_rate:>16,.0f} {numpy_rate:>16,.0f} {torch_rate / numpy_rate:>8.1f} {diff:>10.1e}"
            )


if __name__ == "__main__":
    main()
