"""The Hydra application: compose ``conf/``, check everything, run the selected task, write the summary.

Before a task starts (and, on the command line, before Hydra writes into the run directory,
through :class:`Preflight`), :func:`preflight` validates the whole config, takes the run
directory's lock, removes what interrupted writes left, and compares the config's fingerprint
with the one stored by an earlier run in that directory. Errors end the process with one line
and an exit code (:func:`report`); docs/reliability.md lists them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from comalkit.env_keys import env_name_error, is_key_setting
from comalkit.outputs import (
    CorruptFileError,
    Run,
    RunLockedError,
    lock_run_dir,
    read_json,
    remove_stale_temporaries,
    to_jsonable,
    unlock_run_dir,
    write_json,
)
from comalkit.registry import ConfigError, instantiate, registry, validate

log = logging.getLogger("comalkit")
#: conf/ at the repository root (the project is installed editable, see the Makefile)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
#: set to 1 to see the traceback behind an error message
DEBUG_ENV = "COMALKIT_DEBUG"
FINGERPRINT_FILE = "fingerprint.json"
#: config keys (and subtrees) that do not change a run's results, so a resume may change them:
#: extra metric sinks, progress and log display, Lightning's own checkpoint files, device
#: placement, and the run length (iteration k never depends on how many follow it).
NOT_FINGERPRINTED = (
    "logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "trainer.checkpoint",
    "trainer.accelerator",
    "model.device",
    "task.iterations",
    "task.device",
    "task.plots",
)
#: exit codes: config or input errors, and signals (128 + the signal number)
EXIT_CONFIG = 2
EXIT_ERROR = 1
#: set once comalkit's own code runs in a command-line job (Hydra's composition errors come before)
JOB_STARTED = False


class FingerprintError(ConfigError):
    """The run directory holds results of a different configuration."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; a BaseException so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_name(override_dirname: str) -> str:
    """The run directory name for a command line: the same command maps to the same directory,
    so rerunning a killed command resumes it. ``default`` when there are no overrides."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", override_dirname).strip("_") or "default"
    if len(name) > 100:
        name = name[:80] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


# ---------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """Every check that needs no model and writes nothing (input files may be read): raise
    ConfigError or warn. It runs before the run directory exists."""
    validate(cfg)
    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig):
        from comalkit.training import check_accelerator, trainer_config

        check_accelerator(trainer_config(trainer))
    model = cfg.get("model")
    if isinstance(model, DictConfig):
        _check_model(model)
    task = cfg.get("task")
    if isinstance(task, DictConfig):
        _check_cuda("task.device", str(task.get("device") or "cpu"))
    _check_ignored(cfg)
    _check_key_settings(OmegaConf.to_container(cfg, resolve=False))
    if isinstance(task, DictConfig):  # the task's own checks, on the other groups' plugins
        instantiate(task).check(cfg)


def _check_model(model: DictConfig) -> None:
    length, prompt = model.get("max_length"), model.get("max_prompt_length")
    if isinstance(length, int) and isinstance(prompt, int) and prompt >= length:
        raise ConfigError(
            f"model.max_prompt_length={prompt} must be < model.max_length={length} (a response needs a token)"
        )
    _check_cuda("model.device", str(model.get("device") or "cpu"))
    # the plugin's own checks (e.g. model=hf needs an existing model.path), then those that need
    # the architecture (LoRA targets); no weights are loaded
    settings = instantiate(model)
    if hasattr(settings, "check"):
        settings.check()
    lora = model.get("lora")
    if isinstance(lora, DictConfig) and lora.get("enabled") is False:
        from comalkit.lm.lora import LoraSettings

        defaults = LoraSettings()
        changed = [k for k in lora if k != "enabled" and lora[k] != getattr(defaults, k, lora[k])]
        if changed:
            log.warning(
                "model.lora.%s set but model.lora.enabled=false (a full fine-tune): %s no effect",
                ", model.lora.".join(changed),
                "they have" if len(changed) > 1 else "it has",
            )


def _check_cuda(key: str, device: str) -> None:
    """A ``cuda`` device setting is refused on a machine without CUDA."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{key}={device} but no CUDA device is visible; use {key}=cpu or auto")


def _check_key_settings(node: Any, path: str = "") -> None:
    """A key pasted into a YAML file where a variable's name belongs is refused, unshown, before
    Hydra copies the config into ``.hydra/`` (the command line is checked in ``__main__``)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, str) and is_key_setting(where) and not value.startswith("${"):
            error = env_name_error(where, value)
            if error:
                raise ConfigError(error)
        _check_key_settings(value, where)


def _check_ignored(cfg: DictConfig) -> None:
    """Settings that another setting silently overrides: say so (or refuse)."""
    reference, solver = cfg.get("reference"), cfg.get("solver")
    strengths = reference.get("strengths") if isinstance(reference, DictConfig) else None
    if strengths and isinstance(solver, DictConfig) and "beta" in solver:
        log.warning(
            "reference.strengths=%s sets the solver's strength every round, overriding solver.beta=%s",
            list(strengths),
            solver.beta,
        )


def fingerprint(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved config as flat ``key: value`` pairs, without :data:`NOT_FINGERPRINTED`."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if any(prefix == k or prefix.startswith(k + ".") for k in NOT_FINGERPRINTED):
            return
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = to_jsonable(value)

    walk("", container)
    flat.pop("hydra", None)
    return flat


def check_fingerprint(cfg: DictConfig, out_dir: Path) -> None:
    """Refuse to continue a run directory whose results came from a different config; else store ours."""
    current = fingerprint(cfg)
    path = out_dir / FINGERPRINT_FILE
    fresh = f"to start fresh, run into a new directory (hydra.run.dir=...) or delete {out_dir}"
    stored = None
    if _has_results(out_dir):  # a directory without results (a failed start) takes any config
        if path.exists():
            stored = read_json(path, f"delete it to accept the current config, or {fresh}")
            stored = stored.get("config") if isinstance(stored, dict) else None
        elif (out_dir / ".hydra" / "config.yaml").is_file():  # a run from before fingerprints
            stored = fingerprint(OmegaConf.load(out_dir / ".hydra" / "config.yaml"))
    if stored is not None and stored != current:
        keys = sorted(set(stored) | set(current))
        changed = [k for k in keys if stored.get(k, "(absent)") != current.get(k, "(absent)")]
        shown = "; ".join(
            f"{k}: {_short(stored.get(k, '(absent)'))} -> {_short(current.get(k, '(absent)'))}"
            for k in changed[:8]
        )
        more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
        raise FingerprintError(
            f"{out_dir} holds results of a different config ({FINGERPRINT_FILE}): {shown}{more}. "
            f"Rerun the original command to resume it; {fresh}"
        )
    if stored is None:
        digest = hashlib.sha256(json.dumps(current, sort_keys=True).encode()).hexdigest()
        write_json(path, {"sha256": digest, "config": current})


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def _has_results(out_dir: Path) -> bool:
    names = (
        "summary.json",
        "state.json",
        "metrics.jsonl",
        "iterations",
        "checkpoint",
        "checkpoints",
        "previous",
    )
    return any((out_dir / name).exists() for name in names)


_PREPARED: set[Path] = set()


def preflight(cfg: DictConfig, out_dir: str | Path) -> None:
    """Check the config, then lock the run directory, clean it and check its fingerprint (idempotent).

    Nothing is written before :func:`check_config` passes; nothing is deleted before the lock is held.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir in _PREPARED:
        return
    check_config(cfg)
    lock_run_dir(out_dir)
    remove_stale_temporaries(out_dir)
    check_fingerprint(cfg, out_dir)
    _PREPARED.add(out_dir)


def release(out_dir: str | Path) -> None:
    out_dir = Path(out_dir).resolve()
    _PREPARED.discard(out_dir)
    unlock_run_dir(out_dir)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Turn the first SIGTERM/SIGINT into :class:`Interrupted`, so that an atomic write in progress
    is abandoned cleanly (its ``finally`` removes the temporary file); a second one acts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signums}

    def handler(signum: int, frame: Any) -> None:
        for s in signums:
            signal.signal(s, previous[s])
        raise Interrupted(signum)

    for s in signums:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in signums:
            signal.signal(s, previous[s])


# ---------------------------------------------------------------------------------------------
# Running a job
# ---------------------------------------------------------------------------------------------
def execute(cfg: DictConfig, out_dir: str | None = None) -> dict[str, Any]:
    """Run one job of the composed config and return its summary (also written to ``summary.json``)."""
    out_dir = out_dir or HydraConfig.get().runtime.output_dir
    with signals_interrupt():
        preflight(cfg, out_dir)
        try:
            loggers = [instantiate(cfg.logger)] if cfg.get("logger") is not None else []
            task = instantiate(cfg.task)
            run = Run(out_dir, loggers, fresh=not task.resumable)
            for logger in loggers:
                logger.start(Path(out_dir), OmegaConf.to_container(cfg, resolve=True))
            summary = task.run(cfg, run)
            path = run.finish(summary)
        finally:
            release(out_dir)
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


def report(exc: BaseException) -> int:
    """Print one line for ``exc`` on stderr (the traceback too with COMALKIT_DEBUG=1); return the exit code."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exception(exc)
    if isinstance(exc, Interrupted):
        name = exc.args[0]
        command = shlex.join(["python", "-m", "comalkit", *sys.argv[1:]])
        print(
            f"comalkit: stopped by {name}; no half-written file was kept. To resume, run the same command: {command}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + exc.signum
    error = config_error(exc)
    if error is not None:
        kind, code, exc = "config error", EXIT_CONFIG, error
    elif isinstance(exc, (RunLockedError, CorruptFileError)):
        kind, code = "error", EXIT_CONFIG
    elif isinstance(exc, OSError):  # an OutputError names the file; a plain one usually does too
        kind, code = "I/O error", EXIT_ERROR
    else:
        kind, code = f"error: {type(exc).__name__}", EXIT_ERROR
    message = " ".join(str(exc).split()) or type(exc).__name__
    if len(message) > 1000:
        message = message[:1000] + " ..."
    hint = (
        "" if os.environ.get(DEBUG_ENV) or code == EXIT_CONFIG else f" (set {DEBUG_ENV}=1 for the traceback)"
    )
    print(f"comalkit: {kind}: {message}{hint}", file=sys.stderr, flush=True)
    return code


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's overrides of a ``-m`` sweep, expanded as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def join_ranks(cfg: DictConfig) -> None:
    """Under torchrun or SLURM (several processes, each running this command): join the ranks.

    Rank 0 goes on to run the job as the only writing process. Every other rank leaves here:
    it takes no lock, writes nothing (not even ``.hydra/``, which Hydra writes after this
    callback), trains in each fit rank 0 starts, and exits with rank 0's exit code.
    """
    from comalkit.distributed import follow_rank_zero, is_writing_rank, join_launcher, launcher_world

    if launcher_world() == 1:
        return
    trainer = cfg.get("trainer")
    accelerator = str(trainer.get("accelerator", "cpu")) if isinstance(trainer, DictConfig) else "cpu"
    try:
        join_launcher(accelerator)
    except Exception as exc:
        sys.exit(report(exc))
    if is_writing_rank():
        return

    def build_policy() -> Any:
        registry.load_entry_points()
        return instantiate(cfg.model).build()

    try:
        code = follow_rank_zero(build_policy)
    except Exception as exc:
        code = report(exc)
    sys.exit(code)


def end_ranks(code: int) -> int:
    """Rank 0 of torchrun or SLURM: hand the job's exit code to the other ranks; return it."""
    from comalkit.distributed import finish_ranks

    finish_ranks(code)
    return code


class Preflight(Callback):
    """Hydra callback: :func:`preflight` before Hydra creates the run directory and writes ``.hydra/``,
    so a bad config or a directory holding another config's results is refused untouched. For a
    sweep (``-m``) with the basic sweeper, every job's config is checked before the first job's
    directory exists; each job still runs :func:`preflight` on its own directory."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from comalkit.distributed import launcher_world

        if launcher_world() > 1:
            sys.exit(
                report(
                    ConfigError(
                        f"a sweep (-m) under torchrun or SLURM ({launcher_world()} processes): each job would "
                        "run on every rank; start the sweep once and let hydra/launcher=slurm start each "
                        "job's ranks (docs/scaling.md)"
                    )
                )
            )
        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return  # another sweeper draws its jobs itself; each is checked when it starts
        from hydra import compose

        try:
            for job in sweep_jobs(list(config.hydra.overrides.task)):
                check_config(compose(config_name="config", overrides=job))
        except Exception as exc:
            sys.exit(report(exc))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global JOB_STARTED
        JOB_STARTED = True
        HydraConfig.instance().set_config(config)
        out_dir = Path(str(config.hydra.run.dir)).resolve()
        task_cfg = copy.deepcopy(config)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
        join_ranks(task_cfg)
        try:
            preflight(task_cfg, out_dir)
        except Exception as exc:
            sys.exit(end_ranks(report(exc)))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    registry.load_entry_points()  # a launcher's worker process (joblib, submitit) starts without them
    global JOB_STARTED
    JOB_STARTED = True
    try:
        summary = execute(cfg)
    except (Exception, Interrupted) as exc:
        sys.exit(end_ranks(report(exc)))
    end_ranks(0)
    objective = summary.get("objective")  # lets sweepers minimise one number
    return float(objective) if isinstance(objective, (int, float)) else None
