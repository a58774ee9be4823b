"""comalkit.outputs reads the process umask without changing it (issue 11, global state)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from comalkit import outputs


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the mask from /proc (Linux)")
def test_the_umask_is_read_without_setting_it(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0o022)
    assert outputs._process_umask() == outputs._UMASK
    assert calls == []


def test_atomic_writes_from_several_threads_get_the_permissions_the_umask_allows(tmp_path):
    def write(i: int) -> None:
        outputs.atomic_write(tmp_path / f"f{i}.txt", "x")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert stat.S_IMODE((tmp_path / f"f{i}.txt").stat().st_mode) == 0o666 & ~outputs._UMASK
