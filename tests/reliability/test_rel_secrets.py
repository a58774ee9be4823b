"""A key pasted where the name of its environment variable belongs is never echoed (docs/reliability.md).

``python -m comalkit`` checks key settings on the command line before Hydra names the run
directory after the overrides or writes ``.hydra/*.yaml`` (:mod:`comalkit.env_keys`).
"""

from __future__ import annotations

import pytest
from probe import cli


def parts(secret: str, size: int = 6) -> set[str]:
    return {secret[i : i + size] for i in range(len(secret) - size + 1)}


@pytest.mark.parametrize("sweep", [False, True])
def test_pasted_key_is_in_no_file_and_not_on_stderr(tmp_path, sweep):
    secret = "sk-proj-Zq7WJr2mX9vB4nK8pL1sT6yH3dF0aE5c"
    value = f"COMALKIT_UNSET_NAME,{secret}" if sweep else secret
    args = ["-m"] if sweep else []
    out = cli(*args, "oracle=http_judge", f"oracle.api_key_env={value}", cwd=tmp_path)
    assert out.returncode == 2
    assert "not shown" in out.stderr
    text = out.stdout + out.stderr
    assert not [p for p in parts(secret) if p in text]
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert not written, written
    assert not [path for path in tmp_path.rglob("*") if any(p in path.name for p in parts(secret))]


def test_key_pasted_into_a_config_file_is_refused_before_hydra_copies_it(tmp_path):
    secret = "sk-proj-Zq7WJr2mX9vB4nK8pL1sT6yH3dF0aE5c"
    config_dir = tmp_path / "cfg"
    config_dir.mkdir()
    (config_dir / "mine.yaml").write_text(
        "defaults:\n  - config\n  - override oracle: http_judge\n  - _self_\n"
        f"oracle:\n  api_key_env: {secret}\n"
    )
    run_dir = tmp_path / "run"
    out = cli(
        "--config-dir", str(config_dir), "--config-name", "mine", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert out.returncode == 2, out.stderr
    assert "not shown" in out.stderr
    assert not [p for p in parts(secret) if p in out.stdout + out.stderr]
    assert not run_dir.exists()  # no .hydra/config.yaml holding the key
