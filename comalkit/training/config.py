"""The schema of the ``trainer`` config group, its defaults and its validation.

:class:`TrainerConfig`'s fields are the one source of every trainer default: the registry stores
them in Hydra's ConfigStore (:meth:`comalkit.registry.Registry.store`), ``trainer=default`` is
them, and the other ``conf/trainer/*.yaml`` state only how they differ (unknown keys are errors).
The field limits are checked by :func:`comalkit.registry.validate` when the config is composed;
:func:`trainer_config` adds the checks that involve two fields (docs/training.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from comalkit.distributed import START_METHODS, check_layout
from comalkit.registry import ConfigError, param

#: optimizers a ``trainer.optimizer._target_`` may name (built as partials over the trainable
#: parameters by :func:`comalkit.training.optim.build_optimizer`)
OPTIMIZERS = ("torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
#: Lightning accelerators comalkit runs on (TPUs would need torch_xla and were never tried)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
#: what a non-finite training loss or gradient does
NONFINITE_MODES = ("error", "skip")


@dataclass
class SchedulerConfig:
    """Learning-rate schedule: linear warm-up, then constant, linear decay to 0, or cosine to 0."""

    name: str = param(
        "linear", choices=SCHEDULES, help="constant | linear | cosine (decay to 0 after warm-up)"
    )
    warmup_steps: int = param(0, ge=0, help="warm-up optimizer steps; > 0 wins over warmup_ratio")
    warmup_ratio: float = param(0.1, ge=0.0, lt=1.0, help="warm-up as a share of all optimizer steps")


@dataclass
class CheckpointConfig:
    """Lightning checkpoints (trainable weights + optimizer state) under ``<out_dir>/<dirname>``."""

    enabled: bool = param(False, help="write Lightning checkpoints")
    every_n_train_steps: int | None = param(None, ge=1, help="null: at the end of every epoch")
    keep_all: bool = param(False, help="false: only the latest (plus a last.ckpt link)")
    dirname: str = param("checkpoints", help="directory inside the output directory")


@dataclass
class TrainerConfig:
    """Everything :func:`fit` reads, with the defaults of ``trainer=default`` (CPU-friendly: one
    device, bf16 autocast, LoRA's learning rate); ``conf/trainer/*.yaml`` override some of them.

    A caller that passes a partial mapping to :func:`trainer_config` gets these defaults for the
    rest. The field limits are checked by :func:`comalkit.registry.validate` when the config is
    composed; :func:`trainer_config` adds the checks that involve two fields.
    """

    accelerator: str = param("auto", choices=ACCELERATORS, help="where training runs")
    devices: Any = param(1, help="devices per node: a count >= 1, -1 (all), 'auto', or a list of ids")
    strategy: str = param("auto", help="Lightning strategy (auto, ddp, ...)")
    num_nodes: int = param(1, ge=1, help="machines")
    start_method: str = param(
        "auto",
        choices=START_METHODS,
        help="how comalkit starts the ranks on one node: auto (fork for CPU ranks, else spawn) | spawn | fork",
    )
    precision: str = param(
        "bf16-mixed",
        choices=PRECISIONS,
        help="Lightning precision: 32-true | bf16-mixed (autocast, CPU and GPU) | bf16-true | 16-mixed",
    )
    max_epochs: int = param(
        2, help="passes over each iteration's pairs: >= 1, or -1 with max_steps > 0 (offline: 1)"
    )
    max_steps: int = param(-1, help="-1: no limit beyond max_epochs; else > 0")
    batch_size: int = param(
        4, ge=1, help="preference pairs per micro-batch over all devices (2x sequences; docs/scaling.md)"
    )
    eval_batch_size: int = param(8, ge=1, help="pairs per held-out batch over all devices")
    accumulate_grad_batches: int = param(1, ge=1, help="micro-batches per optimizer step")
    gradient_clip_val: float | None = param(1.0, gt=0.0, help="gradient-norm clip; null: none")
    lr: float = param(
        2.0e-4,
        gt=0.0,
        help="peak learning rate; LoRA: 2e-4 (docs/online.md: 5e-5 barely moved the policy), full fine-tune: ~5e-7",
    )
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
    shuffle: bool = param(True, help="shuffle the training pairs every epoch")
    seed: int = param(0, help="data order (trainer=default sets it to the run's seed)")


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
