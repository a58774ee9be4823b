"""Lightning's output that does not apply to comalkit, hidden for the duration of training only.

Each change (warning filters, a log filter, Lightning's console handler) is made when the block
starts and undone when it ends, so Lightning used elsewhere in the process behaves as usual.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide Lightning's advice that does not apply here (pairs are tokenised in the main process)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
        warnings.filterwarnings(
            "ignore", message=".*defined a `validation_step` but have no `val_dataloader`.*"
        )
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        with _lightning_logged_once():
            rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
            rank_zero.addFilter(_no_tips)
            try:
                yield
            finally:
                rank_zero.removeFilter(_no_tips)


@contextlib.contextmanager
def _lightning_logged_once() -> Iterator[None]:
    """Under a configured root logger (Hydra's console + run log), set aside the console handler
    Lightning adds to its own logger, which would print every Lightning message twice; it is put
    back when the block ends. In plain Python use (no root handler) Lightning's handler is the only
    output and stays."""
    lightning_logger = logging.getLogger("lightning")
    set_aside = []
    if logging.getLogger().hasHandlers():
        set_aside = [h for h in lightning_logger.handlers if type(h) is logging.StreamHandler]
    for handler in set_aside:
        lightning_logger.removeHandler(handler)
    try:
        yield
    finally:
        for handler in set_aside:
            lightning_logger.addHandler(handler)


def _no_tips(record: logging.LogRecord) -> bool:
    """Drop Lightning's advertisement for its cloud logger."""
    return "litlogger" not in record.getMessage()
