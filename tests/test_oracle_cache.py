"""The SQLite judgment cache and the diagnostics wrapper around any oracle (comalkit/oracle_cache.py)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor

from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.oracle_cache import CachedOracle, JudgmentCache, judgment_key

HERE = Path(__file__).parent
#: A fresh process imports CountingOracle from this file.
PRELUDE = f"import sys; sys.path.insert(0, {str(HERE)!r}); from test_oracle_cache import CountingOracle\n"


class CountingOracle(PreferenceOracle):
    """P(a ≻ b) = (len(a) + 1) / (len(a) + len(b) + 2); counts the comparisons it is asked."""

    def __init__(self, tag: str = "v1") -> None:
        self.tag, self.calls, self.asked = tag, 0, 0

    def identity(self) -> str:
        return f"counting-{self.tag}"

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        self.calls += 1
        self.asked += len(comparisons)
        return torch.tensor(
            [(len(c.a) + 1) / (len(c.a) + len(c.b) + 2) for c in comparisons], dtype=torch.float64
        )


COMPARISONS = [Comparison("q", "a" * i, "b" * (5 - i)) for i in range(5)] + [Comparison("r", "yes", "no")]


def expected(comparisons: Sequence[Comparison]) -> Tensor:
    return CountingOracle().compare(comparisons)


def test_second_pass_is_answered_from_the_cache(tmp_path: Path) -> None:
    oracle = CountingOracle()
    cached = CachedOracle(oracle, tmp_path / "cache.sqlite")
    first = cached.compare(COMPARISONS)
    second = cached.compare(COMPARISONS)
    assert torch.equal(first, expected(COMPARISONS)) and torch.equal(second, first)
    assert oracle.asked == len(COMPARISONS) and oracle.calls == 1
    d = cached.diagnostics()
    assert d["requested"] == 2 * len(COMPARISONS) and d["cache_hits"] == len(COMPARISONS)
    assert d["judgments"] == len(COMPARISONS) and d["cache_hit_rate"] == 0.5
    assert d["failed"] == 0 and d["failed_fraction"] == 0.0 and d["judgments_per_s"] > 0
    cached.close()


def test_reruns_in_new_processes_judge_nothing_again_and_write_concurrently(tmp_path: Path) -> None:
    """Two fresh processes at once: neither re-judges what the first run stored; both then
    store overlapping new judgments into the same file without errors or duplicates."""
    path = tmp_path / "cache.sqlite"
    cached = CachedOracle(CountingOracle(), path)
    cached.compare(COMPARISONS)
    cached.close()
    script = PRELUDE + textwrap.dedent(f"""
        from comalkit.interfaces import Comparison
        from comalkit.oracle_cache import CachedOracle
        oracle = CountingOracle()
        cached = CachedOracle(oracle, {str(path)!r})
        comparisons = [Comparison("q", "a" * i, "b" * (5 - i)) for i in range(5)] + [Comparison("r", "yes", "no")]
        probs = cached.compare(comparisons)
        print(oracle.asked, cached.diagnostics()["cache_hits"], ",".join(f"{{p:.6f}}" for p in probs.tolist()))
        for chunk in range(20):
            cached.compare([Comparison("p", f"a{{chunk}}-{{i}}", "b") for i in range(25)])
    """)
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    for out in outputs:
        asked, hits, probs = out.split()
        assert asked == "0" and hits == str(len(COMPARISONS))
        assert probs == ",".join(f"{p:.6f}" for p in expected(COMPARISONS).tolist())
    cache = JudgmentCache(path)
    assert cache.count() == len(COMPARISONS) + 500
    cache.close()


def test_identity_is_part_of_the_key(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    CachedOracle(CountingOracle("v1"), path).compare(COMPARISONS)
    other = CountingOracle("v2")
    CachedOracle(other, path).compare(COMPARISONS)
    assert other.asked == len(COMPARISONS)  # a different oracle (or setting) never reuses judgments
    cache = JudgmentCache(path)
    assert cache.count() == 2 * len(COMPARISONS) and cache.count("counting-v1") == len(COMPARISONS)
    assert judgment_key("x", Comparison("p", "a", "b")) != judgment_key("x", Comparison("p", "b", "a"))
    cache.close()


def test_mixed_hits_duplicates_and_order(tmp_path: Path) -> None:
    oracle = CountingOracle()
    cached = CachedOracle(oracle, tmp_path / "cache.sqlite")
    cached.compare(COMPARISONS[:3])
    batch = [COMPARISONS[4], COMPARISONS[0], COMPARISONS[4], COMPARISONS[5], COMPARISONS[1]]
    assert torch.equal(cached.compare(batch), expected(batch))
    assert oracle.asked == 3 + 2  # the repeated comparison is judged once, the known ones not at all


def test_win_matrix_through_the_cache_is_valid(tmp_path: Path) -> None:
    cached = CachedOracle(CountingOracle(), tmp_path / "cache.sqlite")
    m = cached.win_matrix("q", ["a", "bb", "ccc", "dddd"])
    assert torch.allclose(m + m.T, torch.ones(4, 4, dtype=torch.float64))
    assert torch.all(m.diagonal() == 0.5)
    assert cached.diagnostics()["judgments"] == 6  # K(K-1)/2 unordered pairs


class FlakyOracle(PreferenceOracle):
    """Fails (0.5, flagged) on every comparison whose ``a`` contains 'x', as an HTTP judge may."""

    def __init__(self) -> None:
        self.asked = 0

    def identity(self) -> str:
        return "flaky"

    def compare_with_failures(self, comparisons: Sequence[Comparison]) -> tuple[Tensor, Tensor]:
        self.asked += len(comparisons)
        failed = torch.tensor(["x" in c.a for c in comparisons])
        return torch.where(
            failed, torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)
        ), failed

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        return self.compare_with_failures(comparisons)[0]


def test_failed_judgments_are_counted_and_never_cached(tmp_path: Path) -> None:
    oracle = FlakyOracle()
    cached = CachedOracle(oracle, tmp_path / "cache.sqlite")
    batch = [
        Comparison("q", "x1", "b"),
        Comparison("q", "ok", "b"),
        Comparison("q", "x2", "b"),
        Comparison("q", "y", "b"),
    ]
    assert cached.compare(batch).tolist() == [0.5, 0.9, 0.5, 0.9]
    assert cached.diagnostics()["failed"] == 2 and cached.diagnostics()["failed_fraction"] == 0.5
    cached.compare(batch)
    assert oracle.asked == 4 + 2  # only the two failures are asked again
    assert cached.cache.count() == 2


class BrokenOracle(CountingOracle):
    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        return torch.full((len(comparisons),), float("nan"))


def test_invalid_probabilities_are_rejected_not_stored(tmp_path: Path) -> None:
    cached = CachedOracle(BrokenOracle(), tmp_path / "cache.sqlite")
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        cached.compare(COMPARISONS)
    assert cached.cache.count() == 0


def test_without_a_path_it_only_keeps_diagnostics() -> None:
    oracle = CountingOracle()
    cached = CachedOracle(oracle, None)
    cached.compare(COMPARISONS)
    cached.compare(COMPARISONS)
    assert oracle.asked == 2 * len(COMPARISONS) and cached.diagnostics()["cache_hits"] == 0


def test_threads_and_a_second_connection_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    cached = CachedOracle(CountingOracle(), path)
    batches = [[Comparison(f"p{t}", "a" * i, "b") for i in range(20)] for t in range(8)]
    threads = [threading.Thread(target=cached.compare, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cached.diagnostics()["judgments"] == 160
    with sqlite3.connect(path) as db:  # another connection sees every row, in WAL mode
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM judgments").fetchone()[0] == 160
        assert db.execute("SELECT identity FROM oracles").fetchall() == [("counting-v1",)]
