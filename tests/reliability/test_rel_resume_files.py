"""Corrupt run files read back on resume exit 2 (a bad input), naming the file and the way out.

docs/reliability.md ("How errors are reported"): a run file that does not parse is the user's
input, like a bad config value, so it is a ``CorruptFileError`` and not a crash (exit 1).
"""

from __future__ import annotations

from probe import TINY_ONLINE, assert_one_line, failure

from comalkit.stages import MANIFEST
from comalkit.testing import run_job


def test_corrupt_state_and_stage_manifest_exit_2(tmp_path):
    out = tmp_path / "run"
    run_job(TINY_ONLINE, out)
    state = out / "state.json"
    good = state.read_text()
    state.write_text('{"completed": ')
    code, stderr = failure(TINY_ONLINE, out)
    assert code == 2, stderr
    assert_one_line(stderr, "state.json", "delete the run directory")

    state.write_text(good.replace('"completed": 0', '"completed": -1'))
    manifests = sorted((out / "iterations").rglob(MANIFEST))
    assert manifests, "the online run committed no stage"
    manifests[0].write_text("{not json")
    code, stderr = failure(TINY_ONLINE, out)
    assert code == 2, stderr
    assert_one_line(stderr, str(manifests[0].parent), "to redo the stage")
