"""Overlay the metric curves of several runs in one figure (the paper's Figure 1(a)).

    python -m comalkit -m experiment=synthetic solver=iter_ipo,sppo,inpo,extragradient reference=fixed,prox
    python -m comalkit.overlay multirun/<date>/<time> [--out fig.png] [--metric gap | --simplex]

Every directory given (a multirun's sweep directory, or single run directories) is searched
for job directories holding ``metrics.jsonl``. A job's label is the overrides from its
``.hydra/overrides.yaml`` that differ between the jobs (the swept ones), so a sweep over
solvers is labelled ``solver=iter_ipo``, ``solver=sppo``, ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comalkit.outputs import read_metrics


@dataclass
class Job:
    """One run directory: its metrics and the command-line overrides that made it."""

    path: Path
    overrides: list[str]
    rows: list[dict]


def _job_key(path: Path) -> tuple[str, int, str]:
    """Multirun jobs in number order (0, 1, ..., 10), other directories by name after them."""
    return str(path.parent), int(path.name) if path.name.isdigit() else sys.maxsize, path.name


def find_jobs(roots: Sequence[str | Path]) -> list[Job]:
    """Every directory under ``roots`` (themselves included) that holds a ``metrics.jsonl``."""
    from omegaconf import OmegaConf

    jobs = []
    for root in map(Path, roots):
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a directory")
        found = sorted({p.parent for p in root.rglob("metrics.jsonl")}, key=_job_key)
        if not found:
            raise FileNotFoundError(f"{root}: no job directory with a metrics.jsonl below it")
        for path in found:
            overrides_file = path / ".hydra" / "overrides.yaml"
            overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
            jobs.append(Job(path, [str(o) for o in overrides or []], read_metrics(path / "metrics.jsonl")))
    return jobs


def labels(jobs: Sequence[Job]) -> list[str]:
    """The overrides that tell jobs apart; the directory name where overrides are missing or equal."""
    shared = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    names = []
    for job in jobs:
        own = [o for o in job.overrides if o not in shared and not o.startswith("hydra.")]
        names.append(" ".join(own) or job.path.name)
    return names


def overlay_simplex(roots: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Draw every job's policy trajectory on one simplex (3-response games; the paper's Figure 3)."""
    from comalkit.plots import plot_simplex_paths

    jobs = find_jobs(roots)
    paths = []
    for job, label in zip(jobs, labels(jobs)):
        policies = [
            r["policy"] for r in job.rows if isinstance(r.get("policy"), list) and len(r["policy"]) == 3
        ]
        if policies:
            paths.append((label, np.array(policies)))
    if not paths:
        raise ValueError(
            "no job logged 3-response policies ('policy' in metrics.jsonl): --simplex needs them"
        )
    summary = jobs[0].path / "summary.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{summary} is missing: it holds the Nash policy to mark")
    nash = json.loads(summary.read_text())["nash_policy"]
    out = Path(out) if out is not None else Path(roots[0]) / "overlay_simplex.png"
    return plot_simplex_paths(paths, np.array(nash), out)


def overlay(
    roots: Sequence[str | Path], out: str | Path | None = None, metric: str = "gap", log: bool = True
) -> Path:
    """Draw ``metric`` against step for every job under ``roots`` into one PNG; return its path.

    A metric logged with ``<metric>_low`` and ``<metric>_high`` (the online loop's win rates and
    their 95 % bootstrap intervals) is drawn with its interval as a band.
    """
    from comalkit.plots import Curve, plot_curves

    jobs = find_jobs(roots)
    curves = []
    for job, label in zip(jobs, labels(jobs)):
        rows = [r for r in job.rows if isinstance(r.get(metric), (int, float))]
        if not rows:
            print(f"comalkit.overlay: {job.path}: no '{metric}' in metrics.jsonl, skipped", file=sys.stderr)
            continue
        band = [
            np.array([r.get(f"{metric}_{end}", np.nan) for r in rows], dtype=float) for end in ("low", "high")
        ]
        low, high = band if not np.isnan(band[0]).any() and not np.isnan(band[1]).any() else (None, None)
        curves.append(
            Curve(label, np.array([r["step"] for r in rows]), np.array([r[metric] for r in rows]), low, high)
        )
    if not curves:
        raise ValueError(f"no job under {', '.join(map(str, roots))} logged '{metric}'")
    out = Path(out) if out is not None else Path(roots[0]) / f"overlay_{metric}.png"
    ylabel = "duality gap" if metric == "gap" else metric
    return plot_curves(curves, out, ylabel=ylabel, log=log)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m comalkit.overlay",
        description="Overlay one metric of every run of a multirun (or of several runs) in one figure.",
    )
    parser.add_argument("dirs", nargs="+", help="a multirun sweep directory, or run directories")
    parser.add_argument("--out", help="output PNG (default: <first dir>/overlay_<metric>.png)")
    parser.add_argument("--metric", default="gap", help="a key of metrics.jsonl (default: gap)")
    parser.add_argument("--linear", action="store_true", help="linear instead of log y axis")
    parser.add_argument(
        "--simplex", action="store_true", help="draw the policy trajectories on the simplex instead"
    )
    args = parser.parse_args(argv)
    try:
        if args.simplex:
            path = overlay_simplex(args.dirs, args.out)
        else:
            path = overlay(args.dirs, args.out, args.metric, log=not args.linear)
    except (FileNotFoundError, ValueError) as exc:
        print(f"comalkit.overlay: {exc}", file=sys.stderr)
        return 2
    print(f"comalkit.overlay: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
