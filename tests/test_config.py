"""Composition of the real conf/: every option composes, bad overrides fail clearly, CLI behaviour."""

import json
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from run_overrides import cli

from comalkit.__main__ import check_group_overrides, group_options, load_plugins
from comalkit.app import CONF_DIR, run_name
from comalkit.registry import PLUGIN_GROUPS, ConfigError, validate
from comalkit.testing import compose

REPO = Path(__file__).resolve().parent.parent
GROUPS = sorted({p.name for p in CONF_DIR.iterdir() if p.is_dir()} | set(PLUGIN_GROUPS))


def all_options():
    load_plugins()
    return [(g, o) for g in GROUPS for o in group_options(g)]


#: options with a value the user must give: they compose, and validation names the missing key
NEEDS_A_VALUE = {("data", "prompts"): "data.path has no value"}


@pytest.mark.parametrize(("group", "option"), all_options())
def test_every_option_composes_and_validates(group, option):
    cfg = compose([f"{group}={option}"])
    if (group, option) in NEEDS_A_VALUE:
        with pytest.raises(ConfigError, match=NEEDS_A_VALUE[group, option]):
            validate(cfg)
    else:
        validate(cfg)
    assert cfg.get(group) is not None or group == "experiment"


def test_default_config_composes():
    cfg = compose()
    validate(cfg)
    for group in ("task", "model", "solver", "oracle", "reference", "data", "pairs", "trainer", "logger"):
        assert group in cfg, group
    assert cfg.reference._target_.endswith("ProxReference")  # COMAL by default


def test_wrong_type_fails_at_composition_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["reference=ema", "reference.alpha=abc"])
    assert "reference.alpha" in str(err.value.__cause__ or err.value) or "alpha" in str(err.value)


def test_out_of_range_fails_naming_the_key():
    cfg = compose(["reference=ema", "reference.alpha=-1"])
    with pytest.raises(ConfigError, match=r"reference\.alpha=-1"):
        validate(cfg)


def test_unknown_key_fails():
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose(["reference.no_such_key=1"])


def test_unknown_option_is_caught_before_hydra_with_suggestion():
    load_plugins()
    msg = check_group_overrides(["reference=proxx"])
    assert msg and "Available reference options" in msg and "fixed" in msg and "Did you mean 'prox'" in msg
    assert check_group_overrides(["reference=prox,fixed", "solver.beta=0.1", "+x=1"]) is None
    assert "nonexistent" in check_group_overrides(["reference=prox,nonexistent"])


def test_run_name_is_stable_and_safe():
    assert run_name("") == "default"
    assert run_name("solver=ipo,oracle=llm_judge") == "solver=ipo,oracle=llm_judge"
    assert "/" not in run_name("data.path=/tmp/x/pairs.jsonl")
    assert len(run_name("x=" + "a" * 300)) <= 100


def _cli(*args, cwd=REPO):
    """The command line with a longer timeout: ``--help`` loads every plugin on a busy machine."""
    return cli(*args, cwd=cwd, timeout=600)


def test_cli_help_lists_every_group_and_option():
    out = _cli("--help")
    assert out.returncode == 0, out.stderr
    for group, option in all_options():
        assert group in out.stdout and option in out.stdout, (group, option)


def test_cli_unknown_solver_exits_nonzero_naming_the_available_ones():
    out = _cli("solver=nonexistent")
    assert out.returncode != 0
    assert "unknown solver 'nonexistent'" in out.stderr
    for name in group_options("solver"):
        assert name in out.stderr


def test_cli_out_of_range_value_exits_with_a_clear_message(tmp_path):
    out = _cli("experiment=synthetic", "reference=ema", "reference.alpha=2", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2, out.stderr
    assert "reference.alpha=2" in out.stderr and "<= 1.0" in out.stderr


def test_multirun_writes_one_directory_per_job(tmp_path):
    out = _cli(
        "-m", "experiment=synthetic", "solver=inpo,ipo", "task.iterations=20", f"hydra.sweep.dir={tmp_path}"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 2
    for path in summaries:
        summary = json.loads(path.read_text())
        assert summary["iterations"] == 20
        assert (path.parent / "metrics.jsonl").exists()
        assert OmegaConf.load(path.parent / ".hydra" / "config.yaml").task is not None
