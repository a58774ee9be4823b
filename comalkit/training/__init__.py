"""Training a language-model policy on preference pairs with any solver, under a real ``lightning.Trainer``.

One module per job (docs/architecture.md, "Folders"):

* ``config``: the ``trainer`` group's schema (:class:`TrainerConfig`) and its checks
* ``precompute``: the frozen last-iterate and reference log-probs, computed once
* ``module``: :class:`PreferenceModule`, the one LightningModule for every solver
* ``optim``: the optimizer and the learning-rate schedule
* ``logger``: Lightning's logged steps -> ``metrics.jsonl``
* ``quiet``: Lightning's output that does not apply, hidden during training
* ``fit``: :func:`fit`: the Trainer, here or on several ranks

It re-exports the names the rest of comalkit uses (``__all__``); import them from here.
"""

from comalkit.training.config import SchedulerConfig, TrainerConfig, check_accelerator, trainer_config
from comalkit.training.fit import build_trainer, fit, fit_as_rank
from comalkit.training.logger import RunLogger
from comalkit.training.module import NonFiniteError, PreferenceModule, check_finite_weights
from comalkit.training.optim import lr_lambda
from comalkit.training.precompute import check_records, precision_autocast, precompute_logps, required_keys

__all__ = [
    "NonFiniteError",
    "SchedulerConfig",
    "TrainerConfig",
    "PreferenceModule",
    "RunLogger",
    "precision_autocast",
    "build_trainer",
    "check_accelerator",
    "check_finite_weights",
    "check_records",
    "fit",
    "fit_as_rank",
    "lr_lambda",
    "precompute_logps",
    "required_keys",
    "trainer_config",
]
