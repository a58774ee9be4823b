"""Judge variants on the shipped check set: accuracy per order, log-loss and calibration, both halves.

Every variant is fitted (temperature, ensemble weights) on ``checks_tune`` only and reported on
both ``checks_tune`` and ``checks_heldout``. Each pair is judged in both orders: P(good ≻ bad)
with the good answer first and 1 − P(bad ≻ good) with it second. Bradley–Terry scorers are
exactly antisymmetric, so their two orders agree; the prompted judge's need not.

Per-response scores are computed once per judge model and written to ``--features`` (JSON), so
the analysis can be rerun without loading models (``--reuse``). Run from the repository root:

    .venv/bin/python bench/bench_judges.py --features /tmp/judge_features.json
    .venv/bin/python bench/bench_judges.py --features /tmp/judge_features.json --reuse
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HALVES = ("checks_tune", "checks_heldout")
JUDGES = ("smollm2", "gemma3-270m")


def rows_of(half: str) -> list[dict[str, Any]]:
    from comalkit_plugins.oracles.checks import load_check_set

    return load_check_set(half)


def judge_features(judge: str, rows: list[dict[str, Any]], prompted: bool) -> dict[str, list[float]]:
    """Per-row scores of the good and the bad answer under one judge model, for every scorer."""
    from comalkit_plugins.oracles.judge_lm import JudgeModel
    from comalkit_plugins.oracles.llm_judge import DEFAULT_QUESTION, LlmJudge

    model = JudgeModel.shared(judge)
    out: dict[str, list[float]] = {}
    for r in rows:
        pair = [r["good"], r["bad"]]
        cond, _ = model.response_scores(r["prompt"], pair)
        uncond, _ = model.response_scores("", pair)
        yes_no, _ = model.yes_no_scores(r["prompt"], pair, DEFAULT_QUESTION)
        for name, t in (("likelihood", cond), ("unconditioned", uncond), ("yes_no", yes_no)):
            out.setdefault(f"{name}_good", []).append(float(t[0]))
            out.setdefault(f"{name}_bad", []).append(float(t[1]))
    if prompted:
        from comalkit.interfaces import Comparison

        judge_lm = LlmJudge(judge=judge, mode="prompted")
        first, second = judge_lm.both_orders([Comparison(r["prompt"], r["good"], r["bad"]) for r in rows])
        out["prompted_first"] = [float(p) for p in first]  # good in slot A
        out["prompted_second"] = [float(p) for p in second]  # good in slot B
    return out


def margins(feats: dict[str, Any], judge: str, score: str) -> torch.Tensor:
    """s(good) − s(bad) per row for one (judge, score); pmi = likelihood − unconditioned."""
    f = feats[judge]
    if score == "pmi":
        return margins(feats, judge, "likelihood") - margins(feats, judge, "unconditioned")
    return torch.tensor(f[f"{score}_good"], dtype=torch.float64) - torch.tensor(
        f[f"{score}_bad"], dtype=torch.float64
    )


def fit_weights(x: torch.Tensor, l2: float = 1e-3) -> torch.Tensor:
    """Weights w minimising the log-loss of σ(w·x) = 1 on the margins ``x`` [rows, features]
    (and σ(−w·x) = 0 on the swapped order, the same loss), plus a small L2 penalty."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(x @ w)).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def report(p_first: torch.Tensor, p_second: torch.Tensor) -> dict[str, float]:
    """Accuracy per order, both orders right, log-loss and the share within 0.1 of ½ (both orders pooled).

    ``p_first``: P(good ≻ bad) with the good answer first; ``p_second``: the same with it second.
    """
    both = torch.cat([p_first, p_second]).clamp(1e-12, 1 - 1e-12)
    return {
        "first": float((p_first > 0.5).double().mean()),
        "second": float((p_second > 0.5).double().mean()),
        "both": float(((p_first > 0.5) & (p_second > 0.5)).double().mean()),
        "log_loss": float(-both.log().mean()),
        "near_half": float(((both - 0.5).abs() < 0.1).double().mean()),
    }


Variant = tuple[str, Callable[[dict[str, Any]], torch.Tensor]]


def linear_variants() -> list[tuple[str, list[tuple[str, str]]]]:
    """(name, [(judge, score), ...]): Bradley–Terry on a weighted sum of score margins."""
    out = []
    for judge in JUDGES:
        for score in ("likelihood", "pmi", "yes_no"):
            out.append((f"{judge} {score}", [(judge, score)]))
    out += [
        ("smollm2 + gemma likelihood", [(j, "likelihood") for j in JUDGES]),
        ("smollm2 + gemma pmi", [(j, "pmi") for j in JUDGES]),
        ("smollm2 likelihood + unconditioned", [("smollm2", "likelihood"), ("smollm2", "unconditioned")]),
        (
            "gemma likelihood + unconditioned",
            [("gemma3-270m", "likelihood"), ("gemma3-270m", "unconditioned")],
        ),
        (
            "smollm2 + gemma, likelihood + unconditioned",
            [(j, s) for j in JUDGES for s in ("likelihood", "unconditioned")],
        ),
        (
            "smollm2 + gemma, likelihood + unconditioned + yes_no",
            [(j, s) for j in JUDGES for s in ("likelihood", "unconditioned", "yes_no")],
        ),
        (
            "gemma likelihood + unconditioned + yes_no",
            [("gemma3-270m", s) for s in ("likelihood", "unconditioned", "yes_no")],
        ),
    ]
    return out


def analyse(feats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    results = []
    for name, parts in linear_variants():
        if any(j not in feats["checks_tune"] for j, _ in parts):
            continue
        x = {h: torch.stack([margins(feats[h], j, s) for j, s in parts], dim=1) for h in HALVES}
        raw = x["checks_tune"].sum(1, keepdim=True) if len(parts) > 1 else x["checks_tune"]
        untuned_w = torch.ones(len(parts), dtype=torch.float64)  # T = 1, equal weights
        tuned_w = fit_weights(x["checks_tune"])
        del raw
        for label, w in (("T = 1" if len(parts) == 1 else "sum, T = 1", untuned_w), ("fitted", tuned_w)):
            row: dict[str, Any] = {
                "variant": name,
                "scale": label,
                "weights": [round(float(v), 3) for v in w],
            }
            for h in HALVES:
                p = torch.sigmoid(x[h] @ w)
                row[h] = report(p, p)
            results.append(row)
    for judge in JUDGES:
        f = feats["checks_tune"].get(judge, {})
        if "prompted_first" not in f:
            continue
        row = {"variant": f"{judge} prompted (pairwise template)", "scale": "swap-averaged", "weights": []}
        for h in HALVES:
            first = torch.tensor(feats[h][judge]["prompted_first"], dtype=torch.float64)
            second = torch.tensor(feats[h][judge]["prompted_second"], dtype=torch.float64)
            row[h] = report(first, second)
            row[h]["swap_averaged"] = float(((first + second) / 2 > 0.5).double().mean())
        results.append(row)
    return results


def per_kind(
    feats: dict[str, Any], parts: list[tuple[str, str]], w: torch.Tensor, half: str
) -> dict[str, str]:
    from collections import Counter

    rows = rows_of(half)
    x = torch.stack([margins(feats[half], j, s) for j, s in parts], dim=1)
    right = (x @ w) > 0
    total, ok = Counter(r["kind"] for r in rows), Counter(r["kind"] for r, g in zip(rows, right) if g)
    return {k: f"{ok[k]}/{total[k]}" for k in sorted(total)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, required=True, help="JSON file of per-response scores")
    parser.add_argument("--reuse", action="store_true", help="read --features instead of computing them")
    parser.add_argument("--prompted", action="store_true", help="also the prompted pairwise judge (slow)")
    parser.add_argument("--judges", nargs="+", default=list(JUDGES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.reuse:
        feats = json.loads(args.features.read_text())
    else:
        feats = {h: {} for h in HALVES}
        for judge in args.judges:
            start = time.perf_counter()
            for h in HALVES:
                feats[h][judge] = judge_features(judge, rows_of(h), args.prompted)
            print(f"{judge}: features in {time.perf_counter() - start:.0f} s", flush=True)
            args.features.write_text(json.dumps(feats))
    results = analyse(feats)
    print(
        "| variant | scale | weights | tune: acc | tune: log-loss | tune: within 0.1 of ½ | held-out: first | second | both | log-loss | within 0.1 of ½ |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t, h = r["checks_tune"], r["checks_heldout"]
        print(
            f"| {r['variant']} | {r['scale']} | {r['weights']} | {t['both']:.3f} | {t['log_loss']:.3f} "
            f"| {t['near_half']:.2f} | {h['first']:.3f} | {h['second']:.3f} | {h['both']:.3f} "
            f"| {h['log_loss']:.3f} | {h['near_half']:.2f} |"
        )
    print(json.dumps(results))
    if not math.isnan(0.0):
        pass


if __name__ == "__main__":
    main()
