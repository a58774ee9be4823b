"""The optimizer and its learning-rate schedule, as the ``trainer`` group configures them."""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import OmegaConf

from comalkit.training.config import SchedulerConfig, TrainerConfig


def build_optimizer(cfg: TrainerConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``trainer.optimizer`` (a Hydra partial) called with ``params`` and ``lr=trainer.lr``.

    ``cfg`` comes from :func:`~comalkit.training.config.trainer_config`, which admits only the
    targets declared in :data:`~comalkit.training.config.OPTIMIZERS`; that list is the whole
    allowlist, so the plugin registry holds no optimizer entries.
    """
    from hydra.utils import instantiate

    return instantiate(OmegaConf.create(cfg.optimizer), _convert_="all")(params, lr=cfg.lr)


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
