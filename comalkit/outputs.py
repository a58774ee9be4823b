"""Run outputs: atomic files, ``metrics.jsonl``, ``summary.json``, the run lock and the logger sinks.

Everything a run writes goes through :func:`atomic_write` (write to a temporary file in the
same directory, fsync, rename), so a kill never leaves a half-written file that is later read;
:func:`remove_stale_temporaries` deletes what a kill leaves of an unfinished one. The one
append-only file, ``metrics.jsonl``, is repaired on open (:func:`repair_metrics`). A failed
write raises :class:`OutputError`, which names the file. See docs/reliability.md.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from comalkit.interfaces import MetricLogger, RunContext

log = logging.getLogger("comalkit")


def _process_umask() -> int:
    """The process umask, read without changing it where the system allows.

    ``os.umask`` reads the mask only by setting a new one, and for that moment a file created by
    another thread (the judge server answers in threads) would get the wrong permissions. Linux
    reports the mask in ``/proc/self/status``. Without ``/proc`` (macOS) it is set and restored
    once, when this module is imported: comalkit imports it before it starts any thread, and the
    mask set meanwhile is the strict 0o077, never a looser one.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


#: the umask run files are created under (see :func:`_process_umask`)
_UMASK = _process_umask()

#: the lock file a running process holds in its run directory
LOCK_FILE = ".comalkit.lock"
#: temporary names of interrupted writes: ``.NAME.XXXX.tmp`` files (:func:`atomic_path`) and
#: ``.NAME.tmp-XXXX`` / ``.NAME.old-XXXX`` directories (checkpoint directories, GGUF conversion)
_STALE = re.compile(r"^\..+\.tmp$|^\..+\.(tmp|old)-[^/]+$")


class OutputError(OSError):
    """A run file could not be written (disk full, read-only directory, ...); the message names it."""

    def __init__(self, path: str | Path, cause: BaseException) -> None:
        text = str(cause).strip()
        reason = getattr(cause, "strerror", None) or (text.splitlines()[0] if text else type(cause).__name__)
        super().__init__(getattr(cause, "errno", None) or errno.EIO, f"cannot write {path}: {reason}")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror or ""


class CorruptFileError(ValueError):
    """A run file that should hold JSON does not parse; the message names it and how to recover."""


def is_io_error(exc: BaseException) -> bool:
    """An OSError, or a library error that wraps one (safetensors and torch report disk errors as text)."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    return any(
        marker in text
        for marker in (
            "No space left",
            "disk is full",
            "Read-only file system",
            "Permission denied",
            "os error",
            "file write failed",
        )
    )


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    An interrupted write (an exception, a signal turned into one) leaves ``path`` as it was
    and removes the temporary file; a kill leaves it to :func:`remove_stale_temporaries`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs get the usual permissions
    except OSError as exc:
        raise OutputError(path, exc) from None
    try:
        try:
            yield Path(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except Exception as exc:
            if is_io_error(exc) and not isinstance(exc, OutputError):
                raise OutputError(path, exc) from None
            raise
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


class Run(RunContext):
    """The :class:`RunContext` of one Hydra job: its directory, ``metrics.jsonl`` and loggers.

    ``fresh=True`` (a task that starts again on a rerun) moves the earlier attempt's
    ``metrics.jsonl`` and ``summary.json`` into ``previous/`` at its first write, so a rerun
    that fails before it writes anything leaves the earlier results whole, and one that fails
    later never leaves a summary beside metrics it does not describe.
    """

    def __init__(
        self, out_dir: str | Path, loggers: list[MetricLogger] | None = None, fresh: bool = False
    ) -> None:
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.loggers = loggers or []
        self._fresh = fresh
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(self.out_dir, exc) from None
        if not fresh:
            repair_metrics(self.metrics_path)

    def _start_writing(self) -> None:
        if not self._fresh:
            return
        self._fresh = False
        earlier = [p for p in (self.metrics_path, self.out_dir / "summary.json") if p.exists()]
        if not earlier:
            return
        previous = self.out_dir / "previous"
        try:
            previous.mkdir(exist_ok=True)
            for path in earlier:
                os.replace(path, previous / path.name)
        except OSError as exc:
            raise OutputError(previous, exc) from None
        log.info("the earlier attempt's %s moved to %s", ", ".join(p.name for p in earlier), previous)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._start_writing()
        record = {"step": step, **to_jsonable(metrics)}
        line = (json.dumps(record) + "\n").encode()
        try:  # one write(2) in append mode: a kill leaves a whole row or a torn last line, never a gap
            fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                written = os.write(fd, line)
                if written != len(line):
                    raise OSError(errno.ENOSPC, "short write (disk full?)")
            finally:
                os.close(fd)
        except OSError as exc:
            raise OutputError(self.metrics_path, exc) from None
        for logger in self.loggers:
            logger.log(metrics, step)

    def finish(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` last and atomically; close the loggers."""
        self._start_writing()
        path = self.out_dir / "summary.json"
        write_json(path, summary)
        for logger in self.loggers:
            logger.finish(summary)
        return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file (a torn line from a kill or a full disk is skipped)."""
    rows = []
    for line in Path(path).read_bytes().splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def repair_metrics(path: str | Path) -> int:
    """Drop torn rows from ``metrics.jsonl`` (a kill or a full disk mid-append); return how many.

    Without this, the next appended row would be glued to a torn last line and both lost.
    The file is rewritten atomically with its whole rows; the loop re-logs an iteration whose
    row is missing (its committed ``metrics.json`` holds it).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (a torn row)
    good, torn = [], 1 if tail.strip() else 0
    for line in complete:
        try:
            ok = isinstance(json.loads(line), dict)
        except (json.JSONDecodeError, UnicodeDecodeError):
            ok = False
        if ok:
            good.append(line)
        elif line.strip():
            torn += 1
    if torn:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"".join(line + b"\n" for line in good))
        log.warning("%s: dropped %d torn row(s) left by an interrupted write", path, torn)
    return torn


def read_json(path: str | Path, recover: str) -> Any:
    """Read a JSON run file; a file that does not parse raises :class:`CorruptFileError` naming
    it and ``recover`` (what to delete or rerun)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is corrupt ({exc}); {recover}") from None


# ---------------------------------------------------------------------------------------------
# The run directory: one process at a time, no leftovers of interrupted writes
# ---------------------------------------------------------------------------------------------
_LOCKS: dict[Path, IO[bytes]] = {}


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


def lock_run_dir(out_dir: str | Path) -> None:
    """Take the run directory's exclusive lock for the life of this process (idempotent).

    ``flock`` locks belong to the open file, so the kernel drops it when the process dies,
    however it dies: a killed run never leaves a stale lock behind.
    """
    from comalkit.distributed import current_rank, is_writing_rank

    if not is_writing_rank():  # under torchrun or SLURM only rank 0 writes (docs/scaling.md)
        raise RuntimeError(
            f"rank {current_rank()} of torchrun or SLURM tried to lock {out_dir}; only rank 0 runs the job"
        )
    out_dir = Path(out_dir).resolve()
    if out_dir in _LOCKS:
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / LOCK_FILE, "a+b", buffering=0)  # noqa: SIM115 - held until the process ends
    except OSError as exc:
        raise OutputError(out_dir / LOCK_FILE, exc) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().decode(errors="replace").strip() or "?"
        handle.close()
        raise RunLockedError(
            f"another comalkit process (pid {holder}) is running in {out_dir} (it holds {LOCK_FILE}); "
            "wait for it to finish, or run into another directory with hydra.run.dir=..."
        ) from None
    try:  # unbuffered: a full disk fails here, not later in close()
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n".encode())
    except OSError as exc:
        handle.close()
        raise OutputError(out_dir / LOCK_FILE, exc) from None
    _LOCKS[out_dir] = handle


def unlock_run_dir(out_dir: str | Path) -> None:
    """Release the lock taken by :func:`lock_run_dir` (the process may run another job after)."""
    handle = _LOCKS.pop(Path(out_dir).resolve(), None)
    if handle is not None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the temporary files and directories of writes a kill interrupted; call it under the lock."""
    removed = []
    for root, dirs, files in os.walk(out_dir):
        for name in [*files, *dirs]:
            if _STALE.match(name):
                path = Path(root) / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                    dirs.remove(name)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of interrupted writes in %s", len(removed), out_dir)
    return removed
