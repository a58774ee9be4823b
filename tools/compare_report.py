"""The in-loop table of docs/results.md: each job of a comparison multirun, iteration by iteration.

    python tools/compare_report.py multirun/compare

For every job directory (0, 1, ...) it prints a Markdown table of ``win_rate/initial`` (soft, with
its 95 % bootstrap interval, and hard), the untrained control's score, whether μ moved and the
oracle's cycle rate, read from the job's ``metrics.jsonl`` (docs/online.md lists the metrics).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from comalkit.outputs import read_metrics


def method_name(job: Path) -> str:
    """The ``experiment=...`` override that made the job, or its directory name."""
    overrides = job / ".hydra" / "overrides.yaml"
    for line in overrides.read_text().splitlines() if overrides.exists() else []:
        if "experiment=" in line:
            return line.split("experiment=", 1)[1].strip()
    return job.name


def job_table(job: Path) -> str:
    rows = read_metrics(job / "metrics.jsonl")
    lines = [
        f"**{method_name(job)}** (`{job.name}/`)",
        "",
        "| iteration | win rate vs initial [95 % CI] | hard | control [95 % CI] | μ moved | cycle rate |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        soft = (
            f"{r['win_rate/initial']:.3f} [{r['win_rate/initial_low']:.3f}, {r['win_rate/initial_high']:.3f}]"
        )
        control = (
            f"{r['win_rate/control']:.3f} [{r['win_rate/control_low']:.3f}, {r['win_rate/control_high']:.3f}]"
        )
        moved = "yes" if r.get("reference_moved") else "no"
        lines.append(
            f"| {r['iteration'] + 1} | {soft} | {r['win_rate/initial_hard']:.3f} | {control} | {moved} "
            f"| {r['oracle/cycle_rate']:.3f} |"
        )
    summary = job / "summary.json"
    if summary.exists():
        pooled = json.loads(summary.read_text()).get("oracle/cycle_rate_run")
        if pooled is not None:
            lines += ["", f"Cycle rate pooled over the run: {pooled:.3f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the multirun's sweep directory (hydra.sweep.dir)")
    args = parser.parse_args()
    jobs = sorted((p for p in args.sweep.iterdir() if (p / "metrics.jsonl").exists()), key=lambda p: p.name)
    print("\n\n".join(job_table(job) for job in jobs))


if __name__ == "__main__":
    main()
