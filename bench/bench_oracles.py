"""Judgments per second of each local oracle on the CPU, without and with the judgment cache.

Workload: win matrices (all K(K-1)/2 pairs) over K candidate responses for P prompts taken
from the shipped check set. Each oracle is timed three ways:

* ``no cache``: the bare oracle behind the diagnostics wrapper (``CachedOracle(oracle, None)``);
* ``cache, cold``: a fresh SQLite cache, so every judgment is made and stored;
* ``cache, warm``: the same work again, answered from the cache (a rerun or a resume).

Each oracle answers one warm-up comparison first (LM judges load their model then). Run from the repository root:

    .venv/bin/python bench/bench_oracles.py            # all local oracles (~5 min on 2 idle cores)
    .venv/bin/python bench/bench_oracles.py --quick    # rule-based oracles and the HTTP round trip only
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.oracle_cache import CachedOracle
from comalkit.registry import registry

Work = list[tuple[str, list[str]]]


def workload(prompts: int, k: int) -> Work:
    """P prompts, each with K candidates: its good and bad answer plus other rows' answers."""
    from comalkit_plugins.oracles.checks import load_check_set

    rows = load_check_set("checks_tune")
    pool = [r[key] for r in rows for key in ("good", "bad")]
    out = []
    for i in range(prompts):
        row = rows[i % len(rows)]
        others = [pool[(4 * i + j + 2) % len(pool)] for j in range(k - 2)]
        out.append((row["prompt"], [row["good"], row["bad"], *others]))
    return out


def timed(oracle: PreferenceOracle, work: Work) -> tuple[float, int]:
    start = time.perf_counter()
    judgments = 0
    for prompt, candidates in work:
        oracle.win_matrix(prompt, candidates)
        judgments += len(candidates) * (len(candidates) - 1) // 2
    return time.perf_counter() - start, judgments


def bench(name: str, oracle: PreferenceOracle, work: Work, tmp: Path, repeats: int) -> dict[str, Any]:
    """Best of ``repeats`` for each way (a shared 2-core machine makes single timings noisy)."""
    plain, cold, warm = [], [], []
    for n in range(repeats):
        plain.append(timed(CachedOracle(oracle, None), work)[0])
        cached = CachedOracle(oracle, tmp / f"{name}-{n}.sqlite")
        seconds, judgments = timed(cached, work)
        cold.append(seconds)
        warm.append(timed(cached, work)[0])
        diagnostics = cached.diagnostics()
        cached.cache.close()
    extra = {k: v for k, v in diagnostics.items() if k in ("position_consistency", "failed_fraction")}
    return {
        "oracle": name,
        "judgments": judgments,
        "no_cache_per_s": judgments / min(plain),
        "cold_cache_per_s": judgments / min(cold),
        "warm_cache_per_s": judgments / min(warm),
        **extra,
    }


def build(name: str, **settings: Any) -> PreferenceOracle:
    return registry.get("oracle", name)(**settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="no LM judges")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--gemma", action="store_true", help="also the Gemma-3-270M likelihood judge (pip package)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings per oracle; the best counts (default 3)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--only", nargs="+", help="time only the oracles whose name contains one of these")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    registry.load_entry_points()
    from comalkit.judge_prompt import JudgePrompt
    from comalkit.judge_server import JudgeServer, JudgeService

    rule_work, lm_work = workload(40, 8), workload(8, 4)
    rules = [{"oracle": "rule", "kind": "longer"}, {"oracle": "rule", "kind": "rps"}]
    rules.append({"oracle": "rule", "kind": "keyword", "keywords": {"the": 1.0}})
    server = JudgeServer(JudgeService(build("rule", kind="longer"), JudgePrompt.load("pairwise")))
    cases: list[tuple[str, Callable[[], PreferenceOracle], Work]] = [
        ("rule (longer)", lambda: build("rule", kind="longer"), rule_work),
        ("rule (rps)", lambda: build("rule", kind="rps"), rule_work),
        ("mixture of 3 rules", lambda: build("mixture", components=rules), rule_work),
        ("http_judge -> served rule", lambda: build("http_judge", base_url=server.url), workload(10, 6)),
    ]
    if not args.quick:
        cases += [
            ("llm_judge default", lambda: build("llm_judge"), lm_work),
            (
                "llm_judge likelihood (smollm2, the old default)",
                lambda: build("llm_judge", judge="smollm2"),
                lm_work,
            ),
            ("mixture of 2 reward models (smollm2)", lambda: build("mixture"), lm_work),
            ("llm_judge prompted (smollm2)", lambda: build("llm_judge", mode="prompted"), lm_work[:4]),
        ]
    if args.gemma:
        cases.append(
            ("llm_judge likelihood (gemma3-270m)", lambda: build("llm_judge", judge="gemma3-270m"), lm_work)
        )
    if args.only:
        cases = [case for case in cases if any(text in case[0] for text in args.only)]
    print(
        f"torch threads: {args.threads}; best of {args.repeats}; candidates per prompt: rules 8, http 6, LM judges 4"
    )
    print("| oracle | judgments | no cache (j/s) | cache, cold (j/s) | cache, warm (j/s) |")
    print("|---|---|---|---|---|", flush=True)
    rows = []
    with server, tempfile.TemporaryDirectory() as tmp_dir:
        for name, make, work in cases:
            oracle = make()
            oracle.compare([Comparison("warm-up", "a", "b")])  # loads models before timing
            r = bench(name, oracle, work, Path(tmp_dir), args.repeats)
            oracle.close()
            rows.append(r)
            print(
                f"| {name} | {r['judgments']} | {r['no_cache_per_s']:.4g} | {r['cold_cache_per_s']:.4g} "
                f"| {r['warm_cache_per_s']:.4g} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
