"""Task ``offline``: preference optimisation from a file (``python -m comalkit experiment=offline``).

One subgame with a fixed reference: the initial policy is both the reference μ and the last
iterate π_t, so DPO/IPO/SPPO/INPO/MPO train exactly as TRL's DPOTrainer would on the same pairs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from comalkit.interfaces import RunContext, Task, require_language_model_solver
from comalkit.registry import ConfigError, instantiate, param, plugin

log = logging.getLogger("comalkit")


@plugin("task", "offline")
@dataclass
class OfflineTask(Task):
    """Train the policy on preference pairs; evaluate held-out loss and reward accuracy before and after.

    Frozen log-probs of the initial policy are computed once (the solver reads them as the
    reference and/or the last iterate); then :func:`comalkit.training.fit` runs the Lightning
    Trainer configured by the ``trainer`` group. Writes ``metrics.jsonl`` (per step: ``loss``,
    ``rewards/margins``, ``rewards/accuracies``, ...; held-out: ``eval_*``), the policy in
    Hugging Face format under ``<run dir>/<checkpoint_dir>``, and returns the summary.
    A rerun trains again from the start.
    """

    save_checkpoint: bool = param(True, help="write the trained policy (adapter or full model + tokenizer)")
    checkpoint_dir: str = param("checkpoint", help="directory inside the run directory")

    def check(self, cfg: DictConfig) -> None:
        self._checked_components(cfg)

    def _checked_components(self, cfg: DictConfig) -> tuple[Any, Any]:
        """The solver (one that trains a language model) and the preference data."""
        solver = instantiate(cfg.solver)
        require_language_model_solver(solver)
        data = instantiate(cfg.data)
        if not hasattr(data, "train_records"):
            raise ConfigError(
                f"task=offline trains on preference pairs: choose data=preferences (got {type(data).__name__})"
            )
        return solver, data

    def run(self, cfg: DictConfig, run: RunContext) -> dict[str, Any]:
        from comalkit.training import fit, precompute_logps, trainer_config

        solver, data = self._checked_components(cfg)
        trainer = trainer_config(cfg.get("trainer"))
        policy = instantiate(cfg.model).build()

        def frozen(records: list[Any]) -> list[Any]:
            # the current (initial) weights are both reference and last iterate
            return precompute_logps(
                policy, records, solver, batch_size=trainer.logps_batch_size, precision=trainer.precision
            )

        train, held_out = frozen(data.train_records), frozen(data.eval_records)
        log.info(
            "offline: %d training pairs, %d held out, solver %s",
            len(train),
            len(held_out),
            type(solver).__name__,
        )
        result = fit(policy, solver, train, trainer, run.out_dir, val_records=held_out or None, run=run)
        summary: dict[str, Any] = {"data": data.describe(), **result}
        if self.save_checkpoint:
            summary["checkpoint"] = str(policy.save_checkpoint(run.out_dir / self.checkpoint_dir))
        after = result.get("eval_after", {})
        summary["objective"] = after.get("eval_loss", result["train"].get("loss"))
        return summary
