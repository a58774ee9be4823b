"""Prompt sources for the online loop: the bundled prompt set and any local prompt file.

Both build their splits when constructed, so every data error surfaces before sampling.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from comalkit.prompts import PromptDataError, SplitPrompts, make_splits, read_prompts, take
from comalkit.registry import param, plugin

#: the project's own prompts: train_0..train_5.jsonl (50 each) and eval.jsonl (50, held out)
BUNDLED_DIR = Path(__file__).resolve().parent / "prompts"


def bundled_files() -> tuple[list[Path], Path]:
    """The bundled training parts (in order) and the held-out evaluation part."""
    parts = sorted(BUNDLED_DIR.glob("train_*.jsonl"), key=lambda p: int(p.stem.split("_")[1]))
    if not parts:
        raise PromptDataError(
            f"no bundled prompt parts train_*.jsonl in {BUNDLED_DIR}: the installation is incomplete"
        )
    return parts, BUNDLED_DIR / "eval.jsonl"


@plugin("data", "bundled")
@dataclass
class BundledPrompts(SplitPrompts):
    """350 instructions written for comalkit: 6 training parts of 50, cycled, and 50 held out.

    The default cuts the pooled 300 training prompts into splits of 16, so that the default
    run takes minutes on a CPU; ``split_size=50`` makes each bundled part one split, as in
    COMAL's code (6 splits, iteration k uses split k mod 6).
    """

    split_size: int = param(8, ge=1, help="prompts per iteration (50 = one bundled part, as in COMAL's code)")
    num_splits: int | None = param(None, ge=1, help="splits to cycle through; default: as many as fit")
    eval_size: int | None = param(None, ge=0, help="held-out prompts for evaluation; default: all 50")
    shuffle: bool = param(False, help="shuffle the pooled training prompts before cutting splits")
    seed: int = param(0, help="seed of the shuffle")

    def __post_init__(self) -> None:
        parts, eval_file = bundled_files()
        pool = [p for part in parts for p in read_prompts(part).prompts]
        origin = f"the bundled training parts ({BUNDLED_DIR}/train_*.jsonl)"
        splits, unused = make_splits(
            pool,
            split_size=self.split_size,
            num_splits=self.num_splits,
            origin=origin,
            shuffle=self.shuffle,
            seed=self.seed,
        )
        held_out = take(read_prompts(eval_file).prompts, self.eval_size, str(eval_file))
        self._set_splits(splits, held_out, unused)


@plugin("data", "prompts")
@dataclass
class FilePrompts(SplitPrompts):
    """Prompts from any local file: JSON lines / JSON array / text / parquet / ``datasets`` directory.

    Held-out prompts come from ``eval_path`` when given, else the last ``eval_size`` prompts
    (after the shuffle) are kept out of training.
    """

    path: str = param("???", help="a .jsonl/.json/.txt/.parquet file or a datasets save_to_disk directory")
    field: str = param("prompt", help="the column or key holding the prompt (a string or chat messages)")
    dataset_split: str = param("train", help="split of a saved DatasetDict")
    split_size: int | None = param(50, ge=1, help="prompts per iteration; null: an equal share per split")
    num_splits: int | None = param(None, ge=1, help="splits to cycle through; default: as many as fit")
    eval_path: str | None = param(None, help="a separate file of held-out prompts (same field)")
    eval_size: int | None = param(
        None, ge=0, help="held-out prompts: from eval_path (default all) or kept out of path (default 0)"
    )
    shuffle: bool = param(True, help="shuffle before cutting splits (files are often sorted by topic)")
    seed: int = param(0, help="seed of the shuffle")

    def __post_init__(self) -> None:
        if self.path in ("", "???"):
            raise PromptDataError(
                "data=prompts needs a file: set data.path=<a .jsonl/.json/.txt/.parquet file or directory>"
            )
        loaded = read_prompts(self.path, self.field, self.dataset_split)
        pool = list(loaded.prompts)
        if self.shuffle:
            random.Random(self.seed).shuffle(pool)
        n_eval = 0
        if self.eval_path is not None:
            evaluation = read_prompts(self.eval_path, self.field, self.dataset_split)
            held_out = take(evaluation.prompts, self.eval_size, evaluation.origin)
        else:
            n_eval = self.eval_size or 0
            if n_eval >= len(pool):
                raise PromptDataError(
                    f"eval_size={n_eval} but only {len(pool)} prompts in {loaded.origin}, and training needs some: "
                    "lower data.eval_size or give data.eval_path"
                )
            held_out, pool = pool[len(pool) - n_eval :], pool[: len(pool) - n_eval]
        origin = loaded.origin + (f" after holding out {n_eval} for evaluation" if n_eval else "")
        splits, unused = make_splits(
            pool, split_size=self.split_size, num_splits=self.num_splits, origin=origin
        )
        self._set_splits(splits, held_out, unused)
