"""Metric sinks for the ``logger`` group. ``metrics.jsonl`` is written by the core in every case."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comalkit.interfaces import MetricLogger
from comalkit.outputs import to_jsonable
from comalkit.registry import param, plugin

log = logging.getLogger(__name__)


@plugin("logger", "jsonl")
@dataclass
class JsonlLogger(MetricLogger):
    """Only ``metrics.jsonl`` and ``summary.json`` in the run directory; no external service."""

    def start(self, out_dir: Path, config: dict[str, Any]) -> None:
        pass

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass


@plugin("logger", "wandb")
@dataclass
class WandbLogger(MetricLogger):
    """Weights & Biases, offline unless ``mode=online``: one wandb run per comalkit run.

    Metrics use ``iteration`` as their step axis; the jobs of one multirun share a group.
    A failure to start (no key, no network) is a warning, never a blocked or failed run.
    """

    project: str = param("comalkit", help="wandb project")
    mode: str = param("offline", choices=("offline", "online", "disabled"), help="offline needs no key")
    group: str | None = param(None, help="run group; default: the multirun's sweep directory")
    name: str | None = param(None, help="run name; default: the Hydra job's output directory name")
    tags: list[str] = param(default_factory=list, help="run tags")

    def __post_init__(self) -> None:
        self._run: Any = None

    def start(self, out_dir: Path, config: dict[str, Any]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        group, name = self.group, self.name or Path(out_dir).name
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if group is None and HydraConfig.initialized():  # outside a Hydra job there is no sweep
            hc = HydraConfig.get()
            if hc.mode == RunMode.MULTIRUN:
                group = Path(hc.sweep.dir).name
        try:
            import wandb

            self._run = wandb.init(
                project=self.project,
                mode=self.mode,
                dir=str(out_dir),
                group=group,
                name=name,
                tags=self.tags or None,
                config=config,
                reinit="finish_previous",
                settings=wandb.Settings(init_timeout=60, silent=True),
            )
            self._run.define_metric("iteration")
            self._run.define_metric("*", step_metric="iteration")
        except Exception as exc:
            # wandb must never stop a run: any failure to start (no key, no network, a broken
            # install) turns this sink off with a warning; metrics.jsonl still gets every row
            warnings.warn(f"wandb logging disabled: {exc}", stacklevel=2)
            self._run = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._run is not None:
            self._run.log({"iteration": step, **to_jsonable(metrics)})

    def finish(self, summary: dict[str, Any]) -> None:
        if self._run is None:
            return
        for key, value in to_jsonable(summary).items():
            if isinstance(value, (int, float, str)):
                self._run.summary[key] = value
        self._run.finish()
        self._run = None
