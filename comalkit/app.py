"""The Hydra application: compose ``conf/``, validate, run the selected task, write the summary."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from comalkit.outputs import Run
from comalkit.registry import ConfigError, instantiate, validate

log = logging.getLogger("comalkit")
#: conf/ at the repository root (the project is installed editable, see the Makefile)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def run_name(override_dirname: str) -> str:
    """The run directory name for a command line: the same command maps to the same directory,
    so rerunning a killed command resumes it. ``default`` when there are no overrides."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", override_dirname).strip("_") or "default"
    if len(name) > 100:
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


def execute(cfg: DictConfig, out_dir: str | None = None) -> dict[str, Any]:
    """Run one job of the composed config and return its summary (also written to ``summary.json``)."""
    validate(cfg)
    out_dir = out_dir or HydraConfig.get().runtime.output_dir
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") is not None else []
    for logger in loggers:
        logger.start(out_dir, OmegaConf.to_container(cfg, resolve=True))
    task = instantiate(cfg.task)
    metrics_file = Path(out_dir) / "metrics.jsonl"
    if not task.resumable and metrics_file.exists():
        metrics_file.unlink()  # a rerun of a non-resumable task starts its metrics afresh
    run = Run(out_dir, loggers)
    summary = task.run(cfg, run)
    path = run.finish(summary)
    log.info("results: %s", os.path.abspath(path))
    print(f"comalkit: results in {os.path.abspath(out_dir)} (summary: {path.name})", flush=True)
    return summary


def config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc`` (Hydra wraps errors raised while instantiating), if any."""
    while exc is not None:
        if isinstance(exc, ConfigError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = execute(cfg)
    except Exception as exc:
        error = config_error(exc)
        if error is None:
            raise
        print(f"comalkit: config error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    objective = summary.get("objective")  # lets sweepers minimise one number
    return float(objective) if isinstance(objective, (int, float)) else None
