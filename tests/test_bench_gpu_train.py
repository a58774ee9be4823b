"""The GPU training benchmark runs end to end on the CPU with a toy shape, so it is ready as one command."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu_train.py"


def test_both_sides_train_the_same_tokens(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(BENCH),
        "--rows",
        "tiny-lora",
        "--device",
        "cpu",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]
    cmd += ["--seq-len", "128", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    results = {r["side"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"comalkit", "trl"}
    assert all("error" not in r for r in results.values()), results
    ours, theirs = results["comalkit"], results["trl"]
    # the identical workload: every sequence filled to --seq-len on both sides
    assert abs(ours["tokens_per_step"] - theirs["tokens_per_step"]) <= 0.05 * theirs["tokens_per_step"]
    assert ours["tokens_per_step"] >= 0.9 * 2 * 4 * 128
    assert ours["flops_per_token"] == theirs["flops_per_token"] > 0
