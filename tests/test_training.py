"""The shared Lightning module and fit(): every language-model solver trains on model=tiny."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from comalkit_plugins.data.preferences import SAMPLE_HELDOUT, SAMPLE_TRAIN
from run_overrides import TRL_METRICS
from tiny import TRAINING_SIZES, tiny_policy

from comalkit.interfaces import WIN_PROBS, GameOnlySolver
from comalkit.lm.policy import LMPolicy
from comalkit.outputs import Run, read_metrics
from comalkit.preference_data import load_preferences
from comalkit.registry import ConfigError, registry
from comalkit.training import (
    PreferenceModule,
    SchedulerConfig,
    fit,
    lr_lambda,
    precompute_logps,
    required_keys,
    trainer_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

registry.load_entry_points()
LM_SOLVERS = [
    n for n in registry.names("solver") if not issubclass(registry.get("solver", n), GameOnlySolver)
]
GAME_SOLVERS = [n for n in registry.names("solver") if issubclass(registry.get("solver", n), GameOnlySolver)]
FAST = {
    "accelerator": "cpu",
    "precision": "32-true",
    "max_epochs": 1,
    "max_steps": 3,
    "batch_size": 2,
    "eval_batch_size": 4,
    "lr": 1e-2,
    "enable_progress_bar": False,
    "scheduler": {"name": "constant", "warmup_ratio": 0.0},
}


def solver(name: str, **kwargs: Any) -> Any:
    return registry.get("solver", name)(**kwargs)


def pairs(n: int = 6, path: Path = SAMPLE_TRAIN, winprobs: bool = False) -> list[dict[str, Any]]:
    records = load_preferences(path)[:n]
    if winprobs:  # soft labels as an all-pairs oracle would give them
        records = [dict(r, chosen_winprob=0.8, rejected_winprob=0.3) for r in records]
    return records


def perturb(policy: LMPolicy, seed: int = 1, scale: float = 0.05) -> None:
    """Move the trainable weights off the initial ones, so the policy differs from its reference."""
    gen = torch.Generator().manual_seed(seed)
    policy.load_snapshot(
        {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in policy.snapshot().items()}
    )


@pytest.mark.parametrize("name", LM_SOLVERS)
def test_every_language_model_solver_trains_on_tiny(name: str, tmp_path: Path) -> None:
    policy, loss = tiny_policy(**TRAINING_SIZES), solver(name)
    before = policy.snapshot()
    records = precompute_logps(policy, pairs(winprobs=WIN_PROBS in loss.inputs), loss)
    run = Run(tmp_path)
    result = fit(policy, loss, records, FAST, tmp_path, run=run)
    assert result["steps"] == 3
    assert all(math.isfinite(result["train"][k]) for k in TRL_METRICS)
    after = policy.snapshot()
    assert any(not torch.equal(before[k], after[k]) for k in before), "no trainable parameter moved"
    rows = [r for r in read_metrics(run.metrics_path) if "loss" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(set(TRL_METRICS) <= r.keys() for r in rows)


def test_training_step_matches_the_loss_by_hand() -> None:
    """One concatenated chosen+rejected forward gives the same DPO loss as separate per-pair log-probs."""
    policy, dpo = tiny_policy(**TRAINING_SIZES), solver("dpo", beta=0.5)
    records = precompute_logps(policy, pairs(4), dpo)  # the reference = the initial weights
    perturb(policy)
    module = PreferenceModule(policy, dpo, FAST)
    loss, metrics = module.loss_and_metrics(module.collate(records))
    prompts = [r["prompt"] for r in records]
    chosen = policy.logps(prompts, [r["chosen"] for r in records])
    rejected = policy.logps(prompts, [r["rejected"] for r in records])
    ref_c = torch.tensor([r["ref_chosen"] for r in records])
    ref_r = torch.tensor([r["ref_rejected"] for r in records])
    expected = -F.logsigmoid(0.5 * ((chosen - ref_c) - (rejected - ref_r))).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-5)
    assert float(metrics["rewards/margins"]) == pytest.approx(
        float((0.5 * ((chosen - ref_c) - (rejected - ref_r))).mean()), abs=1e-5
    )
    assert float(metrics["logps/chosen"]) == pytest.approx(float(chosen.mean()), abs=1e-4)
    assert loss.requires_grad


@pytest.mark.parametrize("lora", [True, False])
def test_lean_logps_equal_the_policys_with_the_same_gradients(lora: bool) -> None:
    """The chunked, recomputed LM head gives LMPolicy.sequence_logps' values and gradients (fp32)."""
    policy = tiny_policy(lora, **TRAINING_SIZES)
    perturb(policy)
    records = pairs(3)
    batch = policy.encode(
        [r["prompt"] for r in records] * 2, [r["chosen"] for r in records] + [r["rejected"] for r in records]
    )
    results = []
    for score in (policy.sequence_logps, lambda *b: policy.sequence_logps(*b, lean=True, chunk=50)):
        policy.model.zero_grad()
        logps, counts = score(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), counts, grads))
    (ref, ref_counts, ref_grads), (lean, lean_counts, lean_grads) = results
    assert torch.allclose(lean, ref, atol=1e-4) and torch.equal(lean_counts, ref_counts)
    assert ref_grads.keys() == lean_grads.keys() and ref_grads
    for name, grad in ref_grads.items():
        assert torch.allclose(lean_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_precompute_adds_only_what_the_solver_reads() -> None:
    policy = tiny_policy(**TRAINING_SIZES)
    reference = policy.snapshot()
    perturb(policy)  # current weights = the last iterate, `reference` = the initial ones
    records = pairs(3)
    assert set(precompute_logps(policy, records, solver("dpo"))[0]) - set(records[0]) == {
        "ref_chosen",
        "ref_rejected",
    }
    assert set(precompute_logps(policy, records, solver("iter_ipo"))[0]) - set(records[0]) == {
        "last_chosen",
        "last_rejected",
    }
    inpo = precompute_logps(policy, records, solver("inpo"), last=None, reference=reference)
    prompts = [r["prompt"] for r in records]
    chosen = [r["chosen"] for r in records]
    assert [r["last_chosen"] for r in inpo] == pytest.approx(policy.logps(prompts, chosen).tolist(), abs=1e-5)
    assert [r["ref_chosen"] for r in inpo] == pytest.approx(
        policy.logps(prompts, chosen, snapshot=reference).tolist(), abs=1e-5
    )
    assert inpo[0]["ref_chosen"] != pytest.approx(inpo[0]["last_chosen"])
    assert "ref_chosen" not in records[0], "the input records are not modified"


def test_one_snapshot_used_twice_is_scored_once(monkeypatch: pytest.MonkeyPatch) -> None:
    policy, calls = tiny_policy(**TRAINING_SIZES), []
    original = policy.logps
    monkeypatch.setattr(policy, "logps", lambda *a, **k: calls.append(k.get("snapshot")) or original(*a, **k))
    snapshot = policy.snapshot()
    records = precompute_logps(policy, pairs(2), solver("inpo"), last=snapshot, reference=snapshot)
    assert len(calls) == 1
    assert records[0]["last_chosen"] == records[0]["ref_chosen"]


def test_trainer_options_pass_through(tmp_path: Path) -> None:
    """bf16 autocast, accumulation, clipping, epochs, warm-up + cosine schedule and checkpoints reach Lightning."""
    policy, dpo = tiny_policy(**TRAINING_SIZES), solver("dpo")
    cfg = dict(
        FAST,
        max_steps=-1,
        max_epochs=2,
        batch_size=2,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        gradient_clip_val=0.5,
        lr=1e-3,
        scheduler={"name": "cosine", "warmup_steps": 1},
        checkpoint={"enabled": True},
    )
    records = precompute_logps(policy, pairs(8), dpo, precision="bf16-mixed")
    run = Run(tmp_path)
    result = fit(
        policy,
        dpo,
        records,
        cfg,
        tmp_path,
        val_records=precompute_logps(policy, pairs(4, SAMPLE_HELDOUT), dpo),
        run=run,
    )
    assert result["steps"] == 4  # 8 pairs / 2 per batch = 4 micro-batches, 2 per step, 2 epochs
    schedule = lr_lambda(SchedulerConfig(name="cosine", warmup_steps=1), 4)
    rows = [r for r in read_metrics(run.metrics_path) if "learning_rate" in r]
    # Lightning logs the last micro-batch of each accumulation window
    assert [r["learning_rate"] for r in rows] == pytest.approx(
        [1e-3 * schedule(s) for s in (0, 1, 2, 3)], rel=1e-5
    )
    assert all(r["grad_norm"] > 0 for r in rows)
    assert result["eval_before"]["eval_loss"] == pytest.approx(math.log(2), abs=0.02)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all("lora_" in k for k in state), "checkpoints hold only the adapter"


def test_full_fine_tune_trains_every_weight(tmp_path: Path) -> None:
    policy, ipo = tiny_policy(lora=False, **TRAINING_SIZES), solver("ipo")
    before = policy.snapshot()
    fit(policy, ipo, precompute_logps(policy, pairs(4), ipo), dict(FAST, max_steps=1, lr=1e-3), tmp_path)
    changed = [k for k, v in policy.snapshot().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(before)


def test_lr_schedules_by_hand() -> None:
    linear = lr_lambda(SchedulerConfig(name="linear", warmup_steps=2), 10)
    assert [linear(s) for s in (0, 1, 2, 6, 10)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5, 0.0])
    cosine = lr_lambda(SchedulerConfig(name="cosine", warmup_ratio=0.2), 10)
    assert [cosine(s) for s in (2, 6, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_lambda(SchedulerConfig(name="constant", warmup_ratio=0.0), 10)(9) == 1.0


def test_bad_inputs_get_clear_errors(tmp_path: Path) -> None:
    policy = tiny_policy(**TRAINING_SIZES)
    with pytest.raises(ValueError, match="needs 'ref_chosen' .*precompute_logps"):
        fit(policy, solver("dpo"), pairs(2), FAST, tmp_path)
    with pytest.raises(ValueError, match="needs 'chosen_winprob' .* sppo_hard"):
        fit(policy, solver("sppo"), precompute_logps(policy, pairs(2), solver("sppo")), FAST, tmp_path)
    for name in GAME_SOLVERS:
        with pytest.raises(ConfigError, match="exact games only"):
            fit(policy, solver(name), pairs(2), FAST, tmp_path)
    with pytest.raises(ConfigError, match="lrr"):
        trainer_config({"lrr": 1.0})
    with pytest.raises(ConfigError, match=r"trainer.precision='bf17'"):
        trainer_config({"precision": "bf17"})
    with pytest.raises(ConfigError, match=r"trainer.optimizer._target_='os.system'"):
        trainer_config({"optimizer": {"_target_": "os.system"}})


def test_required_keys_follow_the_solver_flags() -> None:
    assert required_keys(solver("dpo")) == ["ref_chosen", "ref_rejected"]
    assert required_keys(solver("sppo")) == [
        "last_chosen",
        "last_rejected",
        "chosen_winprob",
        "rejected_winprob",
    ]
    assert required_keys(solver("inpo")) == ["last_chosen", "last_rejected", "ref_chosen", "ref_rejected"]


@pytest.mark.parametrize("name", ["default", "cpu", "gpu", "fast"])
def test_trainer_configs_compose_and_validate(name: str) -> None:
    from comalkit.testing import compose

    cfg = compose(["experiment=offline", f"trainer={name}", "seed=7"])
    tc = trainer_config(cfg.trainer)
    assert tc.seed == 7
    assert (tc.accelerator, tc.precision) == {
        "default": ("auto", "bf16-mixed"),
        "cpu": ("cpu", "bf16-mixed"),
        "gpu": ("gpu", "bf16-mixed"),
        "fast": ("cpu", "32-true"),
    }[name]
