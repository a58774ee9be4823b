"""Task ``online``: the COMAL meta-loop on a language model (``python -m comalkit``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from comalkit.interfaces import RunContext, Task, require_language_model_solver
from comalkit.registry import current_choice, instantiate, param, plugin

from ..solvers.inpo import warn_if_iterated_ipo

log = logging.getLogger("comalkit")


@plugin("task", "online")
@dataclass
class OnlineTask(Task):
    """Online iterations: sample from the policy, judge, build pairs, fit the solver, move the reference.

    COMAL is ``solver=inpo reference=prox`` (the default: 2 rounds of 2 iterations); iterated IPO
    is ``solver=iter_ipo`` (or INPO with ``reference.period=1``, which warns); INPO is
    ``reference=fixed``. The run resumes from its directory when rerun (see comalkit/loop.py).
    """

    resumable = True

    iterations: int = param(
        4, ge=1, help="inner iterations in total (rounds = iterations / reference.period)"
    )
    samples_per_prompt: int = param(4, ge=2, help="responses sampled per prompt (the paper: 5)")
    temperature: float = param(0.8, gt=0.0, help="sampling temperature (the paper: 0.8)")
    top_p: float = param(0.95, gt=0.0, le=1.0, help="nucleus sampling (the paper: 0.95)")
    max_new_tokens: int = param(32, ge=1, help="response length limit")
    eval_prompts: int = param(8, ge=0, help="held-out prompts for per-iteration win rates (0: skip)")

    def check(self, cfg: DictConfig) -> None:
        self._checked_components(cfg)
        instantiate(cfg.oracle)  # its settings only: a judge model loads on first use

    def _checked_components(self, cfg: DictConfig) -> tuple[Any, Any, Any, Any]:
        """The solver, pair builder, prompts and reference updater, checked against each other."""
        from comalkit.pairing import check_compatible

        solver = instantiate(cfg.solver)
        require_language_model_solver(solver)
        pair_builder = instantiate(cfg.pairs)
        check_compatible(solver, pair_builder)
        prompts = instantiate(cfg.data)  # validates the prompt file and split sizes eagerly
        reference_updater = instantiate(cfg.reference)
        return solver, pair_builder, prompts, reference_updater

    def run(self, cfg: DictConfig, run: RunContext) -> dict[str, Any]:
        from comalkit.loop import LoopSettings, MetaLoop
        from comalkit.oracle_cache import CachedOracle
        from comalkit.training import trainer_config

        solver, pair_builder, prompts, reference_updater = self._checked_components(cfg)
        warn_if_iterated_ipo(solver, reference_updater)
        trainer = trainer_config(cfg.trainer)
        oracle = CachedOracle(instantiate(cfg.oracle), run.out_dir / "oracle_cache.sqlite")
        policy = instantiate(cfg.model).build()
        sampler = instantiate(cfg.sampler)
        settings = LoopSettings(
            iterations=self.iterations,
            samples_per_prompt=self.samples_per_prompt,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            logps_batch_size=trainer.logps_batch_size,  # one name for online and offline runs
            eval_prompts=self.eval_prompts,
            seed=int(cfg.seed),
        )
        loop = MetaLoop(
            policy=policy,
            sampler=sampler,
            solver=solver,
            oracle=oracle,
            reference_updater=reference_updater,
            prompts=prompts,
            pair_builder=pair_builder,
            settings=settings,
            trainer=trainer,
            run=run,
        )
        try:
            summary = loop.execute()
        finally:
            sampler.close()
            oracle.close()
        summary["sampler"] = current_choice("sampler")
        summary["oracle"] = oracle.diagnostics()
        return summary
