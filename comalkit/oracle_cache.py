"""A persistent judgment cache and a diagnostics wrapper around any :class:`PreferenceOracle`.

Judging is the expensive, and for an HTTP judge the paid, stage of an online iteration, so
no judgment is made twice: :class:`CachedOracle` answers from an SQLite file keyed by
``sha256(identity, prompt, a, b)`` and asks the wrapped oracle only for the rest. The
identity (:meth:`PreferenceOracle.identity`) names the oracle and every setting that changes
its answers, so changing a setting never returns stale judgments. Reruns and resumes of a
run (a new process, a new connection) find everything judged before.

The file may live in the run directory or in a shared directory (:func:`shared_cache_path`)
used by many runs and processes at once: SQLite's write-ahead log lets readers proceed
during a write, writers wait on each other (``busy_timeout``), and writes use
``INSERT OR IGNORE``, so two processes judging the same pair store it once.

Failed judgments are never cached, so a rerun asks again. An oracle whose judgments can fail
(the HTTP judge) reports which did through an optional method
``compare_with_failures(comparisons) -> (probs, failed)``; see :func:`compare_with_failures`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.outputs import OutputError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgments (
    key TEXT PRIMARY KEY, p REAL NOT NULL, oracle TEXT NOT NULL, created REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS oracles (oracle TEXT PRIMARY KEY, identity TEXT NOT NULL) WITHOUT ROWID;
"""
_CHUNK = 500  # keys per SELECT ... IN (...); SQLite allows at least 999 parameters
#: sqlite's messages for a write the file system refused, as the OSError the rest of comalkit raises
_WRITE_FAULTS = (
    ("disk is full", errno.ENOSPC, "No space left on device"),
    ("readonly", errno.EROFS, "Read-only file system"),
    ("disk i/o error", errno.EIO, "disk I/O error"),
    ("unable to open", errno.EACCES, "cannot open the file"),
)


def write_error(path: Path, exc: sqlite3.Error) -> OutputError | None:
    """The :class:`OutputError` naming ``path`` for a refused write, so a full or read-only disk
    reads like every other run file's (docs/reliability.md, "How errors are reported"); None for
    any other sqlite error."""
    text = str(exc).lower()
    for needle, code, reason in _WRITE_FAULTS:
        if needle in text:
            if code in (errno.EACCES, errno.EROFS):  # sqlite says "unable to open": find out why
                code, reason = _why_not_writable(path.parent) or (code, reason)
            return OutputError(path, OSError(code, f"{reason} (sqlite: {exc})"))
    return None


def _why_not_writable(directory: Path) -> tuple[int, str] | None:
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return errno.EROFS, "Read-only file system"
    except OSError:
        return None
    if not os.access(directory, os.W_OK):
        return errno.EACCES, "Permission denied"
    return None


def shared_cache_path() -> Path:
    """The judgment cache shared by every run of this user: ``<comalkit cache>/judgments.sqlite``."""
    from comalkit.lm.gguf import cache_dir

    return cache_dir() / "judgments.sqlite"


def identity_hash(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def judgment_key(identity: str, comparison: Comparison) -> str:
    """The cache key of one comparison under one oracle identity (order matters: ``a`` vs ``b``)."""
    payload = json.dumps([identity, comparison.prompt, comparison.a, comparison.b], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class JudgmentCache:
    """``key -> P(a ≻ b)`` in an SQLite file (WAL mode); safe to share between threads and processes."""

    def __init__(self, path: str | Path, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(self.path.parent, exc) from None
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise write_error(self.path, exc) or sqlite3.DatabaseError(
                f"judgment cache {self.path}: {exc}"
            ) from None

    def get_many(self, keys: Iterable[str]) -> dict[str, float]:
        keys = list(keys)
        found: dict[str, float] = {}
        with self._lock:
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(self._db.execute(f"SELECT key, p FROM judgments WHERE key IN ({marks})", chunk))
        return found

    def put_many(self, identity: str, items: dict[str, float]) -> None:
        if not items:
            return
        oracle = identity_hash(identity)
        now = time.time()
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("INSERT OR IGNORE INTO oracles VALUES (?, ?)", (oracle, identity))
                self._db.executemany(
                    "INSERT OR IGNORE INTO judgments VALUES (?, ?, ?, ?)",
                    [(key, p, oracle, now) for key, p in items.items()],
                )
                self._db.execute("COMMIT")
            except BaseException as exc:
                # sqlite rolls back by itself on SQLITE_FULL and some I/O errors; a second
                # ROLLBACK would replace the real error with "no transaction is active"
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    error = write_error(self.path, exc)
                    if error is not None:
                        raise error from None
                raise

    def count(self, identity: str | None = None) -> int:
        """Stored judgments, of one oracle identity or of all."""
        with self._lock:
            if identity is None:
                return self._db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0]
            query = "SELECT COUNT(*) FROM judgments WHERE oracle = ?"
            return self._db.execute(query, (identity_hash(identity),)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def compare_with_failures(
    oracle: PreferenceOracle, comparisons: Sequence[Comparison]
) -> tuple[Tensor, Tensor]:
    """``(probs, failed)``: the oracle's own failure report if it has one, else none failed."""
    method = getattr(oracle, "compare_with_failures", None)
    if method is not None:
        probs, failed = method(comparisons)
        return probs, failed.to(torch.bool)
    probs = oracle.compare(comparisons)
    return probs, torch.zeros(len(comparisons), dtype=torch.bool)


class CachedOracle(PreferenceOracle):
    """Wraps ``oracle``: answers from the cache at ``path`` first and keeps diagnostics.

    ``path=None`` keeps the diagnostics without caching (for benchmarks). Within one call, a
    comparison asked several times is judged once. :meth:`diagnostics` reports cache hits,
    new judgments, the failed fraction, throughput (new judgments per second of the wrapped
    oracle's time) and whatever the wrapped oracle reports itself (``diagnostics()``).
    """

    def __init__(self, oracle: PreferenceOracle, path: str | Path | None) -> None:
        self.oracle = oracle
        self.cache = JudgmentCache(path) if path is not None else None
        self._identity = oracle.identity()
        self._stats_lock = threading.Lock()
        self._stats = {"requested": 0, "hits": 0, "judged": 0, "failed": 0, "seconds": 0.0}

    def identity(self) -> str:
        return self._identity

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        keys = [judgment_key(self._identity, c) for c in comparisons]
        known = self.cache.get_many(set(keys)) if self.cache is not None else {}
        hits = sum(key in known for key in keys)
        todo: dict[str, Comparison] = {}
        for key, comparison in zip(keys, comparisons):
            if key not in known:
                todo.setdefault(key, comparison)
        failed_count, seconds = 0, 0.0
        if todo:
            start = time.perf_counter()
            probs, failed = compare_with_failures(self.oracle, list(todo.values()))
            seconds = time.perf_counter() - start
            fresh = dict(zip(todo, self._checked(probs, len(todo))))
            failed_count = int(failed.sum())
            if self.cache is not None:
                self.cache.put_many(
                    self._identity, {k: p for (k, p), f in zip(fresh.items(), failed.tolist()) if not f}
                )
            known.update(fresh)
        with self._stats_lock:
            s = self._stats
            s["requested"] += len(keys)
            s["hits"] += hits
            s["judged"] += len(todo)
            s["failed"] += failed_count
            s["seconds"] += seconds
        return torch.tensor([known[key] for key in keys], dtype=torch.float64)

    def _checked(self, probs: Tensor, expected: int) -> list[float]:
        values = [float(p) for p in torch.as_tensor(probs).reshape(-1)]
        if len(values) != expected:
            raise ValueError(
                f"oracle {self._identity} returned {len(values)} probabilities for {expected} comparisons"
            )
        bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
        if bad:
            raise ValueError(f"oracle {self._identity} returned values outside [0, 1]: {bad[:5]}")
        return values

    def diagnostics(self) -> dict[str, Any]:
        with self._stats_lock:
            s = dict(self._stats)
        out: dict[str, Any] = {
            "requested": s["requested"],
            "cache_hits": s["hits"],
            "cache_hit_rate": s["hits"] / s["requested"] if s["requested"] else 0.0,
            "judgments": s["judged"],
            "failed": s["failed"],
            "failed_fraction": s["failed"] / s["judged"] if s["judged"] else 0.0,
            "judge_seconds": s["seconds"],
            "judgments_per_s": s["judged"] / s["seconds"] if s["seconds"] > 0 else None,
        }
        inner = getattr(self.oracle, "diagnostics", None)
        if inner is not None:
            out.update({k: v for k, v in inner().items() if k not in out})
        return out

    def close(self) -> None:
        self.oracle.close()
        if self.cache is not None:
            self.cache.close()
