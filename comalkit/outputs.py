"""Run outputs: atomic files, ``metrics.jsonl``, ``summary.json`` and the logger sinks.

Everything a run writes goes through :func:`atomic_write` (write to a temporary file in the
same directory, fsync, rename), so a kill never leaves a half-written file that is later read.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from comalkit.interfaces import RunContext

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def to_jsonable(value: Any) -> Any:
    """Tensors, numpy values and paths -> plain JSON; non-finite floats -> strings, never NaN literals."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, json.dumps(to_jsonable(data), indent=2) + "\n")


class MetricLogger(ABC):
    """An extra sink for metrics (the ``logger`` group); ``metrics.jsonl`` is always written."""

    @abstractmethod
    def start(self, out_dir: Path, config: dict[str, Any]) -> None: ...

    @abstractmethod
    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Flush and close; called once with the final summary."""


class Run(RunContext):
    """The :class:`RunContext` of one Hydra job: its directory, ``metrics.jsonl`` and loggers."""

    def __init__(self, out_dir: str | Path, loggers: list[MetricLogger] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.loggers = loggers or []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **to_jsonable(metrics)}
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        for logger in self.loggers:
            logger.log(metrics, step)

    def finish(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` last and atomically; close the loggers."""
        path = self.out_dir / "summary.json"
        write_json(path, summary)
        for logger in self.loggers:
            logger.finish(summary)
        return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file (a torn last line from a kill is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
