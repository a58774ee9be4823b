"""``data=preferences``: preference pairs from a file, for offline training (``experiment=offline``).

The file is read and split when the plugin is built, so a bad line fails before any model
loads. ``path=sample`` (the default) is the project's own small preference set shipped
with comalkit: 129 training pairs and 40 held-out pairs of a helpful, correct answer versus
a rude, wrong or off-topic one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comalkit.preference_data import PreferenceRecord, load_preferences, split_records
from comalkit.preference_data import describe as count_pairs
from comalkit.registry import param, plugin

SAMPLE = "sample"
SAMPLE_TRAIN = Path(__file__).resolve().parent / "sample_pairs.jsonl"
SAMPLE_HELDOUT = Path(__file__).resolve().parent / "sample_pairs_heldout.jsonl"


@plugin("data", "preferences")
@dataclass
class PreferenceFile:
    """Pairs in TRL's format (prompt/chosen/rejected, strings or chat messages) from JSON lines or parquet.

    Held-out pairs come from ``eval_path`` when given, else a seeded ``eval_fraction`` of
    ``path`` is kept out of training (``path=sample`` uses its own held-out file).
    """

    path: str = param(SAMPLE, help="a .jsonl/.json/.parquet preference file; 'sample' = the shipped set")
    eval_path: str | None = param(None, help="a separate held-out preference file (same format)")
    eval_fraction: float = param(0.1, ge=0.0, lt=1.0, help="share of path held out when eval_path is not set")
    limit: int | None = param(None, ge=1, help="train on at most this many pairs (the first ones)")
    eval_limit: int | None = param(None, ge=1, help="evaluate on at most this many held-out pairs")
    seed: int = param(0, help="seed of the held-out split")

    def __post_init__(self) -> None:
        eval_path = self.eval_path
        if self.path == SAMPLE:
            path, eval_path = SAMPLE_TRAIN, eval_path or str(SAMPLE_HELDOUT)
        else:
            path = Path(self.path).expanduser()
        records = load_preferences(path)
        if eval_path is not None:
            train, held = records, load_preferences(Path(eval_path).expanduser())
        elif self.eval_fraction > 0:
            train, held = split_records(records, self.eval_fraction, self.seed)
        else:
            train, held = records, []
        self._train = train[: self.limit] if self.limit else train
        self._eval = held[: self.eval_limit] if self.eval_limit else held
        self.origin = str(path)

    @property
    def train_records(self) -> list[PreferenceRecord]:
        """The training pairs."""
        return self._train

    @property
    def eval_records(self) -> list[PreferenceRecord]:
        """The held-out pairs (empty when nothing is held out)."""
        return self._eval

    def describe(self) -> dict[str, object]:
        """Sizes and origin, for the run summary."""
        return {"path": self.origin, "train": count_pairs(self._train), "eval": count_pairs(self._eval)}
