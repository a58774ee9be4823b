"""The registry: entry-point loading, schemas, allow-listed instantiation, range checks."""

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from comalkit.__main__ import load_plugins
from comalkit.registry import PLUGIN_GROUPS, ConfigError, Registry, instantiate, param, registry, validate

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


def install_fake_distribution(site: Path, dist: str, package: str, source: str) -> None:
    """Make ``site`` hold package ``package`` (one module, ``source``) and the dist-info of
    distribution ``dist`` declaring it as a ``comalkit.plugins`` entry point, as pip would."""
    pkg = site / package
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[comalkit.plugins]\n{package} = {package}\n")


def run_comalkit(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "comalkit", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


EVERY_OTHER = """
    from dataclasses import dataclass
    from comalkit.registry import param, plugin
    from comalkit.interfaces import ReferenceUpdater

    @plugin("reference", "every_other")
    @dataclass
    class EveryOther(ReferenceUpdater):
        \"\"\"Moves the reference every second iteration.\"\"\"
        offset: int = param(0, ge=0)

        def update(self, reference, policy, iteration):
            return dict(policy) if iteration % 2 == self.offset else None
"""


def test_third_party_package_registers_through_entry_point(tmp_path):
    """A package installed beside comalkit adds a solver option, listed by --help and selectable."""
    install_fake_distribution(tmp_path, "thirdparty-comalkit", "thirdparty_comalkit", EVERY_OTHER)
    out = run_comalkit(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    assert "every_other" in out.stdout
    out = run_comalkit(tmp_path, "reference=every_other", "reference.offset=1", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "EveryOther" in out.stdout and "offset: 1" in out.stdout


def test_package_that_fails_to_import_is_reported_and_skipped(tmp_path):
    """One warning names the distribution, its entry point and the error; other plugins still load."""
    install_fake_distribution(tmp_path, "thirdparty-comalkit", "thirdparty_comalkit", EVERY_OTHER)
    install_fake_distribution(tmp_path, "broken-comalkit", "broken_comalkit", "import no_such_module_xyz\n")
    out = run_comalkit(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "PluginLoadWarning" in line]
    assert len(warnings) == 1, out.stderr
    assert "'broken-comalkit'" in warnings[0] and "broken_comalkit = broken_comalkit" in warnings[0]
    assert "ModuleNotFoundError: No module named 'no_such_module_xyz'" in warnings[0]
    assert "every_other" in out.stdout and "inpo" in out.stdout  # the third-party and built-in plugins
    out = run_comalkit(tmp_path, "reference=every_other", "--cfg", "job")
    assert out.returncode == 0 and "EveryOther" in out.stdout, out.stderr


def test_package_with_a_duplicate_name_is_rolled_back(tmp_path):
    """A package that takes a built-in name contributes nothing (not even its other options);
    the built-in keeps its name and the warning says which two classes collided."""
    install_fake_distribution(
        tmp_path,
        "clash-comalkit",
        "clash_comalkit",
        """
        from dataclasses import dataclass
        from comalkit.registry import plugin
        from comalkit.interfaces import ReferenceUpdater

        @plugin("reference", "clash_only")
        @dataclass
        class ClashOnly(ReferenceUpdater):
            def update(self, reference, policy, iteration):
                return None

        @plugin("reference", "prox")
        @dataclass
        class NotProx(ReferenceUpdater):
            def update(self, reference, policy, iteration):
                return None
        """,
    )
    out = run_comalkit(tmp_path, "--help")
    assert out.returncode == 0, out.stderr
    warnings = [line for line in out.stderr.splitlines() if "PluginLoadWarning" in line]
    assert len(warnings) == 1, out.stderr
    assert "'clash-comalkit'" in warnings[0] and "reference=prox is registered twice" in warnings[0]
    assert "ProxReference" in warnings[0] and "NotProx" in warnings[0]
    assert "clash_only" not in out.stdout
    out = run_comalkit(tmp_path, "reference=prox", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "comalkit_plugins.references.updaters.ProxReference" in out.stdout


def test_failed_package_leaves_the_registry_as_it_was(tmp_path, monkeypatch):
    """In process: a callable entry point that registers a plugin and then raises is undone."""
    registry_module = sys.modules["comalkit.registry"]  # the package re-exports the name `registry`
    reg = Registry()
    site = tmp_path / "site"
    install_fake_distribution(
        site,
        "half-comalkit",
        "half_comalkit",
        """
        from dataclasses import dataclass

        def register(registry):
            @registry.add("reference", "half")
            @dataclass
            class Half:
                pass

            registry.allow_target("half_comalkit.Half")
            raise RuntimeError("second half missing")
        """,
    )
    info = next(site.glob("half_comalkit-*.dist-info"))
    (info / "entry_points.txt").write_text("[comalkit.plugins]\nhalf = half_comalkit:register\n")
    monkeypatch.syspath_prepend(str(site))
    from importlib.metadata import distributions

    eps = [ep for d in distributions(path=[str(site)]) for ep in d.entry_points]
    monkeypatch.setattr(registry_module, "entry_points", lambda group: eps)
    with pytest.warns(registry_module.PluginLoadWarning, match="'half-comalkit'.*RuntimeError: second half"):
        reg.load_entry_points()
    assert reg.names("reference") == [] and "half_comalkit.Half" not in reg.allowed_targets()
    assert "half_comalkit:register" in reg.failed_entry_points and not reg.loaded_entry_points


def test_configuration_reference_is_generated_from_the_schemas():
    """docs/configuration.md is what tools/config_reference.py writes from the registry today, and
    it names every built-in option of every group (run the tool after changing a plugin)."""
    proc = subprocess.run(
        [sys.executable, "tools/config_reference.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    page = (REPO / "docs" / "configuration.md").read_text()
    load_plugins()
    for group in PLUGIN_GROUPS:
        for name in registry.names(group):
            if registry.get(group, name).__module__.startswith(("comalkit.", "comalkit_plugins.")):
                assert f"### `{group}={name}`" in page, (group, name)
    ema = page[page.index("### `reference=ema`") :].split("###")[1]
    assert "| `alpha` | float | `0.5` | > 0.0, ≤ 1.0 | weight of the current policy |" in ema
