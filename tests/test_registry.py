"""The registry: entry-point loading, schemas, allow-listed instantiation, range checks."""

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from comalkit.__main__ import load_plugins
from comalkit.registry import ConfigError, Registry, instantiate, param, registry, validate

REPO = Path(__file__).resolve().parent.parent


def test_builtins_registered_through_entry_point():
    load_plugins()
    assert "comalkit_plugins" in registry.loaded_entry_points
    for group in ("reference", "logger"):
        assert registry.names(group), group
    assert {"fixed", "prox", "magnet", "ema"} <= set(registry.names("reference"))


def test_unknown_name_lists_options_and_suggests():
    load_plugins()
    with pytest.raises(ConfigError) as err:
        registry.get("reference", "proxx")
    msg = str(err.value)
    assert "fixed" in msg and "ema" in msg and "Did you mean 'prox'" in msg


def test_schema_adds_target_and_keeps_defaults():
    load_plugins()
    schema = registry.schema("reference", "ema")
    node = OmegaConf.structured(schema)
    assert node._target_.endswith("EmaReference")
    assert node.alpha == 0.5
    with pytest.raises(Exception, match="alpha"):
        node.alpha = "abc"


def test_instantiate_refuses_unregistered_targets():
    load_plugins()
    with pytest.raises(ConfigError, match="not a registered comalkit plugin"):
        instantiate(OmegaConf.create({"_target_": "os.system", "command": "true"}))
    obj = instantiate(OmegaConf.structured(registry.schema("reference", "ema")))
    assert obj.alpha == 0.5


def test_range_metadata_is_checked():
    load_plugins()
    cfg = OmegaConf.create({"reference": OmegaConf.structured(registry.schema("reference", "ema"))})
    cfg.reference.alpha = 1.5
    with pytest.raises(ConfigError, match=r"reference.alpha=1.5: expected a value <= 1.0"):
        validate(cfg)


def test_duplicate_registration_is_an_error():
    reg = Registry()

    @reg.add("solver", "x")
    @dataclasses.dataclass
    class A:
        a: int = param(1)

    @dataclasses.dataclass
    class B:
        b: int = 2

    with pytest.raises(ConfigError, match="registered twice"):
        reg.add("solver", "x")(B)


def test_non_dataclass_plugin_rejected():
    reg = Registry()
    with pytest.raises(TypeError, match="dataclass"):
        reg.add("solver", "y")(type("NotADataclass", (), {}))


def test_third_party_package_registers_through_entry_point(tmp_path):
    """A package installed beside comalkit adds a solver option, listed by --help and selectable."""
    pkg = tmp_path / "thirdparty_comalkit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            '''
            from dataclasses import dataclass
            from comalkit.registry import param, plugin
            from comalkit.interfaces import ReferenceUpdater

            @plugin("reference", "every_other")
            @dataclass
            class EveryOther(ReferenceUpdater):
                """Moves the reference every second iteration."""
                offset: int = param(0, ge=0)

                def update(self, reference, policy, iteration):
                    return dict(policy) if iteration % 2 == self.offset else None
            '''
        )
    )
    dist = tmp_path / "thirdparty_comalkit-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-comalkit\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[comalkit.plugins]\nthirdparty = thirdparty_comalkit\n")
    env = {
        "PYTHONPATH": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
    }
    out = subprocess.run(
        [sys.executable, "-m", "comalkit", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "every_other" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "comalkit", "reference=every_other", "reference.offset=1", "--cfg", "job"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "EveryOther" in out.stdout and "offset: 1" in out.stdout
