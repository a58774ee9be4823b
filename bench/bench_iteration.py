"""One full online COMAL iteration on the bundled SmolLM2-135M (CPU), broken down by stage,
and comalkit's sampling against plain ``model.generate`` at the same batch size.

    .venv/bin/python bench/bench_iteration.py [--prompts 8] [--samples 4] [--max-new-tokens 48]

Sampling is timed side by side in one process, alternating the two, on the same prompts,
seed and generation settings; the ratio should be ~1.0 (the framework adds no overhead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def plain_generate(model, tokenizer, prompts, n, args, seed):
    """What a user would write with transformers alone, batched the way comalkit batches.

    comalkit groups rows by prompt length before batching (less padding); the plain side gets
    the same batches in the same order, so both draw the same random numbers for the same rows
    and, if comalkit adds no work of its own, produce identical text (checked by the caller).
    """
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
        for _ in range(n)
    ]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    tokenizer.padding_side = "left"
    out, tokens = [""] * len(texts), 0
    torch.manual_seed(seed)
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for start in range(0, len(order), args.batch_size):
        rows = order[start : start + args.batch_size]
        batch = tokenizer(
            [texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False
        )
        with torch.no_grad():
            gen = model.generate(
                **batch,
                do_sample=True,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=0,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=eot,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = gen[:, batch["input_ids"].shape[1] :]
        tokens += int((new != tokenizer.pad_token_id).sum())
        for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
            out[i] = text
    return out, tokens


def bench_sampling(args) -> dict:
    from comalkit.registry import instantiate
    from comalkit.testing import compose

    policy = instantiate(compose(["model=smollm2"]).model).build()
    prompts = instantiate(compose().data).split(0)[: args.prompts]
    tok = policy.tokenizer
    times: dict[str, list[float]] = {"plain": [], "comalkit": []}
    identical, tokens = True, 0
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        plain, tokens = plain_generate(policy.model, tok, prompts, args.samples, args, seed=rep)
        times["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours = policy.sample(
            prompts,
            args.samples,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            seed=rep,
            batch_size=args.batch_size,
        )
        times["comalkit"].append(time.perf_counter() - t0)
        identical &= [r for rs in ours for r in rs] == plain  # same text: the same work was timed
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "plain_s": med["plain"],
        "comalkit_s": med["comalkit"],
        "generated_tokens": tokens,
        "plain_tokens_per_s": tokens / med["plain"],
        "speed_ratio": med["plain"] / med["comalkit"],
        "identical_text": identical,
    }


def bench_iteration(args) -> dict:
    from comalkit.outputs import read_metrics
    from comalkit.testing import run_job

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        run_job(
            [
                "task.iterations=1",
                f"task.samples_per_prompt={args.samples}",
                f"data.split_size={args.prompts}",
                f"task.max_new_tokens={args.max_new_tokens}",
                f"task.eval_prompts={args.eval_prompts}",
                f"sampler.batch_size={args.batch_size}",
            ],
            out,
        )
        wall = time.perf_counter() - t0
        row = read_metrics(f"{out}/metrics.jsonl")[0]
    stages = {k.removeprefix("time/"): v for k, v in row.items() if k.startswith("time/")}
    return {"wall_s": wall, "stages_s": stages, "pairs": row["pairs"]}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(2)
    result = {"settings": vars(args), "sampling": bench_sampling(args), "iteration": bench_iteration(args)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
