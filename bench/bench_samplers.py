"""``sampler=hf`` against ``sampler=vllm`` side by side on the bundled SmolLM2-135M, identical workload.

    /work/venv-vllm/bin/python bench/bench_samplers.py [--prompts 8] [--samples 4] [--time-stage]

Both samplers get the same prompts, n, temperature, top-p, response limit and seed, and sample
from the same LoRA adapter (randomly moved off zero, as after training, so that vLLM runs its
LoRA path); tokens are counted by re-tokenizing the responses with the policy's tokenizer, the
same way for both. The engine start-up is timed on its own. Passes alternate hf and vllm, so
machine load hits both alike. Then one default-size sampling stage of the online loop (one
split of prompts x samples, plus the held-out evaluation prompts x 1) is projected from those
tokens/s (``--time-stage`` times it instead), with and without the start-up, and to the default
run's iterations. Results are printed as JSON; docs/sampling.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def adapter_like_after_training(policy, scale: float = 0.02, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + torch.randn(v.shape, generator=gen) * scale if "lora_B" in k else v
        for k, v in policy.snapshot().items()
    }


def count_tokens(tokenizer, responses: list[list[str]]) -> int:
    texts = [t for rows in responses for t in rows]
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=16, help="sampler=hf: sequences per generate call")
    p.add_argument("--dtype", default="bfloat16", help="sampler=vllm: engine dtype")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--iterations", type=int, default=4, help="the default run's iterations (projection)")
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument(
        "--time-stage", action="store_true", help="time the stage too (else projected from the tokens/s)"
    )
    args = p.parse_args()
    torch.set_num_threads(2)

    from comalkit_plugins.samplers.hf import HFSampler
    from comalkit_plugins.samplers.vllm import VLLMSampler

    from comalkit.registry import instantiate
    from comalkit.testing import compose

    cfg = compose(["model=smollm2"])
    policy = instantiate(cfg.model).build()
    data = instantiate(cfg.data)
    prompts = [p for k in range(8) for p in data.split(k)][: args.prompts]
    adapter = adapter_like_after_training(policy)
    samplers = {"hf": HFSampler(batch_size=args.batch_size), "vllm": VLLMSampler(dtype=args.dtype)}
    settings = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    result: dict = {"settings": vars(args), "load_average_start": load_average()}

    began = time.perf_counter()
    samplers["vllm"].sample(policy, prompts[:1], 1, seed=0, snapshot=adapter, **settings)  # start + adapter
    result["vllm_startup_s"] = samplers["vllm"].startup_s
    result["vllm_first_call_s"] = time.perf_counter() - began

    times: dict[str, list[float]] = {"hf": [], "vllm": []}
    tokens: dict[str, list[int]] = {"hf": [], "vllm": []}
    for rep in range(args.repeats):
        for name in ("hf", "vllm") if rep % 2 == 0 else ("vllm", "hf"):
            t0 = time.perf_counter()
            out = samplers[name].sample(policy, prompts, args.samples, seed=rep, snapshot=adapter, **settings)
            times[name].append(time.perf_counter() - t0)
            tokens[name].append(count_tokens(policy.tokenizer, out))
            print(f"{name} pass {rep}: {tokens[name][-1]} tokens in {times[name][-1]:.1f}s", flush=True)
    rate = {k: sum(tokens[k]) / sum(times[k]) for k in times}
    result["throughput"] = {
        "tokens": tokens,
        "seconds": times,
        "tokens_per_s": rate,
        "vllm_over_hf": rate["vllm"] / rate["hf"],
    }

    # one default-size sampling stage: a split x samples, then the held-out prompts x 1
    split = data.split(0)
    held_out = data.eval_prompts()[: args.eval_prompts]
    responses = len(split) * args.samples + len(held_out)
    per_response = {k: sum(tokens[k]) / (args.repeats * len(prompts) * args.samples) for k in times}
    startup = result["vllm_startup_s"]
    # projected from the measured tokens/s: the stage's responses x the mean response length
    stage = {k: responses * per_response[k] / rate[k] for k in times}
    result["stage"] = {"prompts": len(split), "samples": args.samples, "eval_prompts": len(held_out)}
    if args.time_stage:
        for name in ("vllm", "hf"):
            t0 = time.perf_counter()
            samplers[name].sample(policy, split, args.samples, seed=1, snapshot=adapter, **settings)
            samplers[name].sample(policy, held_out, 1, seed=2, snapshot=adapter, **settings)
            stage[name] = time.perf_counter() - t0
    result["stage"].update(
        measured=args.time_stage,
        hf_s=stage["hf"],
        vllm_s=stage["vllm"],
        vllm_with_startup_s=stage["vllm"] + startup,
        # the default run samples `iterations` such stages; the engine starts once
        run_hf_s=args.iterations * stage["hf"],
        run_vllm_s=startup + args.iterations * stage["vllm"],
    )
    result["load_average_end"] = load_average()
    samplers["vllm"].close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
