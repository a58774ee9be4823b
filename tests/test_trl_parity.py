"""Parity with TRL's DPOTrainer for the loss types both have: sigmoid (dpo), ipo, sppo_hard.

TRL computes its loss inside ``DPOTrainer._compute_loss(model, inputs)``, which runs the model.
We call that method on a trainer built with ``object.__new__`` plus the attributes it reads
(a full trainer needs a tokenizer and a dataset, neither of which the loss touches), and
compare loss values, gradients and TRL's logged rewards with ``solver.loss`` two ways:

* exactly (1e-12), with a stand-in model whose per-token log-probs are the parameters, so both
  sides see identical log-probs and only the loss code differs;
* end to end on a tiny random Llama in float64 with TRL's fused LM head, against comalkit's
  plain forward pass: this also checks the log-prob conventions (shift, completion mask,
  summation, token counts). TRL's fused head computes logits in float32, hence 1e-6.

Finally, the whole pipeline is trained for three steps by both (``fit`` against
``DPOTrainer.train``) from the same LoRA initialisation, and every logged step must agree.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from comalkit.__main__ import load_plugins
from comalkit.interfaces import PairLogps
from comalkit.registry import registry

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")
load_plugins()

PAIRS, LENGTH, VOCAB = 3, 10, 32
PROMPT_LENGTHS = [3, 2, 4, 3, 2, 4]  # chosen rows, then rejected rows (TRL's batch layout)
COMPLETION_LENGTHS = [3, 5, 2, 4, 6, 1]
CASES = [  # (TRL loss_type, comalkit solver, its options, TRL beta = the solver's strength)
    ("sigmoid", "dpo", {}, 0.1),
    ("sigmoid", "dpo", {}, 2.0),
    ("ipo", "ipo", {"average_log_prob": True}, 0.1),  # TRL's IPO averages log-probs per token
    ("ipo", "ipo", {"average_log_prob": True}, 1.0),
    ("sppo_hard", "sppo_hard", {}, 0.1),  # TRL's reference model plays SPPO's last iterate
    ("sppo_hard", "sppo_hard", {}, 1.0),
]


class TokenLogpModel(torch.nn.Module):
    """Stands in for a causal LM with TRL's fused head: its per-token log-probs are its parameters."""

    def __init__(self, token_logps: torch.Tensor) -> None:
        super().__init__()
        self.token_logps = torch.nn.Parameter(token_logps)

    def forward(self, labels, fused_lm_head, **_):
        assert fused_lm_head
        mask = labels[:, 1:] != -100
        logps = self.token_logps * mask
        return SimpleNamespace(
            log_probs=logps,
            entropy=torch.zeros_like(logps),
            mean_logits=torch.zeros_like(logps),
            is_top1=mask & False,
        )

    def sequence_logps(self, inputs) -> torch.Tensor:
        return (self.token_logps * inputs["completion_mask"][:, 1:]).sum(-1)


def batch_inputs() -> dict[str, torch.Tensor]:
    """TRL's padded batch: chosen rows then rejected rows, right padding, frozen summed log-probs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), generator=g)
    attention = torch.ones(2 * PAIRS, LENGTH, dtype=torch.long)
    completion = torch.zeros(2 * PAIRS, LENGTH, dtype=torch.long)
    for row, (p, n) in enumerate(zip(PROMPT_LENGTHS, COMPLETION_LENGTHS)):
        completion[row, p : p + n] = 1
        attention[row, p + n :] = 0
    frozen = -3.0 * torch.rand(2, PAIRS, generator=g, dtype=torch.float64) - 8.0
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "ref_chosen_logps": frozen[0],
        "ref_rejected_logps": frozen[1],
    }


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).double().train()
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return model


def llama_logps(model, inputs) -> torch.Tensor:
    """comalkit's side: summed response log-probs by a plain forward pass."""
    ids = inputs["input_ids"]
    logits = model(input_ids=ids, attention_mask=inputs["attention_mask"]).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return (token_logps * inputs["completion_mask"][:, 1:]).sum(-1)


def trl_loss(model, inputs, loss_type: str, beta: float):
    """TRL's loss and logged metrics, from ``DPOTrainer._compute_loss`` on a minimal trainer."""
    trainer = object.__new__(trl_dpo.DPOTrainer)
    identity = lambda x: x  # noqa: E731 - one process: gathering is the identity
    trainer.__dict__.update(
        model=model,
        beta=beta,
        loss_types=[loss_type],
        loss_weights=[1.0],
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return trainer._compute_loss(model, inputs, False), trainer._metrics["train"]


def comalkit_pairs(logps: torch.Tensor, inputs) -> PairLogps:
    """The solver's batch: policy log-probs, token counts, and the frozen log-probs as its baseline."""
    tokens = inputs["completion_mask"].sum(-1).double()
    ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
    return PairLogps(
        policy_chosen=logps[:PAIRS],
        policy_rejected=logps[PAIRS:],
        chosen_tokens=tokens[:PAIRS],
        rejected_tokens=tokens[PAIRS:],
        ref_chosen=ref_c,
        ref_rejected=ref_r,
        last_chosen=ref_c,
        last_rejected=ref_r,
    )


def loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def compare(model, logps_fn, loss_type, solver_name, options, beta, rel, grad_rtol):
    inputs = batch_inputs()
    solver = registry.get("solver", solver_name)(**options)
    solver.set_strength(beta)
    logged, ours = {}, {}

    def trl_side():
        loss, metrics = trl_loss(model, inputs, loss_type, beta)
        logged.update(metrics)
        return loss

    def comalkit_side():
        out = solver.loss(comalkit_pairs(logps_fn(model, inputs), inputs))
        ours["out"] = out
        return out.mean()

    trl_value, trl_grads = loss_and_grads(model, trl_side)
    value, grads = loss_and_grads(model, comalkit_side)
    assert value.item() == pytest.approx(trl_value.item(), rel=rel)
    for mine, theirs in zip(grads, trl_grads):
        assert torch.allclose(mine, theirs, rtol=grad_rtol, atol=grad_rtol * theirs.abs().max().item())
    # TRL logs float32 means of its rewards
    assert ours["out"].chosen_rewards.mean().item() == pytest.approx(logged["rewards/chosen"][0], rel=1e-6)
    assert ours["out"].rejected_rewards.mean().item() == pytest.approx(
        logged["rewards/rejected"][0], rel=1e-6
    )


@pytest.mark.parametrize(("loss_type", "solver_name", "options", "beta"), CASES)
def test_exact_parity_on_identical_log_probs(loss_type, solver_name, options, beta):
    g = torch.Generator().manual_seed(1)
    model = TokenLogpModel(-4.0 * torch.rand(2 * PAIRS, LENGTH - 1, generator=g, dtype=torch.float64))
    compare(
        model, lambda m, inputs: m.sequence_logps(inputs), loss_type, solver_name, options, beta, 1e-12, 1e-12
    )


@pytest.mark.parametrize(("loss_type", "solver_name", "options", "beta"), CASES)
def test_end_to_end_parity_on_a_tiny_llama(llama, loss_type, solver_name, options, beta):
    compare(llama, llama_logps, loss_type, solver_name, options, beta, 1e-6, 1e-5)


def test_summed_ipo_is_not_trls_per_token_ipo():
    """The default (summed) IPO is a different objective from TRL's: the flag matters."""
    inputs = batch_inputs()
    model = TokenLogpModel(-4.0 * torch.rand(2 * PAIRS, LENGTH - 1, dtype=torch.float64))
    with torch.no_grad():
        trl_value, _ = trl_loss(model, inputs, "ipo", 0.1)
        summed = registry.get("solver", "ipo")(tau=0.1).loss(
            comalkit_pairs(model.sequence_logps(inputs), inputs)
        )
    assert abs(summed.mean().item() - trl_value.item()) > 1e-3


def test_training_matches_trls_dpo_trainer_step_by_step(tmp_path):
    """The whole pipeline, not just the loss: chat template, masks, frozen reference, AdamW,
    clipping and schedule. The same tiny model, LoRA initialisation and pairs, trained three
    steps in float32 by ``comalkit.training.fit`` and by TRL's DPOTrainer, must log the same
    loss, log-probs and gradient norm at every step (measured on SmolLM2: equal to 1e-4 too)."""
    import lightning as L
    from comalkit_plugins.models.tiny import TinyModel, tiny_causal_lm
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import logging as hf_logging

    from comalkit.lm.lora import LoraSettings
    from comalkit.training import fit, precompute_logps

    trl = pytest.importorskip("trl")
    hf_logging.set_verbosity_error()
    pairs = [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Fish, probably."},
        {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."},
    ]
    steps, lr, beta, targets = 3, 1e-2, 0.1, ["q_proj", "v_proj"]

    model, tokenizer = tiny_causal_lm(seed=0)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        max_length=256,
        use_cpu=True,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        beta=beta,
        max_steps=steps,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    # TRL's conversational rows would also score the template's "\n" after <|im_end|>; comalkit
    # stops at <|im_end|>, where sampling stops. So TRL gets the templated prompt and the bare
    # response, to which it appends EOS (= <|im_end|>): the same tokens on both sides.
    templated = [
        {
            **p,
            "prompt": tokenizer.apply_chat_template(
                [{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True
            ),
        }
        for p in pairs
    ]
    trainer = trl.DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(templated),
        processing_class=tokenizer,
        peft_config=lora,
    )
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h and "logps/chosen" in h]

    policy = TinyModel(
        seed=0,
        max_length=256,
        max_prompt_length=128,
        lora=LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=targets),
    ).build()
    named = dict(policy.model.named_parameters())
    with torch.no_grad():  # the same LoRA initialisation (A is random; B starts at zero)
        for name, value in initial.items():
            named[name].copy_(value)
    solver = registry.get("solver", "dpo")(beta=beta)
    records = precompute_logps(policy, pairs, solver, batch_size=8)

    class Record(L.Callback):
        def __init__(self) -> None:
            self.rows: list[dict[str, float]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    cfg = {
        "accelerator": "cpu",
        "precision": "32-true",
        "max_steps": steps,
        "max_epochs": steps,
        "batch_size": 4,
        "lr": lr,
        "scheduler": {"name": "constant", "warmup_ratio": 0.0},
        "gradient_clip_val": 1.0,
        "enable_progress_bar": False,
    }
    fit(policy, solver, records, cfg, tmp_path / "comalkit", callbacks=[record := Record()])

    assert len(record.rows) == len(theirs) == steps
    assert theirs[-1]["loss"] < theirs[0]["loss"] - 0.01  # it trained, so later steps test the update
    # float32 on both sides, different kernels: log-probs agree to ~2e-5 relative; the gradient
    # norm, a sum over tiny values of a random model, to ~3e-3 (on SmolLM2: 1e-5)
    tolerances = {
        "loss": (1e-4, 0),
        "logps/chosen": (1e-4, 0),
        "logps/rejected": (1e-4, 0),
        "rewards/margins": (0, 1e-4),
        "grad_norm": (5e-3, 0),
    }
    for ours, trl_row in zip(record.rows, theirs):
        for key, (rel, abs_) in tolerances.items():
            assert ours[key] == pytest.approx(trl_row[key], rel=rel, abs=abs_), key
