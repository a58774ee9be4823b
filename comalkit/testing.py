"""Helpers to compose and run comalkit configs in tests, for comalkit and for plugin authors.

``compose`` returns the same config ``python -m comalkit`` would build (plugins loaded, the
ConfigStore filled); ``run_job`` executes it into a chosen directory, as a Hydra job would.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from comalkit.__main__ import load_plugins
from comalkit.app import CONF_DIR


def compose(overrides: Sequence[str] = (), *, with_hydra: bool = False) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides``; keep the ``hydra`` node only if asked."""
    load_plugins()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="comalkit"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    if not with_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def run_job(overrides: Sequence[str], out_dir: str | Path) -> dict[str, Any]:
    """Compose and execute one job writing into ``out_dir``; return its summary."""
    from comalkit.app import execute

    out_dir = Path(out_dir)
    cfg = compose([*overrides, f"hydra.run.dir={out_dir}"], with_hydra=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return execute(cfg, str(out_dir))
