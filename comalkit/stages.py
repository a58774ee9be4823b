"""One stage primitive: a stage's outputs appear together, or not at all.

Every stage of an online iteration (sample, judge, pair, logps, train, evaluate, reference)
runs through :func:`run_stage`. It computes, writes every output file into a temporary
directory ``<parent>/.<stage>.tmp-XXXX/`` with a manifest ``stage.json`` written last, and
commits the stage with one ``os.replace`` of that directory to ``<parent>/<stage>/``. A stage
is done exactly when its directory exists; then it is read back and never rewritten. A kill
anywhere before the rename leaves only a temporary directory, which the next run removes
(:func:`remove_leftovers`) before it redoes the stage. Both the fresh and the resumed path
return what :meth:`Stage.load` reads from the committed directory, so a resumed run computes
with exactly the values an uninterrupted one did. See docs/online.md for the run layout.

Fault injection (for the kill tests, tests/test_kill_points.py): ``COMALKIT_FAULT`` names a
point, ``<stage>:<point>`` or ``<stage>:<point>@<iteration>`` with points ``before-write``,
``after-write:<file>``, ``before-commit`` and ``after-commit``; the process sends itself
SIGKILL exactly there. ``COMALKIT_FAULT_TRACE=<file>`` appends every point reached, one a line.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from comalkit.interfaces import Snapshot
from comalkit.outputs import CorruptFileError, to_jsonable

FAULT_ENV = "COMALKIT_FAULT"
TRACE_ENV = "COMALKIT_FAULT_TRACE"
MANIFEST = "stage.json"
#: the infix of every temporary name a stage, a checkpoint or an atomic file write uses
TMP_MARK = ".tmp"

T = TypeVar("T")


class NonFiniteError(RuntimeError):
    """A value that would be committed is NaN or infinite."""


class StageFailure(RuntimeError):
    """A stage finished with a result that must not be kept (failed judgments); a rerun retries it."""


# ---------------------------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------------------------
def fault_point(stage: str, point: str, iteration: int | str | None = None) -> None:
    """Kill this process with SIGKILL if ``COMALKIT_FAULT`` names this point (see the module doc)."""
    name = f"{stage}:{point}@{'-' if iteration is None else iteration}"
    trace = os.environ.get(TRACE_ENV)
    if trace:
        with open(trace, "a") as fh:
            fh.write(name + "\n")
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    wanted, _, at = spec.partition("@")
    if wanted == f"{stage}:{point}" and (not at or at == name.rsplit("@", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# Writing and reading a stage directory
# ---------------------------------------------------------------------------------------------
class StageWriter:
    """Writes the files of one uncommitted stage; each write is a fault point."""

    def __init__(self, directory: Path, stage: str, iteration: int | str | None) -> None:
        self.dir, self.stage, self.iteration = directory, stage, iteration
        self.files: list[str] = []

    def _written(self, name: str) -> None:
        self.files.append(name)
        fault_point(self.stage, f"after-write:{name}", self.iteration)

    def json(self, name: str, value: Any) -> None:
        _write_synced(self.dir / name, (json.dumps(to_jsonable(value), indent=1) + "\n").encode())
        self._written(name)

    def tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        _write_synced(self.dir / name, data)
        self._written(name)


class StageReader:
    """Reads the files of one committed stage (safetensors and JSON only: nothing is unpickled)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        try:
            self.manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptFileError(
                f"{directory}: the stage's manifest {MANIFEST} is missing or unreadable ({exc}); "
                f"delete {directory} to redo the stage"
            ) from exc

    def json(self, name: str) -> Any:
        try:
            return json.loads((self.dir / name).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CorruptFileError(
                f"{self.dir / name}: unreadable stage file ({exc}); delete {self.dir}"
            ) from exc

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(str(self.dir / name))
        except Exception as exc:  # safetensors raises its own error types; name the file
            raise CorruptFileError(
                f"{self.dir / name}: unreadable stage file ({exc}); delete {self.dir}"
            ) from exc

    @property
    def seconds(self) -> float:
        return float(self.manifest.get("seconds", 0.0))


@dataclass(frozen=True)
class Stage(Generic[T]):
    """A named stage: how its value is written into a directory and read back."""

    name: str
    save: Callable[[T, StageWriter], None]
    load: Callable[[StageReader], T]


@dataclass
class StageResult(Generic[T]):
    """A stage's value (always read from the committed directory) and the seconds it took to compute."""

    value: T
    seconds: float
    reused: bool
    path: Path


def run_stage(
    parent: Path,
    stage: Stage[T],
    compute: Callable[[Path], T],
    *,
    iteration: int | str | None = None,
) -> StageResult[T]:
    """Reuse ``parent/<stage.name>`` if committed; else compute, write and commit it in one rename.

    ``compute(scratch)`` may leave scratch files (a trainer's logs) in ``scratch``, which is
    committed with the stage. An exception from ``compute`` or ``save`` removes the temporary
    directory and propagates: nothing is committed. The returned seconds are the compute time
    of the run that committed the stage (kept in its manifest).
    """
    final = parent / stage.name
    if final.is_dir():
        reader = StageReader(final)
        return StageResult(stage.load(reader), reader.seconds, True, final)
    parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(parent, prefix=f".{stage.name}{TMP_MARK}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{stage.name}{TMP_MARK}-", dir=parent))
    try:
        began = time.perf_counter()
        value = compute(tmp / "scratch")
        seconds = time.perf_counter() - began
        fault_point(stage.name, "before-write", iteration)
        writer = StageWriter(tmp, stage.name, iteration)
        stage.save(value, writer)
        manifest = {"stage": stage.name, "iteration": iteration, "seconds": seconds, "files": writer.files}
        _write_synced(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories; a run directory is readable like others
        _fsync_dir(tmp)
        fault_point(stage.name, "before-commit", iteration)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    fault_point(stage.name, "after-commit", iteration)
    reader = StageReader(final)
    return StageResult(stage.load(reader), seconds, False, final)


def remove_leftovers(directory: Path, prefix: str = ".") -> list[Path]:
    """Delete temporary files and directories of interrupted writes (``.<name>.tmp…``) in ``directory``."""
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        if path.name.startswith(prefix) and TMP_MARK in path.name:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_leftovers_below(root: Path, subdirs: Iterable[str]) -> list[Path]:
    """:func:`remove_leftovers` in ``root/<subdir>`` and each directory directly below it."""
    removed = []
    for sub in subdirs:
        top = root / sub
        if not top.is_dir():
            continue
        removed += remove_leftovers(top)
        for child in top.iterdir():
            if child.is_dir() and not child.name.startswith("."):
                removed += remove_leftovers(child)
    return removed


# ---------------------------------------------------------------------------------------------
# Checks before a commit
# ---------------------------------------------------------------------------------------------
def check_finite_snapshot(snapshot: Snapshot, what: str) -> None:
    """Raise :class:`NonFiniteError` naming the first tensor of ``snapshot`` with a NaN or inf."""
    for name, tensor in snapshot.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(
                f"{what}: {bad} non-finite value(s) in {name}; nothing was saved. Lower trainer.lr "
                "or use trainer.precision=32-true, then rerun the same command"
            )


def check_finite_numbers(values: dict[str, Any], what: str) -> None:
    """Raise :class:`NonFiniteError` if any float in ``values`` is NaN or infinite."""
    bad = {k: v for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NonFiniteError(f"{what}: non-finite {bad}; nothing was saved")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
