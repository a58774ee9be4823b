"""``fit``: train a policy on preference pairs under a real ``lightning.Trainer``, here or on several ranks.

:func:`fit` builds the ``lightning.Trainer`` from the ``trainer`` config group (:func:`build_trainer`)
and forwards every logged step to the run's ``metrics.jsonl``. With several devices it fans out
(:mod:`comalkit.distributed`) and gets the trained weights back (docs/scaling.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from comalkit.distributed import current_rank, launched_externally, spawn_fit, strategy_for, world_size
from comalkit.interfaces import RunContext, SubgameSolver
from comalkit.preference_data import PreferenceRecord
from comalkit.training.config import TrainerConfig, trainer_config
from comalkit.training.logger import RunLogger
from comalkit.training.module import NonFiniteError, PreferenceModule, check_finite_weights
from comalkit.training.precompute import check_records
from comalkit.training.quiet import quiet_lightning


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

    Records must already carry what the solver reads (:func:`~comalkit.training.precompute.precompute_logps`). With
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
        with quiet_lightning():
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


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
