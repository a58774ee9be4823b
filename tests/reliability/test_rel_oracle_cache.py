"""The judgment cache on a full or read-only disk: one ``OutputError`` naming the cache file.

sqlite rolls a transaction back by itself when the disk fills, and a second ROLLBACK used to
hide the real error behind "cannot rollback - no transaction is active" (docs/reliability.md).
"""

from __future__ import annotations

import subprocess

import pytest
from probe import assert_one_line

from comalkit.app import report
from comalkit.oracle_cache import JudgmentCache
from comalkit.outputs import OutputError


def many(n: int, start: int = 0) -> dict[str, float]:
    return {f"{i:064d}": 0.5 for i in range(start, start + n)}


def exit_and_stderr(exc: BaseException, capsys) -> tuple[int, str]:
    code = report(exc)
    return code, capsys.readouterr().err


def test_sqlite_full_names_the_cache_file(tmp_path, capsys):
    """No root needed: ``max_page_count`` makes sqlite's own SQLITE_FULL, as a full disk does."""
    path = tmp_path / "oracle_cache.sqlite"
    cache = JudgmentCache(path)
    cache.put_many("rule", many(10))
    pages = cache._db.execute("PRAGMA page_count").fetchone()[0]
    cache._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(OutputError) as info:
        cache.put_many("rule", many(5000, start=10))
    code, stderr = exit_and_stderr(info.value, capsys)
    assert code == 1
    assert_one_line(stderr, f"I/O error: cannot write {path}", "No space left on device")
    assert "no transaction is active" not in stderr
    assert cache.count() == 10, "the judgments stored before the full disk are kept"
    cache.close()


def test_full_tmpfs_while_the_cache_writes(tmpfs, capsys):
    point = tmpfs("256k")
    path = point / "oracle_cache.sqlite"
    cache = JudgmentCache(path)
    try:
        with open(point / "filler", "ab") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError:
        pass
    with pytest.raises(OutputError) as info:
        for start in range(0, 200_000, 2000):
            cache.put_many("rule", many(2000, start=start))
    code, stderr = exit_and_stderr(info.value, capsys)
    assert code == 1
    assert_one_line(stderr, f"cannot write {path}", "No space left on device")
    assert "no transaction is active" not in stderr
    cache.close()


def test_read_only_cache_directory(tmpfs, capsys):
    point = tmpfs("1m")
    JudgmentCache(point / "oracle_cache.sqlite").close()
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
    with pytest.raises(OutputError) as info:
        cache = JudgmentCache(point / "oracle_cache.sqlite")
        cache.put_many("rule", many(3))
    code, stderr = exit_and_stderr(info.value, capsys)
    assert code == 1
    assert_one_line(stderr, f"cannot write {point / 'oracle_cache.sqlite'}", "Read-only file system")
