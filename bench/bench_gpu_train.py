"""GPU training step: comalkit's Lightning DPO step vs TRL's DPOTrainer, side by side, at real shapes.

Each row trains a randomly initialised model of a real architecture's shape (weights are noise;
speed and memory depend only on the shape) on DPO pairs whose every sequence fills
``--seq-len`` tokens (1024 by default), bf16 weights and bf16 autocast on both sides, AdamW,
constant LR, gradient clipping at 1.0. Rows (``--rows``):

==============  ======================================  =====  ===================
row             shape                                   batch  trained
==============  ======================================  =====  ===================
135m-full       SmolLM2-135M (Llama, 30 x 576)          16     every weight
135m-lora       SmolLM2-135M                            16     LoRA r=16 q/k/v/o
1.5b-full       Qwen2.5-1.5B (Qwen2, 28 x 1536)         8      every weight
1.5b-lora       Qwen2.5-1.5B                            8      LoRA r=16 q/k/v/o
8b-lora         Llama-3-8B (Llama, 32 x 4096)           4      LoRA r=16 q/k/v/o
tiny-full/lora  a 2-layer toy, for a CPU smoke run      4
==============  ======================================  =====  ===================

"batch" is preference pairs per optimizer step (2x sequences). Each (row, side) runs in its own
process so peak memory is its own. The text is random words through a byte-level tokenizer
(:func:`comalkit_plugins.models.tiny.tiny_tokenizer`), so nothing is downloaded and every row sees the same
token count.

What is compared: tokens/s (non-padding tokens of chosen and rejected per step over the median
step time), peak memory (``torch.cuda.max_memory_allocated``) and MFU. MFU counts the model
FLOPs of the training step only: ``6·N + 12·L·d·T`` per token for a full fine-tune and
``4·N + 8·L·d·T`` with LoRA (no weight gradients for the frozen base), with N the parameters
that do matmuls (the input embedding excluded), L layers, d width and T the sequence length;
it is divided by the bf16 matmul peak measured at the start of the run (``--peak`` skips that).
TRL's reference forward, which it runs inside every step, is work TRL does on top: comalkit
precomputes the reference log-probs once per iteration (reported separately as
``precompute_s`` and amortised in ``tok/s incl. ref``).

One command on a GPU machine (results in docs/training.md once measured)::

    python bench/bench_gpu_train.py --out gpu_bench.json

and a quick CPU smoke check of the same code paths::

    python bench/bench_gpu_train.py --rows tiny-lora,tiny-full --device cpu --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
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

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "arch": "llama",
        "hidden": 64,
        "inter": 128,
        "layers": 2,
        "heads": 4,
        "kv": 2,
        "vocab": 512,
        "tie": True,
    },
    "135m": {
        "arch": "llama",
        "hidden": 576,
        "inter": 1536,
        "layers": 30,
        "heads": 9,
        "kv": 3,
        "vocab": 49152,
        "tie": True,
    },
    "1.5b": {
        "arch": "qwen2",
        "hidden": 1536,
        "inter": 8960,
        "layers": 28,
        "heads": 12,
        "kv": 2,
        "vocab": 151936,
        "tie": True,
    },
    "8b": {
        "arch": "llama",
        "hidden": 4096,
        "inter": 14336,
        "layers": 32,
        "heads": 32,
        "kv": 8,
        "vocab": 128256,
        "tie": False,
    },
}
ROWS: dict[str, dict[str, Any]] = {
    "135m-full": {"shape": "135m", "lora": False, "batch": 16},
    "135m-lora": {"shape": "135m", "lora": True, "batch": 16},
    "1.5b-full": {"shape": "1.5b", "lora": False, "batch": 8},
    "1.5b-lora": {"shape": "1.5b", "lora": True, "batch": 8},
    "8b-lora": {"shape": "8b", "lora": True, "batch": 4},
    "tiny-full": {"shape": "tiny", "lora": False, "batch": 4},
    "tiny-lora": {"shape": "tiny", "lora": True, "batch": 4},
}
GPU_ROWS = ["135m-full", "135m-lora", "1.5b-full", "1.5b-lora", "8b-lora"]
BETA, LR, RANK, ALPHA = 0.1, 1e-5, 16, 32


def random_model(shape: dict[str, Any], seq_len: int, tokenizer: Any, device: str) -> Any:
    """A randomly initialised causal LM of ``shape``, made directly on ``device`` in bf16."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[shape["arch"]]
    config = config_cls(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=max(seq_len, 2048),
        tie_word_embeddings=shape["tie"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def bench_pairs(n: int, seq_len: int) -> list[dict[str, str]]:
    """``n`` pairs of random words; a byte-level tokenizer makes one token per character."""
    rng = random.Random(0)
    words = ["alpha", "policy", "nash", "game", "prompt", "judge", "reference", "round", "token", "gradient"]

    def text(chars: int) -> str:
        out = []
        while sum(len(w) + 1 for w in out) < chars:
            out.append(rng.choice(words))
        return " ".join(out)[:chars]

    response = seq_len  # longer than fits: every sequence is cut to seq_len
    return [
        {"prompt": text(seq_len // 8), "chosen": text(response), "rejected": text(response)} for _ in range(n)
    ]


def matmul_peak_tflops(device: str) -> float:
    """The best bf16 matmul throughput of a few large square products (TFLOP/s)."""
    import torch

    best = 0.0
    for n in (4096, 8192):
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        reps = 20
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start) / 1e12)
    return best


def flops_per_token(model: Any, shape: dict[str, Any], lora: bool, seq_len: int) -> float:
    """Training FLOPs per token (see the module docstring): matmul parameters plus attention."""
    embedding = model.get_input_embeddings().weight.numel()
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - embedding
    if shape["tie"]:
        matmul_params += embedding  # the tied LM head is a matmul too
    attention = shape["layers"] * shape["hidden"] * seq_len
    return (4 * matmul_params + 8 * attention) if lora else (6 * matmul_params + 12 * attention)


def run_comalkit(
    row: dict[str, Any], pairs: list[dict[str, str]], args: argparse.Namespace, out: str
) -> dict[str, Any]:
    from comalkit_plugins.models.tiny import tiny_tokenizer
    from comalkit_plugins.solvers.dpo import DPO

    from comalkit.lm.lora import LoraSettings
    from comalkit.lm.policy import LMPolicy
    from comalkit.training import fit, precompute_logps

    shape = SHAPES[row["shape"]]
    tokenizer = tiny_tokenizer()
    model = random_model(shape, args.seq_len, tokenizer, args.device)
    lora = LoraSettings(enabled=row["lora"], r=RANK, alpha=ALPHA, dropout=0.0, target_modules=TARGETS)
    policy = LMPolicy(
        model,
        tokenizer,
        lora=lora,
        max_length=args.seq_len,
        max_prompt_length=args.seq_len // 4,
        device=args.device,
    )
    dpo = DPO(beta=BETA)
    timer = StepTimer(args.device)
    start = time.perf_counter()
    records = precompute_logps(policy, pairs, dpo, batch_size=2 * row["batch"], precision="bf16-mixed")
    timer.sync()
    precompute_s = time.perf_counter() - start
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    cfg = comalkit_trainer(accelerator, args.warmup + args.steps, row["batch"], LR)
    fit(policy, dpo, records, cfg, out, callbacks=[timer.lightning()])
    return {
        "times": timer.times,
        "tokens": timer.tokens,
        "precompute_s": precompute_s,
        "flops_per_token": flops_per_token(policy.model, shape, row["lora"], args.seq_len),
    }


def run_trl(
    row: dict[str, Any], pairs: list[dict[str, str]], args: argparse.Namespace, out: str
) -> dict[str, Any]:
    from comalkit_plugins.models.tiny import tiny_tokenizer
    from datasets import Dataset
    from trl import DPOTrainer

    shape = SHAPES[row["shape"]]
    tokenizer = tiny_tokenizer()
    model = random_model(shape, args.seq_len, tokenizer, args.device)
    timer = StepTimer(args.device)
    config = dpo_config(
        out,
        batch_size=row["batch"],
        max_length=args.seq_len,
        lr=LR,
        beta=BETA,
        steps=args.warmup + args.steps,
        cpu=not args.device.startswith("cuda"),
    )
    peft_config, ref_model = None, None
    if not row["lora"]:  # TRL keeps a frozen copy as the reference of a full fine-tune
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    else:
        peft_config = lora_config(RANK, ALPHA)
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=Dataset.from_list(trl_rows(pairs)),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer.trl()],
    )
    trainer.train()
    tokens, _ = trl_tokens(trainer)
    return {
        "times": timer.times,
        "tokens": tokens,
        "flops_per_token": flops_per_token(trainer.model, shape, row["lora"], args.seq_len),
    }


def child(name: str, side: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    row = ROWS[name]
    pairs = bench_pairs(row["batch"] * (args.warmup + args.steps), args.seq_len)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        raw = (run_comalkit if side == "comalkit" else run_trl)(row, pairs, args, out)
    times, tokens = raw.pop("times")[args.warmup :], raw.pop("tokens")[args.warmup :]
    step_s = statistics.median(times)
    result = {
        "row": name,
        "side": side,
        "step_s": step_s,
        "tokens_per_step": statistics.median(tokens),
        "tokens_per_s": statistics.median(tokens) / step_s,
        **raw,
    }
    if args.device.startswith("cuda"):
        result["peak_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    if "precompute_s" in raw:
        steps_served = len(pairs) / row["batch"]
        result["tokens_per_s_incl_ref"] = result["tokens_per_step"] / (
            step_s + raw["precompute_s"] / steps_served
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(GPU_ROWS), help=f"comma-separated, from {list(ROWS)}")
    parser.add_argument("--sides", default="comalkit,trl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak", type=float, help="bf16 matmul peak in TFLOP/s (default: measure it)")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print_result(child(args.child, args.side, args))
        return
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    peak = args.peak
    if peak is None and args.device.startswith("cuda"):
        peak = matmul_peak_tflops(args.device)
        print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    results: list[dict[str, Any]] = []
    for name in names:
        for side in args.sides.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--side",
                side,
                "--device",
                args.device,
                "--seq-len",
                str(args.seq_len),
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
            ]
            result, code, stderr = run_child(cmd, env)
            if result is None:
                print(f"{name}/{side} failed (exit {code}):\n{stderr[-3000:]}", flush=True)
                results.append({"row": name, "side": side, "error": stderr[-3000:]})
            else:
                if peak:
                    result["mfu"] = result["flops_per_token"] * result["tokens_per_s"] / (peak * 1e12)
                results.append(result)
                print(
                    f"{name}/{side}: {result['tokens_per_s']:.0f} tok/s, peak {result.get('peak_gb', 0):.1f} GB, "
                    f"MFU {result.get('mfu', 0):.1%}",
                    flush=True,
                )
            if args.out:  # raw results first, so a later failure loses nothing
                Path(args.out).write_text(json.dumps({"peak_tflops": peak, "results": results}, indent=2))
    report(results)


def report(results: list[dict[str, Any]]) -> None:
    print(f"\n{'row':<12}{'side':<10}{'tok/step':>10}{'tok/s':>10}{'incl ref':>10}{'peak GB':>9}{'MFU':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['row']:<12}{r['side']:<10}{'failed':>10}")
            continue
        incl = f"{r['tokens_per_s_incl_ref']:.0f}" if "tokens_per_s_incl_ref" in r else "-"
        print(
            f"{r['row']:<12}{r['side']:<10}{r['tokens_per_step']:>10.0f}{r['tokens_per_s']:>10.0f}{incl:>10}{r.get('peak_gb', 0):>9.1f}"
            f"{r.get('mfu', 0):>7.1%}"
        )
    by_row: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        if "error" not in r:
            by_row.setdefault(r["row"], {})[r["side"]] = r
    for name, sides in by_row.items():
        if {"comalkit", "trl"} <= sides.keys():
            ours, theirs = sides["comalkit"], sides["trl"]
            memory = ours.get("peak_gb", 0) / theirs["peak_gb"] if theirs.get("peak_gb") else float("nan")
            print(
                f"{name}: comalkit {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x TRL tokens/s, "
                f"{memory:.2f}x its peak memory"
            )


if __name__ == "__main__":
    main()
