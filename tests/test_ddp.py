"""Training on several processes (docs/scaling.md): 2 DDP ranks (gloo, CPU) train like 1 process.

Both layouts see the same global batches (``trainer.batch_size`` is global; the ranks take slices
of the batches one process would draw, with shuffling on), so the only differences are float
rounding in the gradient all-reduce. The equality tests use SGD: Adam divides each coordinate by
its own gradient scale, so on coordinates whose gradient is rounding noise it turns a 1e-9
difference into one of order lr. Tolerance: 1e-5 absolute on weights and losses, and 1e-6 relative
on summed log-probs (a float32 ulp at 200 is 1.5e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from run_overrides import ONE_SMALL_ITERATION
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from comalkit.distributed import GlobalBatchSampler, ScaledRecords, decoder_layer_classes, shard
from comalkit.outputs import read_metrics
from comalkit.registry import ConfigError
from comalkit.testing import compose, run_job
from comalkit.training import trainer_config

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5
SGD = ["trainer.optimizer._target_=torch.optim.SGD", "trainer.lr=0.5"]
TINY_MODEL = ["model=tiny", "model.max_length=160", "model.max_prompt_length=96", "model.lora.r=4"]
# 7 pairs in global batches of 2: the last batch of each epoch leaves rank 1 without a pair
OFFLINE = [
    "experiment=offline",
    *TINY_MODEL,
    "trainer=fast",
    *SGD,
    "trainer.max_steps=-1",
    "trainer.max_epochs=2",
    "data.limit=7",
    "data.eval_limit=4",
]
ONLINE = [
    *TINY_MODEL,
    "oracle=rule",
    "trainer=fast",
    *SGD,
    *ONE_SMALL_ITERATION,
]
DDP2 = ["trainer.strategy=ddp", "trainer.devices=2"]  # on top of trainer=fast: only the layout changes


#: one torch thread here and so in each rank (a rank takes the main process's threads / ranks)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def trained_lora(adapter: dict[str, torch.Tensor]) -> bool:
    """LoRA starts with B = 0: a nonzero B means the adapter was trained."""
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    return bool(lora_b) and any(float(v.abs().max()) > 1e-4 for v in lora_b)


# ---------------------------------------------------------------------------------------------
# The batch layout, without processes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_slice_the_global_batches_one_process_draws(world: int) -> None:
    """Over 3 shuffled epochs, the ranks' slices put together are the single DataLoader's batches,
    and each global batch's loss scales sum to W (so the DDP mean is the batch mean)."""
    n, size = 7, 3
    generator = torch.Generator().manual_seed(5)
    single = DataLoader(list(range(n)), batch_size=size, shuffle=True, generator=generator, collate_fn=list)
    expected = [batch for _ in range(3) for batch in single]
    per_rank = []
    for rank in range(world):
        g = torch.Generator().manual_seed(5)
        sampler = GlobalBatchSampler(n, size, rank, world, shuffle=True, generator=g)
        loader = DataLoader(
            ScaledRecords(list(range(n))), batch_sampler=sampler, generator=g, collate_fn=list
        )
        assert len(loader) == len(single)
        per_rank.append([batch for _ in range(3) for batch in loader])
    for step, batch in enumerate(expected):
        slices = [per_rank[r][step] for r in range(world)]
        assert [i for s in slices for i, scale in s if scale > 0] == batch
        assert sum(scale for s in slices for _, scale in s) == pytest.approx(world)


def test_a_rank_without_a_pair_gets_one_that_weighs_nothing() -> None:
    assert shard([4], 0, 2) == [(4, 2.0)]
    assert shard([4], 1, 2) == [(4, 0.0)]
    assert shard([1, 2, 3], 0, 2) == [(1, 2 / 3), (2, 2 / 3)] and shard([1, 2, 3], 1, 2) == [(3, 2 / 3)]


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "strategy"), [("ddp", "ddp"), ("fsdp", "fsdp"), ("deepspeed", "deepspeed_stage_2")]
)
def test_layout_configs_compose(name: str, strategy: str) -> None:
    cfg = compose(["experiment=offline", f"trainer={name}"])
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes) == (strategy, 2, 1)
    assert (
        cfg.trainer.batch_size == compose(["experiment=offline"]).trainer.batch_size
    )  # the same global batch


def test_layout_errors_name_the_key_and_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"trainer.batch_size=3 .* divide evenly over .* = 2 processes"):
        trainer_config({"devices": 2, "strategy": "ddp", "batch_size": 3})
    with pytest.raises(ConfigError, match=r"trainer.eval_batch_size=3 .* 2 processes"):
        trainer_config({"devices": 2, "batch_size": 4, "eval_batch_size": 3})
    with pytest.raises(ConfigError, match=r"trainer.num_nodes=2: .* torchrun or SLURM"):
        trainer_config({"num_nodes": 2})
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"trainer.strategy=fsdp needs CUDA .* trainer=ddp"):
            trainer_config({"strategy": "fsdp", "accelerator": "cpu", "devices": 2})
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        for stage in ("deepspeed_stage_2", "deepspeed_stage_3"):
            with pytest.raises(ConfigError, match=f"trainer.strategy={stage} needs the deepspeed package"):
                trainer_config({"strategy": stage, "devices": 2})
    else:  # pragma: no cover - deepspeed machines
        trainer_config({"strategy": "deepspeed_stage_3", "devices": 2})


def test_fsdp_wraps_the_decoder_layers_of_any_architecture() -> None:
    from comalkit_plugins.models.tiny import tiny_causal_lm
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    llama, _ = tiny_causal_lm()
    assert {c.__name__ for c in decoder_layer_classes(llama)} == {"LlamaDecoderLayer"}
    qwen = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    assert decoder_layer_classes(qwen) == {Qwen2DecoderLayer}


# ---------------------------------------------------------------------------------------------
# 2 processes = 1 process
# ---------------------------------------------------------------------------------------------
def test_offline_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """experiment=offline through the app, 2 epochs of shuffled, ragged global batches."""
    one = run_job(OFFLINE, tmp_path / "one")
    two = run_job([*OFFLINE, *DDP2], tmp_path / "two")
    assert one["steps"] == two["steps"] == 8  # 4 global batches per epoch on both layouts
    weights = [load_file(tmp_path / d / "checkpoint" / "adapter_model.safetensors") for d in ("one", "two")]
    assert max_difference(*weights) < TOL
    assert trained_lora(weights[1]), "training on 2 ranks moved the adapter"
    for key, value in one["eval_after"].items():
        assert two["eval_after"][key] == pytest.approx(value, rel=1e-6, abs=TOL), key
    assert two["train"]["loss"] == pytest.approx(one["train"]["loss"], abs=TOL)
    rows = [read_metrics(tmp_path / d / "metrics.jsonl") for d in ("one", "two")]
    # rank 0's rows reach metrics.jsonl once each, through the main process
    assert [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]]
    assert [r["step"] for r in rows[1] if "loss" in r] == list(range(8))
    for a, b in zip(rows[0], rows[1], strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() & {"loss", "rewards/margins", "num_tokens", "eval_loss", "grad_norm"}:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=TOL), key


def test_online_iteration_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """One online iteration: sampling, judging and log-probs once in the main process, training on 2
    spawned ranks (the start method CUDA ranks use; the other tests fork, the CPU default)."""
    run_job(ONLINE, tmp_path / "one")
    summary = run_job([*ONLINE, *DDP2, "trainer.start_method=spawn"], tmp_path / "two")  # as on GPUs
    assert summary["iterations"] == 1
    one, two = (tmp_path / d / "iterations" / "000" for d in ("one", "two"))
    assert json.loads((one / "sample" / "samples.json").read_text()) == json.loads(
        (two / "sample" / "samples.json").read_text()
    )
    trained = [load_file(d / "train" / "policy.safetensors") for d in (one, two)]
    assert max_difference(*trained) < TOL
    assert trained_lora(trained[1]), "training on 2 ranks moved the adapter"
    rows = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0]
    assert rows[0]["loss"] == pytest.approx(
        read_metrics(tmp_path / "one" / "metrics.jsonl")[0]["loss"], abs=TOL
    )


def test_multirun_with_ddp_runs_each_job_once(tmp_path: Path) -> None:
    """Lightning-AI/pytorch-lightning#11300: under Lightning's own ``ddp`` launcher the ranks re-run
    ``sys.argv`` and re-enter the sweep. comalkit's ranks run only the fit: two jobs, two summaries."""
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    fast = [
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.batch_size=2",
        "trainer.max_epochs=1",
        "trainer.eval_batch_size=4",
        "trainer.enable_progress_bar=false",
        "trainer.optimizer._target_=torch.optim.SGD",
    ]
    offline = ["experiment=offline", *TINY_MODEL, "data.limit=7", "data.eval_limit=4"]
    cmd = [
        sys.executable,
        "-m",
        "comalkit",
        "-m",
        *offline,
        "trainer=ddp",
        "trainer.devices=2",
        *fast,
        "trainer.lr=0.5,0.25",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("comalkit: results in") == 2
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"]
    summaries = [json.loads((tmp_path / j / "summary.json").read_text()) for j in jobs]
    assert [s["steps"] for s in summaries] == [4, 4]
    assert summaries[0]["eval_after"]["eval_loss"] != summaries[1]["eval_after"]["eval_loss"]  # two lrs ran
    for job in jobs:
        assert [r["step"] for r in read_metrics(tmp_path / job / "metrics.jsonl") if "loss" in r] == [
            0,
            1,
            2,
            3,
        ]


def test_a_resumed_two_rank_run_ends_like_one_process(tmp_path: Path) -> None:
    """Killed (SIGKILL) after iteration 2's ranks finished but before its train stage committed, the
    rerun trains iteration 2 again on fresh ranks and ends where one process ends."""
    overrides = [*ONLINE, "task.iterations=2", *DDP2]
    cmd = [sys.executable, "-m", "comalkit", *overrides, f"hydra.run.dir={tmp_path / 'two'}"]
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    killed = subprocess.run(
        cmd, env={**env, "COMALKIT_FAULT": "train:before-commit@1"}, capture_output=True, text=True, cwd=REPO
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "two" / "iterations" / "001" / "train").exists()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_job([*ONLINE, "task.iterations=2"], tmp_path / "one")
    trained = [
        load_file(tmp_path / d / "iterations" / "001" / "train" / "policy.safetensors")
        for d in ("one", "two")
    ]
    assert max_difference(*trained) < TOL
    assert [r["iteration"] for r in read_metrics(tmp_path / "two" / "metrics.jsonl")] == [0, 1]


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """Pair 1 (rank 1's half of the first global batch) has an infinite loss: the ranks share it
    through the metric all-reduce, so both stop at step 0 and the main process raises the rank's
    NonFiniteError. Skipping a batch is refused up front: Lightning cannot skip a distributed step."""
    from comalkit_plugins.data.preferences import SAMPLE_TRAIN
    from tiny import TRAINING_SIZES, tiny_policy

    from comalkit.preference_data import load_preferences
    from comalkit.registry import registry
    from comalkit.training import NonFiniteError, fit, precompute_logps

    registry.load_entry_points()
    dpo = registry.get("solver", "dpo")()
    policy = tiny_policy(**TRAINING_SIZES)
    records = precompute_logps(policy, load_preferences(SAMPLE_TRAIN)[:4], dpo)
    records[1]["ref_chosen"] = float("inf")  # DPO loss of pair 1: -log sigmoid(-inf) = inf
    cfg = {
        "accelerator": "cpu",
        "precision": "32-true",
        "max_epochs": 1,
        "lr": 5e-5,
        "scheduler": {"warmup_ratio": 0.0},
        "batch_size": 2,
        "shuffle": False,
        "devices": 2,
        "strategy": "ddp",
        "enable_progress_bar": False,
    }
    with pytest.raises(NonFiniteError, match="training stopped at epoch 0, step 0: the loss is nan"):
        fit(policy, dpo, records, cfg, tmp_path)
    with pytest.raises(ConfigError, match="trainer.on_nonfinite=skip: Lightning cannot skip"):
        fit(policy, dpo, records, dict(cfg, on_nonfinite="skip"), tmp_path)


TORCHRUN_SCRIPT = """
import os, sys
import torch
from safetensors.torch import save_file
from comalkit_plugins.data.preferences import SAMPLE_TRAIN
from comalkit_plugins.models.tiny import TinyModel
from comalkit.lm.lora import LoraSettings
from comalkit.preference_data import load_preferences
from comalkit.registry import registry
from comalkit.training import fit, precompute_logps

torch.set_num_threads(1)
registry.load_entry_points()
out, devices = sys.argv[1], int(sys.argv[2])
dpo = registry.get("solver", "dpo")()
policy = TinyModel(max_length=160, max_prompt_length=96, lora=LoraSettings(enabled=True, r=4)).build()
records = precompute_logps(policy, load_preferences(SAMPLE_TRAIN)[:7], dpo)
cfg = {"accelerator": "cpu", "precision": "32-true", "batch_size": 2, "max_epochs": 2, "lr": 0.5,
       "devices": devices, "strategy": "ddp", "enable_progress_bar": False, "scheduler": {"warmup_ratio": 0.0},
       "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True}}
fit(policy, dpo, records, cfg, out)
if int(os.environ.get("RANK", "0")) == 0:
    save_file(policy.snapshot(), os.path.join(out, "adapter.safetensors"))
"""


def test_under_torchrun_each_process_trains_as_one_rank(tmp_path: Path) -> None:
    """The several-node path: torchrun starts the ranks, fit sees the launcher and trains in place
    (same global batches, linear schedule, shuffling on); the result equals one process."""
    script = tmp_path / "train.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    from comalkit.distributed import _free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-port", str(_free_port())]
    for cmd, out in (([sys.executable], tmp_path / "one"), (torchrun, tmp_path / "two")):
        out.mkdir()
        devices = "1" if out.name == "one" else "2"
        args = [*cmd, str(script), str(out), devices]
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    adapters = [load_file(tmp_path / d / "adapter.safetensors") for d in ("one", "two")]
    assert max_difference(*adapters) < TOL and trained_lora(adapters[1])


# ---------------------------------------------------------------------------------------------
# The whole job under torchrun: every process runs `python -m comalkit`, rank 0 alone writes
# ---------------------------------------------------------------------------------------------
#: runs `python -m comalkit ARGS` after installing an audit hook (PEP 578) that records every
#: file this process opens for writing, creates, renames, removes or connects to (sqlite) under
#: ROOT, into WRITES.<RANK>; Python-level calls only, which is every write comalkit and Hydra make
AUDITED_COMALKIT = """
import os, runpy, sys
root, record = os.path.realpath(sys.argv[1]), sys.argv[2]
log = open(f"{record}.{os.environ.get('RANK', '0')}", "w")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.truncate", "os.chmod",
          "os.symlink", "os.link", "shutil.rmtree", "shutil.move", "sqlite3.connect", "tempfile.mkstemp",
          "tempfile.mkdtemp"}

def hook(event, args):
    if event == "open":
        path, mode, flags = (list(args) + [None, None])[:3]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS)
        if not writes:
            return
    elif event not in EVENTS:
        return
    for path in args[:2]:
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.fsdecode(path)
            if os.path.realpath(path).startswith(root):
                log.write(f"{event} {path}\\n")
                log.flush()

sys.addaudithook(hook)
sys.argv = ["comalkit", *sys.argv[3:]]
runpy.run_module("comalkit", run_name="__main__", alter_sys=True)
"""


def torchrun_comalkit(tmp_path: Path, overrides: list[str], run_dir: Path, record: str) -> Any:
    """``torchrun --nproc-per-node 2 python -m comalkit OVERRIDES`` with each rank's writes recorded."""
    from comalkit.distributed import _free_port

    script = tmp_path / "audited_comalkit.py"
    script.write_text(AUDITED_COMALKIT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(_free_port()), str(script), str(run_dir), str(tmp_path / record)]
    cmd += [*overrides, f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)


def audited_writes(tmp_path: Path, record: str, rank: int) -> list[str]:
    return (tmp_path / f"{record}.{rank}").read_text().splitlines()


@pytest.mark.slow
def test_the_whole_job_under_torchrun_ends_like_one_process_and_only_rank_0_writes(tmp_path: Path) -> None:
    """Two online iterations with every process running the CLI: rank 0 samples, judges, evaluates
    and writes; rank 1 trains in each fit and writes nothing (no lock, no .hydra/, no stage). A
    rerun after the completed run resumes it on both ranks: nothing is trained again, rank 1
    writes nothing, and both end with exit code 0. Weights within 1e-5 absolute; logged metrics
    within 1e-5 relative (iteration 2 starts from weights that already differ by rounding)."""
    overrides = [*ONLINE, "task.iterations=2"]
    one = run_job(overrides, tmp_path / "one")
    two_dir = tmp_path / "two"
    proc = torchrun_comalkit(tmp_path, [*overrides, *DDP2], two_dir, "first")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("comalkit: results in") == 1  # rank 0 alone reports the results
    assert audited_writes(tmp_path, "first", 1) == []
    rank0 = audited_writes(tmp_path, "first", 0)
    assert any("summary.json" in line for line in rank0) and any(".hydra" in line for line in rank0)
    for k in ("000", "001"):
        trained = [
            load_file(d / "iterations" / k / "train" / "policy.safetensors")
            for d in (tmp_path / "one", two_dir)
        ]
        assert max_difference(*trained) < TOL, k
    assert trained_lora(trained[1])
    two = json.loads((two_dir / "summary.json").read_text())
    assert two["iterations"] == one["iterations"] == 2
    rows = [read_metrics(d / "metrics.jsonl") for d in (tmp_path / "one", two_dir)]
    assert [r["iteration"] for r in rows[1]] == [0, 1]
    for a, b in zip(rows[0], rows[1], strict=True):
        for key in a.keys() & {"loss", "rewards/margins", "win_rate/previous", "kl_to_reference"}:
            # iteration 2's loss (about 20) trains from weights that differ by rounding: 2e-6 relative
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=TOL), key

    state = (two_dir / "state.json").read_text()
    resumed = torchrun_comalkit(tmp_path, [*overrides, *DDP2], two_dir, "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert audited_writes(tmp_path, "resumed", 1) == []
    assert (two_dir / "state.json").read_text() == state
    assert not any("/iterations/" in line for line in audited_writes(tmp_path, "resumed", 0))
    assert json.loads((two_dir / "summary.json").read_text())["iterations"] == 2


def test_under_torchrun_a_config_error_is_one_line_from_rank_0_with_code_2(tmp_path: Path) -> None:
    """torchrun starts 2 processes for a 1-device config: rank 0 prints the one-line error and
    exits 2, rank 1 prints nothing and writes nothing, and no run directory is made."""
    run_dir = tmp_path / "run"
    proc = torchrun_comalkit(tmp_path, ["model=tiny", "oracle=rule", "trainer=fast"], run_dir, "bad")
    assert proc.returncode != 0
    assert proc.stderr.count("comalkit: config error: trainer.devices x trainer.num_nodes = 1 processes") == 1
    # torchrun stops the other ranks as soon as one fails, so rank 1 ends with rank 0's code 2 or,
    # if torchrun is faster, by its SIGTERM; the first failure torchrun names has code 2
    assert "exitcode  : 2" in proc.stderr.split("Root Cause", 1)[1], proc.stderr[-3000:]
    codes = [part.split()[0] for part in proc.stderr.split("exitcode  :")[1:]]
    assert codes and set(codes) <= {"2", "-15"}, codes
    assert not run_dir.exists()
    assert audited_writes(tmp_path, "bad", 1) == []
