"""``experiment=offline`` end to end through Hydra: on model=tiny (fast) and on the bundled SmolLM2 (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from run_overrides import TRL_METRICS

from comalkit.app import config_error
from comalkit.outputs import read_metrics
from comalkit.registry import ConfigError
from comalkit.testing import compose, run_job

TINY = [
    "experiment=offline",
    "model=tiny",
    "trainer=fast",
    "trainer.lr=1e-2",
    "data.limit=8",
    "data.eval_limit=4",
    "model.max_length=160",
    "model.max_prompt_length=96",
    "model.lora.r=4",
]


@pytest.mark.usefixtures("one_thread")  # the tiny model; the slow test keeps its threads
def test_offline_dpo_on_tiny_writes_metrics_summary_and_checkpoint(tmp_path: Path) -> None:
    summary = run_job(TINY, tmp_path)
    assert summary["steps"] == 3
    assert summary["data"]["train"]["pairs"] == 8 and summary["data"]["eval"]["pairs"] == 4
    assert summary["objective"] == summary["eval_after"]["eval_loss"]
    assert summary["eval_before"]["eval_loss"] == pytest.approx(
        0.6931, abs=1e-3
    )  # policy = reference at the start
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 3
    rows = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [0, 1, 2] and all(r.keys() >= TRL_METRICS for r in train)
    assert [r["step"] for r in evals] == [0, 3] and all(
        {f"eval_{k}" for k in TRL_METRICS} <= r.keys() for r in evals
    )

    # the checkpoint is a plain peft adapter + tokenizer on the tiny base
    from comalkit_plugins.models.tiny import tiny_causal_lm
    from peft import PeftModel
    from transformers import AutoTokenizer

    base, _ = tiny_causal_lm()
    model = PeftModel.from_pretrained(base, tmp_path / "checkpoint")
    assert AutoTokenizer.from_pretrained(tmp_path / "checkpoint").chat_template
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b), "the saved adapter is the trained one"


@pytest.mark.usefixtures("one_thread")  # the tiny model; the slow test keeps its threads
def test_solver_and_data_overrides_win_over_the_experiment(tmp_path: Path) -> None:
    cfg = compose(["experiment=offline", "solver=ipo", f"data.path={tmp_path / 'p.jsonl'}"])
    assert cfg.task._target_.endswith("OfflineTask")
    assert cfg.solver._target_.endswith("IPO")
    assert cfg.data.path == str(tmp_path / "p.jsonl")
    assert cfg.model._target_.endswith("SmolLM2")


@pytest.mark.usefixtures("one_thread")  # the tiny model; the slow test keeps its threads
def test_offline_sppo_trains_from_soft_labels_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "soft.jsonl"
    rows = [
        {"prompt": f"Say {w}.", "chosen": w, "rejected": "no", "chosen_winprob": 0.9, "rejected_winprob": 0.2}
        for w in ("hi", "yes", "ok", "fine", "sure", "good")
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = run_job(
        [*TINY, "solver=sppo", f"data.path={path}", "data.eval_fraction=0.34"], tmp_path / "run"
    )
    assert summary["data"]["train"] == {"pairs": 4, "with_winprobs": 4}
    assert summary["steps"] == 2  # max_steps=3, but one epoch of 4 pairs in batches of 2 ends first


def job_error(overrides: list[str], out_dir: Path) -> ConfigError:
    with pytest.raises(Exception) as info:
        run_job(overrides, out_dir)
    error = config_error(info.value)
    assert error is not None, f"expected a ConfigError behind {info.value!r}"
    return error


@pytest.mark.usefixtures("one_thread")  # the tiny model; the slow test keeps its threads
def test_bad_data_and_game_only_solvers_fail_clearly(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    assert "preference file not found" in str(job_error([*TINY, f"data.path={missing}"], tmp_path / "a"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y", "rejected": "z"}\n{"prompt": "x", "chosen": "y"}\n')
    assert f"{bad}:2: missing key(s) ['rejected']" in str(
        job_error([*TINY, f"data.path={bad}"], tmp_path / "b")
    )
    assert "exact games only" in str(job_error([*TINY, "solver=extragradient"], tmp_path / "c"))


@pytest.mark.slow
def test_offline_dpo_on_smollm2_improves_held_out_loss_and_accuracy(tmp_path: Path) -> None:
    """The issue's acceptance check: DPO on the bundled model learns the sample preferences and generalises.

    LoRA r=16 on q/k/v/o, bf16 autocast, 32 training pairs (8 steps of 4), 16 held-out pairs
    with unseen prompts; about 3 CPU-minutes. Before training the policy is its own reference,
    so held-out rewards are bf16 rounding noise (|margin| < 0.01) and accuracy is near chance or below.
    """
    summary = run_job(
        [
            "experiment=offline",
            "model=smollm2",
            "data.limit=32",
            "data.eval_limit=16",
            "trainer.batch_size=4",
            "trainer.lr=5e-4",
            "trainer.precision=bf16-mixed",
            "trainer.enable_progress_bar=false",
            "model.max_length=128",
            "model.max_prompt_length=96",
        ],
        tmp_path,
    )
    before, after = summary["eval_before"], summary["eval_after"]
    assert summary["steps"] == 8
    assert abs(before["eval_rewards/margins"]) < 0.01
    assert after["eval_loss"] < before["eval_loss"] - 0.03
    assert after["eval_rewards/accuracies"] >= 0.75 > before["eval_rewards/accuracies"]
    assert after["eval_rewards/margins"] > 0.05
    assert (tmp_path / "checkpoint" / "adapter_model.safetensors").is_file()
