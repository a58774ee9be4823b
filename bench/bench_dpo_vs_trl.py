"""One DPO training step on the CPU: comalkit (Lightning) vs TRL's DPOTrainer, side by side.

Both train SmolLM2-135M-Instruct (the bundled model) with LoRA r=16 (alpha 32) on q/k/v/o, on
the same pairs, 4 pairs per step, every sequence cut to 256 tokens (prompt + response;
the responses are long enough that all 8 sequences of a step are full), β = 0.1, AdamW,
constant LR, gradient clipping at 1.0, bf16 autocast. Each variant runs in its own
process (so peak RSS is its own), ``--warmup`` steps first, then ``--steps`` timed steps;
with ``--repeats`` the variants are interleaved to spread machine noise evenly.

Variants (``--variants``):

* ``comalkit``: bf16 base weights, fp32 LoRA adapter, ``trainer.precision=bf16-mixed``,
  reference log-probs precomputed once with :func:`comalkit.training.precompute_logps`
  (their one-off cost is reported as ``precompute_s`` and amortised in ``tok/s incl. ref``).
* ``comalkit-fp32w``: the same with fp32 base weights.
* ``comalkit-nolean``: ``comalkit`` with ``trainer.lean_logps=false`` (the policy's own
  ``sequence_logps``, which keeps the response logits for the backward pass).
* ``trl``: TRL's defaults for this setup: fp32 weights, ``bf16=True`` (CPU autocast), the
  reference forward (adapter disabled) inside every step.
* ``trl-bf16w``: TRL with bf16 base weights.
* ``trl-precompute``: TRL with ``precompute_ref_log_probs=True`` (its own one-off pass).

Usage::

    python bench/bench_dpo_vs_trl.py                       # all variants, 1 warm-up + 3 timed steps
    python bench/bench_dpo_vs_trl.py --variants comalkit,trl --steps 5 --repeats 2 --out bench.json

Tokens/s counts the non-padding tokens of chosen and rejected sequences per optimizer step
over the median step time; ``cpu s`` is the process CPU time of a step (less sensitive to
other load on a shared machine than wall time). Peak memory is the process's maximum RSS
(``ru_maxrss``); medians over repeats are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from trl_setup import (
    TARGETS,
    StepTimer,
    comalkit_trainer,
    dpo_config,
    lora_config,
    print_result,
    run_child,
    trl_rows,
    trl_tokens,
)

VARIANTS: dict[str, dict[str, Any]] = {
    "comalkit": {"side": "comalkit", "weights": "bfloat16"},
    "comalkit-fp32w": {"side": "comalkit", "weights": "float32"},
    "comalkit-nolean": {"side": "comalkit", "weights": "bfloat16", "lean_logps": False},
    "trl": {"side": "trl", "weights": "float32", "precompute": False},
    "trl-bf16w": {"side": "trl", "weights": "bfloat16", "precompute": False},
    "trl-precompute": {"side": "trl", "weights": "float32", "precompute": True},
}
BETA, LR, RANK, ALPHA = 0.1, 1e-4, 16, 32


def bench_pairs(n: int, min_chars: int = 1600) -> list[dict[str, str]]:
    """``n`` pairs from the shipped sample set with long responses (several answers joined)."""
    from comalkit.preference_data import load_preferences

    data = Path(__file__).resolve().parents[1] / "plugins" / "comalkit_plugins" / "data"
    pool = load_preferences(data / "sample_pairs.jsonl") + load_preferences(
        data / "sample_pairs_heldout.jsonl"
    )
    pairs = []
    for i in range(n):
        chosen, rejected, j = [], [], i
        while sum(map(len, chosen)) < min_chars or sum(map(len, rejected)) < min_chars:
            chosen.append(pool[j % len(pool)]["chosen"])
            rejected.append(pool[j % len(pool)]["rejected"])
            j += 1
        pairs.append(
            {
                "prompt": pool[i % len(pool)]["prompt"],
                "chosen": " ".join(chosen),
                "rejected": " ".join(rejected),
            }
        )
    return pairs


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def current_rss_gb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


# ---------------------------------------------------------------------------------------------
def run_comalkit(spec: dict[str, Any], pairs: list[dict[str, str]], steps: int, out: str) -> dict[str, Any]:
    from comalkit_plugins.models.smollm2 import SmolLM2
    from comalkit_plugins.solvers.dpo import DPO

    from comalkit.lm.lora import LoraSettings
    from comalkit.training import fit, precompute_logps

    lora = LoraSettings(r=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS)
    policy = SmolLM2(dtype=spec["weights"], lora=lora, max_length=256, max_prompt_length=128).build()
    loaded = current_rss_gb()
    dpo = DPO(beta=BETA)
    start = time.perf_counter()
    records = precompute_logps(policy, pairs, dpo, batch_size=8, precision="bf16-mixed")
    precompute_s = time.perf_counter() - start
    timer = StepTimer()
    cfg = comalkit_trainer("cpu", steps, 4, LR, lean_logps=spec.get("lean_logps", True))
    result = fit(policy, dpo, records, cfg, out, callbacks=[timer.lightning()])
    return {
        "times": timer.times,
        "cpu": timer.cpu,
        "tokens": timer.tokens,
        "loaded_rss_gb": loaded,
        "precompute_s": precompute_s,
        "precompute_pairs": len(pairs),
        "final_loss": result["train"]["loss"],
    }


def run_trl(spec: dict[str, Any], pairs: list[dict[str, str]], steps: int, out: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from comalkit.lm.gguf import bundled_gguf_path, converted_gguf_dir
    from comalkit.lm.tokens import ensure_pad_token

    path = converted_gguf_dir(bundled_gguf_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, spec["weights"]))
    ensure_pad_token(tokenizer, model)
    loaded = current_rss_gb()
    args = dpo_config(
        out,
        batch_size=4,
        max_length=256,
        lr=LR,
        beta=BETA,
        steps=steps,
        cpu=True,
        precompute_ref_log_probs=spec["precompute"],
        precompute_ref_batch_size=8,
    )
    timer = StepTimer()
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(trl_rows(pairs)),
        processing_class=tokenizer,
        peft_config=lora_config(RANK, ALPHA),
        callbacks=[timer.trl()],
    )
    setup_s = time.perf_counter() - start
    trainer.train()
    tokens, final_loss = trl_tokens(trainer)
    return {
        "times": timer.times,
        "cpu": timer.cpu,
        "tokens": tokens,
        "loaded_rss_gb": loaded,
        "setup_s": setup_s,
        "final_loss": final_loss,
    }


def child(name: str, warmup: int, steps: int, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    spec = VARIANTS[name]
    pairs = bench_pairs(4 * (warmup + steps))
    with tempfile.TemporaryDirectory() as out:
        runner = run_comalkit if spec["side"] == "comalkit" else run_trl
        raw = runner(spec, pairs, warmup + steps, out)
    timed, tokens, cpu = raw.pop("times")[warmup:], raw.pop("tokens")[warmup:], raw.pop("cpu")[warmup:]
    step_s = statistics.median(timed)
    result = {
        "variant": name,
        **spec,
        "step_s": step_s,
        "step_times": timed,
        "tokens_per_step": statistics.median(tokens),
        "tokens_per_s": statistics.median(tokens) / step_s,
        "cpu_s": statistics.median(cpu),
        "step_cpu": cpu,
        "peak_rss_gb": peak_rss_gb(),
        **raw,
    }
    if "precompute_s" in raw:  # the one-off reference pass, spread over the steps it serves
        per_step = raw["precompute_s"] / (raw["precompute_pairs"] / 4)
        result["tokens_per_s_incl_ref"] = result["tokens_per_step"] / (step_s + per_step)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per side")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of every variant")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print_result(child(args.child, args.warmup, args.steps, args.threads))
        return

    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        OMP_NUM_THREADS=str(args.threads),
    )
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for repeat in range(args.repeats):
        for name in names:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
                "--threads",
                str(args.threads),
            ]
            start = time.perf_counter()
            result, code, stderr = run_child(cmd, env)
            if result is None:
                sys.exit(f"{name} failed (exit {code}):\n{stderr[-4000:]}")
            results[name].append(result)
            print(
                f"[{repeat + 1}/{args.repeats}] {name}: {results[name][-1]['tokens_per_s']:.0f} tok/s, "
                f"peak {results[name][-1]['peak_rss_gb']:.2f} GB ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    if args.out:  # the raw runs first, so a failing report loses nothing
        Path(args.out).write_text(json.dumps({"runs": results, "loadavg": os.getloadavg()}, indent=2))
    report(results, args)


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "step_s": statistics.median(r["step_s"] for r in runs),
            "tokens_per_step": runs[0]["tokens_per_step"],
            "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        }
        if "tokens_per_s_incl_ref" in runs[0]:
            summary[name]["tokens_per_s_incl_ref"] = statistics.median(
                r["tokens_per_s_incl_ref"] for r in runs
            )
    print(
        f"\nSmolLM2-135M, LoRA r={RANK} q/k/v/o, 4 pairs x 256 tokens, bf16 autocast, {args.threads} threads, "
        f"median of {args.steps} steps x {args.repeats} run(s), load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'variant':<16}{'step s':>8}{'cpu s':>8}{'tok/step':>10}{'tok/s':>8}{'peak GB':>9}")
    for name, s in summary.items():
        cells = f"{s['step_s']:>8.2f}{s['cpu_s']:>8.2f}{s['tokens_per_step']:>10.0f}{s['tokens_per_s']:>8.0f}"
        print(f"{name:<16}{cells}{s['peak_rss_gb']:>9.2f}")
    ours = [n for n in summary if n.startswith("comalkit")]
    theirs = [n for n in summary if n.startswith("trl")]
    for a in ours:
        for b in theirs:
            speed = summary[a]["tokens_per_s"] / summary[b]["tokens_per_s"]
            cpu = summary[b]["cpu_s"] / summary[a]["cpu_s"]
            memory = summary[a]["peak_rss_gb"] / summary[b]["peak_rss_gb"]
            print(f"{a} vs {b}: {speed:.2f}x tokens/s ({cpu:.2f}x per CPU-second), {memory:.2f}x peak memory")
    if args.out:
        Path(args.out).write_text(
            json.dumps({"summary": summary, "runs": results, "loadavg": os.getloadavg()}, indent=2)
        )


if __name__ == "__main__":
    main()
