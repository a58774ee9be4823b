"""Lightning -> the run's outputs: every logged training step becomes a ``metrics.jsonl`` row."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from comalkit.interfaces import RunContext


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
