"""The runs of tests/test_kill_points.py, forked from a forkserver that imported this module once.

With ``COMALKIT_KILL_WORKER=1`` (set by the test before the forkserver starts) the import also
warms the server up: it imports what a run imports (Lightning, the model and LoRA modules),
loads the plugins, composes the config and draws one figure, so each forked run skips those
fixed costs. It runs no tensor operation, so no thread pool exists when the server forks. The
pytest process imports this module without the warm-up.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

TINY = [
    "model=tiny",
    "oracle=rule",
    "trainer=fast",
    "trainer.max_steps=2",
    "task.iterations=2",
    "task.samples_per_prompt=3",
    "task.max_new_tokens=8",
    "task.eval_prompts=2",
    "data.split_size=3",
    "reference.period=1",
    "reference.strengths=[0.5,0.1]",
]
CONFIG = None


#: the modules a run imports lazily (transformers and Lightning import most of theirs on first use)
MODULES = [
    "lightning.pytorch",
    "peft",
    "safetensors.torch",
    "transformers.models.llama.modeling_llama",
    "transformers.generation.utils",
    "comalkit.training",
    "comalkit.loop",
    "comalkit.evaluate",
    "comalkit.oracle_cache",
    "comalkit.lm.policy",
    "comalkit.lm.loading",
]


def _warm_up() -> None:
    global CONFIG
    import importlib

    import torch

    for name in MODULES:
        importlib.import_module(name)

    from comalkit.plots import plot_progress
    from comalkit.testing import compose

    torch.set_num_threads(1)
    CONFIG = compose([*TINY, "hydra.run.dir=unused"], with_hydra=True)  # loads the plugins too
    with tempfile.TemporaryDirectory() as tmp:
        plot_progress([{"iteration": 0, "loss": 1.0, "win_rate/initial": 0.5}], Path(tmp) / "warm.png")


if os.environ.get("COMALKIT_KILL_WORKER") == "1":
    _warm_up()


def job(out: str, fault: str | None, trace: str | None) -> None:
    """One run into ``out`` (as ``comalkit.testing.run_job`` would), its output to ``<out>.log``."""
    import torch
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from comalkit.app import execute
    from comalkit.testing import compose

    torch.set_num_threads(1)
    for name, value in (("COMALKIT_FAULT", fault), ("COMALKIT_FAULT_TRACE", trace)):
        os.environ.pop(name, None)
        if value:
            os.environ[name] = value
    fd = os.open(out + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    cfg = (
        copy.deepcopy(CONFIG)
        if CONFIG is not None
        else compose([*TINY, "hydra.run.dir=unused"], with_hydra=True)
    )
    with open_dict(cfg):
        cfg.hydra.run.dir = out
        cfg.hydra.runtime.output_dir = out
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    execute(cfg, out)
