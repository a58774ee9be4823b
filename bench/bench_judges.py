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
import os
import time
from pathlib import Path
from typing import Any

import torch

HALVES = ("checks_tune", "checks_heldout")
JUDGES = ("smollm2", "gemma3-270m")


def rows_of(half: str) -> list[dict[str, Any]]:
    from comalkit_plugins.oracles.checks import load_check_set

    return load_check_set(half)


MODEL_SCORES = ("likelihood", "unconditioned", "yes_no", "guided", "reverse")


def judge_features(
    judge: str, rows: list[dict[str, Any]], scores: list[str], prompted: bool
) -> dict[str, list[float]]:
    """Per-row scores of the good and the bad answer under one judge model, for each of ``scores``."""
    from comalkit_plugins.oracles.judge_lm import JudgeModel
    from comalkit_plugins.oracles.llm_judge import DEFAULT_GUIDE, DEFAULT_QUESTION, LlmJudge

    model = JudgeModel.shared(judge)
    read = {
        "likelihood": lambda r, pair: model.response_scores(r["prompt"], pair)[0],
        "unconditioned": lambda r, pair: model.response_scores("", pair)[0],
        "yes_no": lambda r, pair: model.yes_no_scores(r["prompt"], pair, DEFAULT_QUESTION)[0],
        "guided": lambda r, pair: model.response_scores(r["prompt"], pair, DEFAULT_GUIDE)[0],
        "reverse": lambda r, pair: model.reverse_scores(r["prompt"], pair)[0],
    }
    out: dict[str, list[float]] = {}
    for r in rows:
        pair = [r["good"], r["bad"]]
        for name in scores:
            t = read[name](r, pair)
            out.setdefault(f"{name}_good", []).append(float(t[0]))
            out.setdefault(f"{name}_bad", []).append(float(t[1]))
    if prompted:
        from comalkit.interfaces import Comparison

        judge_lm = LlmJudge(judge=judge, mode="prompted")
        first, second = judge_lm.both_orders([Comparison(r["prompt"], r["good"], r["bad"]) for r in rows])
        out["prompted_first"] = [float(p) for p in first]  # good in slot A
        out["prompted_second"] = [float(p) for p in second]  # good in slot B
    return out


def margins(feats: dict[str, Any], half: str, judge: str, score: str) -> torch.Tensor:
    """s(good) − s(bad) per row of ``half`` for one (judge, score); pmi = likelihood − unconditioned;
    ``repetition`` reads no model (judge ``text``)."""
    if score == "repetition":
        from comalkit_plugins.oracles.llm_judge import repetition_score

        values = [repetition_score(r["good"]) - repetition_score(r["bad"]) for r in rows_of(half)]
        return torch.tensor(values, dtype=torch.float64)
    if score == "pmi":
        return margins(feats, half, judge, "likelihood") - margins(feats, half, judge, "unconditioned")
    f = feats[half][judge]
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


def loo_log_loss(x: torch.Tensor) -> tuple[float, float]:
    """Leave-one-out log-loss and accuracy of the fitted weights on the rows of ``x``: how a variant
    generalises, read from the tuning half alone (its in-sample fit flatters many-weight variants)."""
    losses, right = [], 0
    for i in range(x.shape[0]):
        keep = torch.cat([x[:i], x[i + 1 :]])
        z = float(x[i] @ fit_weights(keep))
        losses.append(float(torch.nn.functional.softplus(torch.tensor(-z))))
        right += z > 0
    return sum(losses) / len(losses), right / x.shape[0]


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


S, G, TEXT = "smollm2", "gemma3-270m", "text"
LU = ("likelihood", "unconditioned")
#: likelihood + unconditioned + repetition: of SmolLM2, of Gemma, of both
SLUR = [(S, "likelihood"), (S, "unconditioned"), (TEXT, "repetition")]
GLUR = [(G, "likelihood"), (G, "unconditioned"), (TEXT, "repetition")]
SGLUR = [(j, s) for j in (S, G) for s in LU] + [(TEXT, "repetition")]


def linear_variants() -> list[tuple[str, list[tuple[str, str]]]]:
    """(name, [(judge, score), ...]): Bradley–Terry on a weighted sum of score margins."""
    out = [(f"{j} {s}", [(j, s)]) for j in (S, G) for s in ("likelihood", "pmi", "yes_no")]
    out += [
        ("repetition (text statistic)", [(TEXT, "repetition")]),
        ("smollm2 + gemma likelihood", [(S, "likelihood"), (G, "likelihood")]),
        ("smollm2 likelihood + guided", [(S, "likelihood"), (S, "guided")]),
        (
            "smollm2 likelihood + guided + unconditioned + repetition",
            [(S, s) for s in (*LU, "guided")] + [(TEXT, "repetition")],
        ),
        (
            "gemma likelihood + guided + unconditioned + repetition",
            [(G, s) for s in (*LU, "guided")] + [(TEXT, "repetition")],
        ),
        (
            "smollm2 + gemma, likelihood + guided + unconditioned + repetition",
            [(j, s) for j in (S, G) for s in (*LU, "guided")] + [(TEXT, "repetition")],
        ),
        ("smollm2 + gemma pmi", [(S, "pmi"), (G, "pmi")]),
        ("smollm2 likelihood + unconditioned", [(S, s) for s in LU]),
        ("gemma likelihood + unconditioned", [(G, s) for s in LU]),
        ("smollm2 + gemma, likelihood + unconditioned", [(j, s) for j in (S, G) for s in LU]),
        (
            "smollm2 + gemma, likelihood + unconditioned + yes_no",
            [(j, s) for j in (S, G) for s in (*LU, "yes_no")],
        ),
        ("smollm2 likelihood + repetition", [(S, "likelihood"), (TEXT, "repetition")]),
        ("smollm2 likelihood + unconditioned + repetition", [(S, s) for s in LU] + [(TEXT, "repetition")]),
        ("gemma likelihood + repetition", [(G, "likelihood"), (TEXT, "repetition")]),
        ("gemma likelihood + unconditioned + repetition", [(G, s) for s in LU] + [(TEXT, "repetition")]),
        (
            "smollm2 + gemma likelihood + repetition",
            [(S, "likelihood"), (G, "likelihood"), (TEXT, "repetition")],
        ),
        (
            "smollm2 + gemma, likelihood + unconditioned + repetition",
            [(j, s) for j in (S, G) for s in LU] + [(TEXT, "repetition")],
        ),
        (
            "smollm2 + gemma, likelihood + unconditioned + yes_no + repetition",
            [(j, s) for j in (S, G) for s in (*LU, "yes_no")] + [(TEXT, "repetition")],
        ),
        ("smollm2 reverse", [(S, "reverse")]),
        ("gemma reverse", [(G, "reverse")]),
        ("smollm2 + gemma reverse", [(S, "reverse"), (G, "reverse")]),
        ("smollm2 likelihood + unconditioned + repetition + smollm2 reverse", [*SLUR, (S, "reverse")]),
        ("smollm2 likelihood + unconditioned + repetition + gemma reverse", [*SLUR, (G, "reverse")]),
        (
            "smollm2 likelihood + unconditioned + repetition + smollm2 + gemma reverse",
            [*SLUR, (S, "reverse"), (G, "reverse")],
        ),
        ("gemma likelihood + unconditioned + repetition + gemma reverse", [*GLUR, (G, "reverse")]),
        (
            "smollm2 + gemma, likelihood + unconditioned + repetition + smollm2 reverse",
            [*SGLUR, (S, "reverse")],
        ),
        (
            "smollm2 + gemma, likelihood + unconditioned + repetition + gemma reverse",
            [*SGLUR, (G, "reverse")],
        ),
        (
            "smollm2 + gemma, likelihood + unconditioned + repetition + smollm2 + gemma reverse",
            [*SGLUR, (S, "reverse"), (G, "reverse")],
        ),
    ]
    return out


def available(feats: dict[str, Any], parts: list[tuple[str, str]]) -> bool:
    tune = feats["checks_tune"]
    need = {"pmi": "unconditioned"}
    return all(j == TEXT or f"{need.get(s, s)}_good" in tune.get(j, {}) for j, s in parts)


def analyse(feats: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every variant untuned (T = 1, weights 1) and fitted on the tuning half, reported on both."""
    results = []
    for name, parts in linear_variants():
        if not available(feats, parts):
            continue
        x = {h: torch.stack([margins(feats, h, j, s) for j, s in parts], dim=1) for h in HALVES}
        untuned = torch.ones(len(parts), dtype=torch.float64)
        loo = loo_log_loss(x["checks_tune"])
        for label, w in (
            ("T = 1" if len(parts) == 1 else "sum, T = 1", untuned),
            ("fitted", fit_weights(x["checks_tune"])),
        ):
            row: dict[str, Any] = {
                "variant": name,
                "scale": label,
                "parts": parts,
                "weights": [round(float(v), 3) for v in w],
            }
            for h in HALVES:
                p = torch.sigmoid(x[h] @ w)
                row[h] = report(p, p)
            if label == "fitted":
                row["checks_tune"]["loo_log_loss"], row["checks_tune"]["loo_accuracy"] = loo
            results.append(row)
    for judge in (S, G):
        if "prompted_first" not in feats["checks_tune"].get(judge, {}):
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
    feats: dict[str, Any], parts: list[tuple[str, str]], w: list[float], half: str
) -> dict[str, str]:
    """Right/total per kind of ``half`` for one fitted variant."""
    from collections import Counter

    rows = rows_of(half)
    x = torch.stack([margins(feats, half, j, s) for j, s in parts], dim=1)
    right = (x @ torch.tensor(w, dtype=torch.float64)) > 0
    total, ok = Counter(r["kind"] for r in rows), Counter(r["kind"] for r, g in zip(rows, right) if g)
    return {k: f"{ok[k]}/{total[k]}" for k in sorted(total)}


def merge(files: list[Path]) -> dict[str, Any]:
    feats: dict[str, Any] = {h: {} for h in HALVES}
    for file in files:
        for h, judges in json.loads(file.read_text()).items():
            for judge, values in judges.items():
                feats[h].setdefault(judge, {}).update(values)
    return feats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--features", type=Path, nargs="+", required=True, help="JSON files of per-response scores"
    )
    parser.add_argument("--reuse", action="store_true", help="read --features instead of computing them")
    parser.add_argument("--prompted", action="store_true", help="also the prompted pairwise judge (slow)")
    parser.add_argument("--judges", nargs="+", default=[S, G])
    parser.add_argument("--scores", nargs="+", default=list(MODEL_SCORES), choices=MODEL_SCORES)
    parser.add_argument(
        "--per-kind", help="also print the tuning half's per-kind score of this fitted variant"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.reuse:
        feats = merge(args.features)
    else:
        feats = {h: {} for h in HALVES}
        for judge in args.judges:
            start = time.perf_counter()
            for h in HALVES:
                feats[h][judge] = judge_features(judge, rows_of(h), args.scores, args.prompted)
            print(f"{judge}: features in {time.perf_counter() - start:.0f} s", flush=True)
            args.features[0].write_text(json.dumps(feats))
    results = analyse(feats)
    print(
        "| variant | scale | weights | tune: both orders | tune: log-loss | tune: within 0.1 of ½ "
        "| tune, leave-one-out: log-loss | accuracy "
        "| held-out: first | second | both | log-loss | within 0.1 of ½ |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t, h = r["checks_tune"], r["checks_heldout"]
        print(
            f"| {r['variant']} | {r['scale']} | {r['weights']} | {t['both']:.3f} | {t['log_loss']:.3f} "
            f"| {t['near_half']:.2f} | {t.get('loo_log_loss', float('nan')):.3f} "
            f"| {t.get('loo_accuracy', float('nan')):.3f} | {h['first']:.3f} | {h['second']:.3f} | {h['both']:.3f} "
            f"| {h['log_loss']:.3f} | {h['near_half']:.2f} |"
        )
        if r["variant"] == args.per_kind and r["scale"] == "fitted":
            print(f"|   per kind, tuning half: {per_kind(feats, r['parts'], r['weights'], 'checks_tune')} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
