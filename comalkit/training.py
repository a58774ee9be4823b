"""Training a language-model policy on preference pairs with any solver, under a real ``lightning.Trainer``.

One :class:`PreferenceModule` serves every solver: it tokenises pairs, runs chosen and
rejected responses through the policy in one concatenated forward pass, hands the summed
log-probs to ``solver.loss`` and logs TRL's metric names (``loss``, ``rewards/chosen``,
``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ...), so runs compare with
TRL's DPOTrainer. The frozen log-probs a solver reads (last iterate π_t, reference μ) are
computed once beforehand by :func:`precompute_logps`, so training holds a single model.

:func:`fit` builds the ``lightning.Trainer`` from the ``trainer`` config group
(``conf/trainer/*.yaml``, schema :class:`TrainerConfig`) and forwards every logged step to
the run's ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor
from torch.utils.data import DataLoader

from comalkit.distributed import (
    START_METHODS,
    GlobalBatchSampler,
    ScaledRecords,
    check_layout,
    current_rank,
    launched_externally,
    spawn_fit,
    strategy_for,
    world_size,
)
from comalkit.interfaces import PairLogps, RunContext, Snapshot, SubgameSolver
from comalkit.preference_data import PreferenceRecord
from comalkit.registry import ConfigError, instantiate, param, registry

#: optimizers a ``trainer.optimizer._target_`` may name (built as partials over the trainable parameters)
OPTIMIZERS = ("torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD")
for _target in OPTIMIZERS:
    registry.allow_target(_target)

#: the frozen inputs a solver may read, as (flag on the solver, prefix of the record keys)
FROZEN = (("needs_last_iterate", "last"), ("needs_reference", "ref"))
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
#: Lightning accelerators comalkit runs on (TPUs would need torch_xla and were never tried)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: what a non-finite training loss or gradient does
NONFINITE_MODES = ("error", "skip")


class NonFiniteError(RuntimeError):
    """Training produced a nan or inf loss, gradient or weight; the message names the step."""


# ---------------------------------------------------------------------------------------------
# Config schema of the ``trainer`` group
# ---------------------------------------------------------------------------------------------
@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warm-up, then constant, linear decay to 0, or cosine to 0."""

    name: str = param(
        "linear", choices=SCHEDULES, help="constant | linear | cosine (decay to 0 after warm-up)"
    )
    warmup_steps: int = param(0, ge=0, help="warm-up optimizer steps; > 0 wins over warmup_ratio")
    warmup_ratio: float = param(0.0, ge=0.0, lt=1.0, help="warm-up as a share of all optimizer steps")


@dataclass
class CheckpointConfig:
    """Lightning checkpoints (trainable weights + optimizer state) under ``<out_dir>/<dirname>``."""

    enabled: bool = param(False, help="write Lightning checkpoints")
    every_n_train_steps: int | None = param(None, ge=1, help="null: at the end of every epoch")
    keep_all: bool = param(False, help="false: only the latest (plus a last.ckpt link)")
    dirname: str = param("checkpoints", help="directory inside the output directory")


@dataclass
class TrainerConfig:
    """Everything :func:`fit` reads; ``conf/trainer/*.yaml`` set these keys (unknown keys are errors).

    The field limits are checked by :func:`comalkit.registry.validate` when the config is
    composed; :func:`trainer_config` adds the checks that involve two fields.
    """

    accelerator: str = param("auto", choices=ACCELERATORS, help="where training runs")
    devices: Any = param(1, help="devices per node: a count >= 1, -1 (all), 'auto', or a list of ids")
    strategy: str = param("auto", help="Lightning strategy (auto, ddp, ...)")
    num_nodes: int = param(1, ge=1, help="machines")
    precision: str = param("32-true", choices=PRECISIONS, help="Lightning precision")
    max_epochs: int = param(1, help="passes over the pairs: >= 1, or -1 with max_steps > 0")
    max_steps: int = param(-1, help="-1: no limit beyond max_epochs; else > 0")
    batch_size: int = param(
        4, ge=1, help="preference pairs per micro-batch over all devices (2x sequences; docs/scaling.md)"
    )
    eval_batch_size: int = param(8, ge=1, help="pairs per held-out batch over all devices")
    accumulate_grad_batches: int = param(1, ge=1, help="micro-batches per optimizer step")
    gradient_clip_val: float | None = param(1.0, gt=0.0, help="gradient-norm clip; null: none")
    lr: float = param(5.0e-5, gt=0.0, help="peak learning rate")
    optimizer: dict[str, Any] = param(
        default_factory=lambda: {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 0.0},
        help="built as optimizer(trainable_params, lr=lr)",
    )
    scheduler: SchedulerConfig = param(default_factory=SchedulerConfig, help="learning-rate schedule")
    checkpoint: CheckpointConfig = param(default_factory=CheckpointConfig, help="Lightning checkpoints")
    eval_every_n_steps: int | None = param(
        None, ge=1, help="held-out metrics during training too (always at the start and the end)"
    )
    log_every_n_steps: int = param(1, ge=1, help="metrics rows every n optimizer steps")
    enable_progress_bar: bool = param(True, help="Lightning's progress bar")
    enable_model_summary: bool = param(False, help="Lightning's model summary")
    logps_batch_size: int = param(8, ge=1, help="sequences per no-grad forward for the frozen log-probs")
    lean_logps: bool = param(True, help="training log-probs through a chunked, recomputed LM head")
    on_nonfinite: str = param(
        "error", choices=NONFINITE_MODES, help="a nan/inf loss or gradient: error (stop) or skip the batch"
    )
    start_method: str = param(
        "auto",
        choices=START_METHODS,
        help="how comalkit starts the ranks on one node: auto (fork for CPU ranks, else spawn) | spawn | fork",
    )
    shuffle: bool = param(True, help="shuffle the training pairs every epoch")
    seed: int = param(0, help="data order")


def trainer_config(cfg: Mapping[str, Any] | DictConfig | TrainerConfig | None) -> TrainerConfig:
    """Validate a ``trainer`` config node against :class:`TrainerConfig`; raise :class:`ConfigError`."""
    if isinstance(cfg, TrainerConfig):
        return cfg
    from comalkit.registry import validate_dataclass

    try:
        if isinstance(cfg, DictConfig):  # resolve against the full config (e.g. ``seed: ${seed}``)
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        node = OmegaConf.create(cfg or {})
        validate_dataclass("trainer", TrainerConfig, node, strict=True)
        merged = OmegaConf.merge(OmegaConf.structured(TrainerConfig), node)
        tc: TrainerConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"trainer config: {exc}".replace("\n", " ")) from None
    checks = [
        (
            tc.max_epochs >= 1 or (tc.max_epochs == -1 and tc.max_steps > 0),
            f"trainer.max_epochs={tc.max_epochs}: expected >= 1 (or -1 with trainer.max_steps > 0); "
            "0 would train nothing",
        ),
        (
            tc.max_steps == -1 or tc.max_steps > 0,
            f"trainer.max_steps={tc.max_steps}: expected -1 (no limit) or > 0",
        ),
        (
            _devices_ok(tc.devices),
            f"trainer.devices={tc.devices!r}: expected a count >= 1, -1 (all), 'auto' or a list of device ids",
        ),
        (
            tc.optimizer.get("_target_") in OPTIMIZERS,
            f"trainer.optimizer._target_={tc.optimizer.get('_target_')!r}: expected one of {list(OPTIMIZERS)}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for ok, message in check_layout(tc):  # after the devices check: the layout reads trainer.devices
        if not ok:
            raise ConfigError(message)
    return tc


def _devices_ok(devices: Any) -> bool:
    """Lightning's forms: a count >= 1, -1 (all), "auto", or device ids ("0,1" or [0, 1])."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            return True
        try:
            devices = int(text)
        except ValueError:
            parts = [p.strip() for p in text.split(",") if p.strip()]
            return bool(parts) and all(p.isdigit() for p in parts)
    if isinstance(devices, bool):
        return False
    if isinstance(devices, int):
        return devices >= 1 or devices == -1
    if isinstance(devices, (list, tuple)):
        return bool(devices) and all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices
        )
    return False


def check_accelerator(cfg: TrainerConfig) -> None:
    """Fail before any work when the requested accelerator is not on this machine."""
    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={cfg.accelerator} but no CUDA device is visible; use trainer.accelerator=cpu or auto"
        )
    if cfg.accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            "trainer.accelerator=mps but MPS is not available; use trainer.accelerator=cpu or auto"
        )


# ---------------------------------------------------------------------------------------------
# Precision and frozen log-probs
# ---------------------------------------------------------------------------------------------
def autocast(precision: str, device: torch.device | str = "cpu") -> contextlib.AbstractContextManager[Any]:
    """The autocast context Lightning uses for ``precision`` (so frozen and trained log-probs agree)."""
    device_type = torch.device(device).type
    if precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)
    if precision == "16-mixed":
        return torch.autocast(device_type, dtype=torch.float16, cache_enabled=False)
    return contextlib.nullcontext()


def required_keys(solver: SubgameSolver) -> list[str]:
    """The record keys a solver's loss reads beyond prompt/chosen/rejected."""
    keys = [
        f"{prefix}_{side}"
        for flag, prefix in FROZEN
        if getattr(solver, flag)
        for side in ("chosen", "rejected")
    ]
    if solver.needs_win_probs:
        keys += ["chosen_winprob", "rejected_winprob"]
    return keys


def precompute_logps(
    policy: Any,
    records: Sequence[PreferenceRecord],
    solver: SubgameSolver,
    last: Snapshot | None = None,
    reference: Snapshot | None = None,
    batch_size: int = 8,
    precision: str = "32-true",
) -> list[PreferenceRecord]:
    """Copies of ``records`` with the frozen summed log-probs ``solver`` needs (``last_*``, ``ref_*``).

    Each snapshot is evaluated once, without gradients, swapped into the policy
    (``policy.logps(..., snapshot=)`` uses ``policy.using``); ``None`` means the policy's current weights, and a snapshot passed
    as both ``last`` and ``reference`` is evaluated once. ``precision`` should be the
    trainer's, so that at step 0 the policy's log-probs equal the frozen ones.
    """
    out: list[PreferenceRecord] = [dict(r) for r in records]  # type: ignore[misc]
    if not out:
        return out
    prompts = [r["prompt"] for r in out]
    responses = [r["chosen"] for r in out] + [r["rejected"] for r in out]
    computed: dict[int, Tensor] = {}
    for flag, prefix in FROZEN:
        if not getattr(solver, flag):
            continue
        snapshot = last if prefix == "last" else reference
        if id(snapshot) not in computed:
            with autocast(precision, policy.device):
                values = policy.logps(prompts + prompts, responses, snapshot=snapshot, batch_size=batch_size)
            computed[id(snapshot)] = values.float().cpu()
        values = computed[id(snapshot)].tolist()
        for i, record in enumerate(out):
            record[f"{prefix}_chosen"] = values[i]  # type: ignore[literal-required]
            record[f"{prefix}_rejected"] = values[len(out) + i]  # type: ignore[literal-required]
    return out


def check_records(records: Sequence[PreferenceRecord], solver: SubgameSolver, what: str = "training") -> None:
    """Raise ``ValueError`` naming the first record that lacks a key ``solver`` reads."""
    if not records:
        raise ValueError(f"no {what} preference pairs to fit")
    name = type(solver).__name__
    for key in required_keys(solver):
        for i, record in enumerate(records):
            if record.get(key) is None:
                hint = (
                    "compute them first with comalkit.training.precompute_logps"
                    if key.startswith(("last_", "ref_"))
                    else "the data needs soft win probabilities (chosen_winprob/rejected_winprob); "
                    "for hard labels choose a solver without them, e.g. sppo_hard"
                )
                raise ValueError(
                    f"solver {name} needs '{key}' in every {what} pair; pair {i} has none: {hint}"
                )


# ---------------------------------------------------------------------------------------------
# The shared LightningModule
# ---------------------------------------------------------------------------------------------
class PreferenceModule(L.LightningModule):
    """One training step for every solver: policy log-probs of a pair batch -> ``solver.loss``.

    Chosen and rejected responses are concatenated into one batch of 2B sequences, so each
    step is a single forward and backward pass. Frozen log-probs and win probabilities
    come with the records (see :func:`precompute_logps`). Checkpoints hold only the
    trainable parameters (for LoRA: the adapter), not the frozen base model.
    """

    def __init__(
        self, policy: Any, solver: SubgameSolver, cfg: TrainerConfig | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        if not getattr(solver, "language_model", True):
            raise ConfigError(
                f"solver {type(solver).__name__} runs on exact games only (experiment=synthetic); choose a "
                "language-model solver such as dpo, ipo, sppo, inpo or mpo"
            )
        self.policy = policy
        self.model = policy.model  # registered, so Lightning moves, casts and trains it
        self.solver = solver
        self.cfg = trainer_config(cfg)
        self.strict_loading = False  # checkpoints carry only the trainable weights
        self._tokens_seen = 0
        self.skipped_batches = 0  # non-finite batches skipped (trainer.on_nonfinite=skip)
        #: (rank, world) when several processes train: batches are slices of global batches
        self.shard: tuple[int, int] | None = None
        self._global = (0, 0)  # the last sharded batch: (pairs, tokens) over all ranks
        self._last_loss = float("nan")

    # -- data -------------------------------------------------------------------------------------
    def collate(self, records: Sequence[PreferenceRecord]) -> dict[str, Tensor]:
        """Records -> one padded batch of ``[chosen..., rejected...]`` plus the frozen per-pair inputs."""
        prompts = [r["prompt"] for r in records]
        batch = dict(
            self.policy.encode(
                prompts + prompts, [r["chosen"] for r in records] + [r["rejected"] for r in records]
            )
        )
        for key in required_keys(self.solver):
            batch[key] = torch.tensor([float(r[key]) for r in records], dtype=torch.float32)  # type: ignore[literal-required]
        return batch

    def dataloader(self, records: Sequence[PreferenceRecord], train: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.cfg.seed)
        if self.shard is not None:  # this rank's slices of the global batches one process would draw
            size = self.cfg.batch_size if train else self.cfg.eval_batch_size
            shuffle = train and self.cfg.shuffle
            sampler = GlobalBatchSampler(
                len(records), size, *self.shard, shuffle=shuffle, generator=generator
            )
            return DataLoader(
                ScaledRecords(records),
                batch_sampler=sampler,
                collate_fn=self.collate_scaled,
                generator=generator,
            )
        return DataLoader(
            list(records),
            batch_size=self.cfg.batch_size if train else self.cfg.eval_batch_size,
            shuffle=train and self.cfg.shuffle,
            collate_fn=self.collate,
            generator=generator,
        )

    def collate_scaled(self, items: Sequence[tuple[PreferenceRecord, float]]) -> dict[str, Tensor]:
        """:meth:`collate` plus each pair's loss scale (:class:`comalkit.distributed.GlobalBatchSampler`)."""
        batch = self.collate([record for record, _ in items])
        batch["pair_scale"] = torch.tensor([scale for _, scale in items], dtype=torch.float32)
        return batch

    # -- steps ------------------------------------------------------------------------------------
    def pair_logps(self, batch: Mapping[str, Tensor]) -> PairLogps:
        """Policy log-probs (with grad) of the batch, joined with its frozen inputs."""
        logps, counts = self.policy.sequence_logps(
            batch["input_ids"], batch["attention_mask"], batch["response_mask"], lean=self.cfg.lean_logps
        )
        logps, counts = logps.float(), counts.float()
        n = logps.shape[0] // 2
        return PairLogps(
            policy_chosen=logps[:n],
            policy_rejected=logps[n:],
            chosen_tokens=counts[:n],
            rejected_tokens=counts[n:],
            **{key: batch[key] for key in required_keys(self.solver)},
        )

    def _step(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        pairs = self.pair_logps(batch)
        out = self.solver.loss(pairs)
        if "pair_scale" in batch:
            return self._global_step(batch, pairs, out)
        loss = out.mean(pairs.weight)
        chosen, rejected = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": pairs.policy_chosen.detach().mean(),
            "logps/rejected": pairs.policy_rejected.detach().mean(),
        }
        return loss, metrics

    def _global_step(
        self, batch: Mapping[str, Tensor], pairs: PairLogps, out: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One rank's share of a global batch: a loss whose DDP-averaged gradient is the global batch's
        mean loss, and the global batch's metrics (summed over ranks, so every rank logs the same)."""
        scale = batch["pair_scale"].to(out.losses.device)
        real = (scale > 0).float()
        chosen, rejected = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
        rows = torch.stack(
            [
                out.losses.detach().float(),
                chosen,
                rejected,
                (chosen > rejected).float(),
                chosen - rejected,
                pairs.policy_chosen.detach().float(),
                pairs.policy_rejected.detach().float(),
            ]
        )
        tokens = (batch["attention_mask"].sum(1).view(2, -1).sum(0).to(real.device) * real).sum()
        sums = torch.cat([(rows * real).sum(1), real.sum().view(1), tokens.float().view(1)])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = sums[:7] / sums[7]
        self._global = (int(sums[7]), int(sums[8]))
        # a non-finite loss on any rank makes every rank's loss nan, so all ranks stop or skip together
        loss = (out.losses * scale).sum() + 0.0 * means[0]
        names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
        names += ("logps/chosen", "logps/rejected")
        return loss, dict(zip(names, means, strict=True))

    def _pairs_in(self, batch: Mapping[str, Tensor]) -> int:
        return self._global[0] if "pair_scale" in batch else batch["input_ids"].shape[0] // 2

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss, metrics = self._step(batch)
        if not torch.isfinite(loss):
            if self.cfg.on_nonfinite == "skip":
                self.skipped_batches += 1
                return None  # Lightning skips backward and the optimizer step
            raise NonFiniteError(f"{self._where()}: the loss is {float(loss)}{self._hint()}")
        self._last_loss = float(loss.detach())
        self._tokens_seen += self._global[1] if "pair_scale" in batch else int(batch["attention_mask"].sum())
        metrics["num_tokens"] = torch.tensor(float(self._tokens_seen))
        metrics["learning_rate"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=self._pairs_in(batch))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, metrics = self._step(batch)
        metrics = {f"eval_{k}": v for k, v in metrics.items()}
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=self._pairs_in(batch), sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            # under 16-mixed the grad scaler itself skips steps with inf gradients (it then lowers its scale)
            if not torch.isfinite(norm) and self.cfg.precision != "16-mixed":
                if self.cfg.on_nonfinite != "skip":
                    raise NonFiniteError(f"{self._where()}: the gradient norm is {float(norm)}{self._hint()}")
                self.skipped_batches += 1
                optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are not updated
                return
            self.log("grad_norm", norm, on_step=True, on_epoch=False)

    def _where(self) -> str:
        return f"training stopped at epoch {self.current_epoch}, step {self.global_step}"

    def _hint(self) -> str:
        fp32 = "" if self.cfg.precision in ("32-true", "32", "64-true") else ", use trainer.precision=32-true"
        return (
            f" (last finite loss {self._last_loss:.4g}, trainer.lr={self.cfg.lr}, trainer.precision="
            f"{self.cfg.precision}); lower trainer.lr{fp32}, or set trainer.on_nonfinite=skip to skip such "
            "batches. Nothing was saved."
        )

    # -- optimisation ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the policy has no trainable parameters (is every weight frozen?)")
        optimizer = instantiate(OmegaConf.create(self.cfg.optimizer))(params, lr=self.cfg.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lr_lambda(self.cfg.scheduler, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def lr_lambda(cfg: SchedulerConfig, total_steps: int) -> Any:
    """The LR multiplier per optimizer step: linear warm-up, then constant / linear / cosine decay to 0."""
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if cfg.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


# ---------------------------------------------------------------------------------------------
# Lightning -> comalkit's run outputs
# ---------------------------------------------------------------------------------------------
class RunLogger(Logger):
    """A Lightning logger that forwards every logged step to a :class:`RunContext` (``metrics.jsonl``)."""

    def __init__(self, run: RunContext, step_offset: int = 0) -> None:
        super().__init__()
        self.run = run
        self.step_offset = step_offset

    @property
    def name(self) -> str:
        return "comalkit"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.run.log(dict(metrics), self.step_offset + (step or 0))

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def build_trainer(
    cfg: TrainerConfig,
    out_dir: str | Path,
    run: RunContext | None = None,
    step_offset: int = 0,
    callbacks: Sequence[L.Callback] = (),
    model: torch.nn.Module | None = None,
    plugins: Sequence[Any] = (),
) -> L.Trainer:
    """A ``lightning.Trainer`` with the ``trainer`` group's settings; metrics go to ``run`` if given.

    ``model`` is the policy's network: ``trainer.strategy=fsdp`` wraps its decoder layers
    (:func:`comalkit.distributed.strategy_for`). Lightning's distributed sampler is off: with several
    processes the batches are already sharded (:class:`comalkit.distributed.GlobalBatchSampler`), and
    on one device ``strategy=ddp`` then draws the same batches as ``strategy=auto``.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = list(callbacks)
    if cfg.checkpoint.enabled:
        callbacks.append(
            ModelCheckpoint(
                dirpath=Path(out_dir) / cfg.checkpoint.dirname,
                save_last="link",
                every_n_train_steps=cfg.checkpoint.every_n_train_steps,
                save_top_k=-1 if cfg.checkpoint.keep_all else 1,
            )
        )
    world = world_size(cfg)
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=strategy_for(cfg, model, world),
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        max_epochs=cfg.max_epochs,
        max_steps=cfg.max_steps,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip_val,
        val_check_interval=cfg.eval_every_n_steps,
        check_val_every_n_epoch=None if cfg.eval_every_n_steps else 1,
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every_n_steps,
        enable_progress_bar=cfg.enable_progress_bar,
        enable_model_summary=cfg.enable_model_summary,
        enable_checkpointing=cfg.checkpoint.enabled,
        callbacks=callbacks,
        logger=[RunLogger(run, step_offset)] if run is not None else False,
        default_root_dir=str(out_dir),
        use_distributed_sampler=False,  # comalkit shards the batches itself, on every layout
        plugins=list(plugins) or None,
    )


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Hide Lightning's advice that does not apply here (pairs are tokenised in the main process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings(
            "ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*"
        )
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        _log_lightning_once()
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        rank_zero.addFilter(_no_tips)
        try:
            yield
        finally:
            rank_zero.removeFilter(_no_tips)


def _log_lightning_once() -> None:
    """Under a configured root logger (Hydra's console + run log), drop the console handler
    Lightning adds to its own logger, which would print every Lightning message twice."""
    if not logging.getLogger().hasHandlers():
        return  # plain Python use: Lightning's handler is the only output
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_logger.removeHandler(handler)


def _no_tips(record: logging.LogRecord) -> bool:
    """Drop Lightning's advertisement for its cloud logger."""
    return "litlogger" not in record.getMessage()


def fit(
    policy: Any,
    solver: SubgameSolver,
    train_records: Sequence[PreferenceRecord],
    trainer_cfg: Mapping[str, Any] | DictConfig | TrainerConfig | None,
    out_dir: str | Path,
    val_records: Sequence[PreferenceRecord] | None = None,
    run: RunContext | None = None,
    step_offset: int = 0,
    callbacks: Sequence[L.Callback] = (),
) -> dict[str, Any]:
    """Train ``policy`` in place on preference pairs with ``solver``'s loss; return the metrics.

    Records must already carry what the solver reads (:func:`precompute_logps`). With
    ``val_records``, held-out metrics (``eval_loss``, ``eval_rewards/accuracies``, ...) are
    measured before and after training. Metrics of every step go to ``run.log`` at step
    ``step_offset + optimizer step`` (the online loop offsets each iteration). ``callbacks``
    are extra Lightning callbacks (e.g. timers).

    Returns ``{"steps", "seconds", "train": last step's metrics, "eval_before", "eval_after"}``.
    """
    cfg = trainer_config(trainer_cfg)
    module = PreferenceModule(policy, solver, cfg)  # rejects game-only solvers
    check_records(train_records, solver, "training")
    if val_records:
        check_records(val_records, solver, "held-out")
    start = time.perf_counter()
    world = world_size(cfg)
    if world > 1 and not launched_externally():  # the main process: fan out, get the weights back
        result = spawn_fit(
            policy, solver, train_records, cfg, out_dir, val_records, run, step_offset, callbacks
        )
    elif world > 1:  # one rank of several that torchrun or SLURM started
        from comalkit.distributed import lead_followers

        lead_followers(policy, solver, train_records, cfg, out_dir, val_records, step_offset)
        result = fit_as_rank(
            policy,
            solver,
            train_records,
            cfg,
            out_dir,
            val_records,
            run,
            step_offset,
            callbacks,
            rank=current_rank(),
            world=world,
        )
        result.pop("_snapshot")
    else:
        train_loader = module.dataloader(train_records, train=True)
        val_loader = module.dataloader(val_records, train=False) if val_records else None
        trainer_args = (cfg, out_dir, run, step_offset, callbacks, policy.model)
        result = _fit_here(policy, module, trainer_args, train_loader, val_loader)
    result["seconds"] = time.perf_counter() - start
    return result


def fit_as_rank(
    policy: Any,
    solver: SubgameSolver,
    train_records: Sequence[PreferenceRecord],
    cfg: TrainerConfig,
    out_dir: str | Path,
    val_records: Sequence[PreferenceRecord] | None,
    run: Any,
    step_offset: int,
    callbacks: Sequence[L.Callback],
    rank: int,
    world: int,
    plugins: Sequence[Any] = (),
) -> dict[str, Any]:
    """:func:`fit` as rank ``rank`` of ``world`` processes; ``"_snapshot"`` holds the trained weights
    (gathered to every rank, so FSDP and DeepSpeed shards come back whole)."""
    module = PreferenceModule(policy, solver, cfg)
    module.shard = (rank, world)
    train_loader = module.dataloader(train_records, train=True)
    val_loader = module.dataloader(val_records, train=False) if val_records else None
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]  # before any wrapping
    trainer_args = (cfg, out_dir, run, step_offset, callbacks, policy.model, plugins)
    result = _fit_here(policy, module, trainer_args, train_loader, val_loader)
    state = result.pop("_trainer").strategy.lightning_module_state_dict()  # a collective under FSDP
    result["_snapshot"] = (
        {n: state[f"model.{n}"].detach().to("cpu", copy=True) for n in names} if state else {}
    )
    return result


def _fit_here(
    policy: Any,
    module: PreferenceModule,
    trainer_args: tuple[Any, ...],
    train_loader: DataLoader,
    val_loader: Any,
) -> dict[str, Any]:
    """The Lightning part of :func:`fit` in this process: validate, fit, validate."""
    cfg = module.cfg
    result: dict[str, Any] = {}
    was_training = policy.model.training
    try:
        with _quiet_lightning():
            trainer = build_trainer(*trainer_args)
            policy.model.train()  # models load in eval mode; Lightning keeps each submodule's mode
            if val_loader is not None:
                result["eval_before"] = _scalars(trainer.validate(module, val_loader, verbose=False)[0])
            trainer.fit(module, train_loader, val_loader if cfg.eval_every_n_steps else None)
            result["train"] = {
                k: v for k, v in _scalars(trainer.callback_metrics).items() if not k.startswith("eval_")
            }
            result["steps"] = int(trainer.global_step)
            check_finite_weights(policy.model, module)
            if cfg.on_nonfinite == "skip":
                result["skipped_batches"] = module.skipped_batches
            if val_loader is not None:
                result["eval_after"] = _scalars(trainer.validate(module, val_loader, verbose=False)[0])
                bad = {k: v for k, v in result["eval_after"].items() if not math.isfinite(v)}
                if bad:
                    raise NonFiniteError(
                        f"after training, held-out metrics are not finite: {bad}{module._hint()}"
                    )
    finally:
        policy.model.train(was_training)
    if module.shard is not None:
        result["_trainer"] = trainer
    return result


def check_finite_weights(model: torch.nn.Module, module: PreferenceModule | None = None) -> None:
    """Raise :class:`NonFiniteError` if a trainable weight is nan or inf, so it is never saved."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            where = module._where() if module is not None else "training"
            hint = module._hint() if module is not None else ""
            raise NonFiniteError(f"{where}: the trained weight {name} holds nan or inf{hint}")


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


__all__ = [
    "NonFiniteError",
    "TrainerConfig",
    "PreferenceModule",
    "RunLogger",
    "autocast",
    "build_trainer",
    "check_accelerator",
    "check_finite_weights",
    "check_records",
    "fit",
    "fit_as_rank",
    "lr_lambda",
    "precompute_logps",
    "required_keys",
    "trainer_config",
]
