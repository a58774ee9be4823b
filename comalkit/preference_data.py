"""Preference files in TRL's format -> plain records, with errors that name the file and line.

A row holds ``prompt``, ``chosen`` and ``rejected``, either as strings or in TRL's
conversational form (lists of ``{"role", "content"}`` messages; the prompt may also be left
implicit as the shared prefix of ``chosen`` and ``rejected``). Optional ``chosen_winprob`` /
``rejected_winprob`` carry soft win probabilities P̂(y ≻ π) for SPPO-style solvers. Files are
JSON lines (``.jsonl``, or ``.json`` holding lines or one array) or parquet, read with the
``datasets`` library. JSON is checked line by line first, because ``datasets`` reports a bad
line without its number.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

from comalkit.prompts import ROLES, read_lines, read_text, snippet
from comalkit.registry import ConfigError

log = logging.getLogger("comalkit")

Message = dict[str, str]

#: the keys every row needs (``prompt`` may be implicit in conversational rows)
REQUIRED = ("prompt", "chosen", "rejected")
WINPROBS = ("chosen_winprob", "rejected_winprob")
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class PreferenceRecord(TypedDict, total=False):
    """One preference pair. ``prompt`` is a string or chat messages; responses are assistant text.

    The log-prob keys are added by :func:`comalkit.training.precompute_logps`: summed response
    log-probs under the last iterate (``last_*``) and the reference (``ref_*``).
    """

    prompt: str | list[Message]
    chosen: str
    rejected: str
    chosen_winprob: float
    rejected_winprob: float
    last_chosen: float
    last_rejected: float
    ref_chosen: float
    ref_rejected: float


class PreferenceDataError(ConfigError):
    """A preference file is missing, malformed or empty; the message names the file (and line)."""


def load_preferences(path: str | Path, limit: int | None = None) -> list[PreferenceRecord]:
    """Read a preference file into records; raise :class:`PreferenceDataError` on any bad row."""
    path = Path(path)
    if path.is_dir():
        raise PreferenceDataError(
            f"{path} is a directory; expected a preference file (.jsonl, .json or .parquet)"
        )
    if not path.is_file():
        hint = f" (the directory {path.parent} does not exist)" if not path.parent.is_dir() else ""
        raise PreferenceDataError(f"preference file not found: {path}{hint}")
    builder = FORMATS.get(path.suffix.lower())
    if builder is None:
        raise PreferenceDataError(
            f"{path}: unsupported format '{path.suffix}'; expected one of {sorted(FORMATS)}"
        )
    if builder == "json":
        locations = _check_json(path)  # line-numbered errors before datasets sees the file
    rows = _load_with_datasets(path, builder)
    if builder == "parquet":
        locations = [f"{path}: row {i}" for i in range(len(rows))]
    if len(rows) == 0:
        raise PreferenceDataError(f"{path}: no preference pairs (the dataset is empty)")
    records = [normalise_row(row, where) for row, where in zip(rows, locations)]
    records = _without_ties(records, locations, path)
    return records[:limit] if limit is not None else records


def _without_ties(
    records: list[PreferenceRecord], locations: list[str], path: Path
) -> list[PreferenceRecord]:
    """Drop pairs whose chosen and rejected are identical (no preference to learn; an error if all
    are), and warn about repeated pairs, naming the first of each."""
    ties = [i for i, r in enumerate(records) if r["chosen"] == r["rejected"]]
    if len(ties) == len(records):
        raise PreferenceDataError(
            f"{path}: every pair has chosen identical to rejected; there is nothing to learn"
        )
    if ties:
        log.warning(
            "%s: skipping %d pair(s) whose chosen is identical to rejected (first: %s)",
            path,
            len(ties),
            locations[ties[0]],
        )
    seen: dict[str, int] = {}
    repeats = []
    for i, r in enumerate(records):
        key = json.dumps([r["prompt"], r["chosen"], r["rejected"]])
        if key in seen:
            repeats.append((i, seen[key]))
        else:
            seen[key] = i
    if repeats:
        i, first = repeats[0]
        log.warning(
            "%s: %d repeated pair(s), kept (first: %s repeats %s)",
            path,
            len(repeats),
            locations[i],
            locations[first],
        )
    skip = set(ties)
    return [r for i, r in enumerate(records) if i not in skip]


def split_records(
    records: Sequence[PreferenceRecord], eval_fraction: float, seed: int = 0
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """A seeded random split into (train, held-out); at least one pair stays on each side."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction}: expected a value in (0, 1)")
    if len(records) < 2:
        raise PreferenceDataError(
            f"cannot split {len(records)} preference pair(s) into train and held-out sets"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(eval_fraction * len(records))), len(records) - 1)
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [records[i] for i in sorted(held)]


def normalise_row(row: dict[str, Any], where: str) -> PreferenceRecord:
    """One row (TRL standard or conversational format) -> a :class:`PreferenceRecord`.

    ``where`` names the row in errors, e.g. ``pairs.jsonl:12``.
    """
    if not isinstance(row, dict):
        raise PreferenceDataError(
            f"{where}: expected a JSON object with keys {list(REQUIRED)}, got {type(row).__name__}"
        )
    missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
    if (
        row.get("prompt") is None
        and not missing
        and not all(_is_messages(row[k]) for k in ("chosen", "rejected"))
    ):
        missing.insert(0, "prompt")  # only conversational rows may leave the prompt implicit
    if missing:
        raise PreferenceDataError(
            f"{where}: missing key(s) {missing}; a row needs {list(REQUIRED)} (the prompt may be implicit "
            "only when chosen and rejected are message lists)"
        )
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    if prompt is None:
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, where)
    record = PreferenceRecord(
        prompt=_prompt(prompt, where),
        chosen=_response(chosen, "chosen", where),
        rejected=_response(rejected, "rejected", where),
    )
    probs = {k: row.get(k) for k in WINPROBS}
    present = [k for k, v in probs.items() if v is not None]
    if len(present) == 1:
        raise PreferenceDataError(
            f"{where}: '{present[0]}' is given without its partner; give both {list(WINPROBS)}"
        )
    for key, value in probs.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise PreferenceDataError(
                f"{where}: '{key}' must be a probability in [0, 1], got {snippet(value)}"
            )
        record[key] = float(value)  # type: ignore[literal-required]
    return record


def describe(records: Iterable[PreferenceRecord]) -> dict[str, Any]:
    """Counts for logs and summaries: pairs, and whether soft win probabilities are present."""
    records = list(records)
    with_probs = sum(1 for r in records if "chosen_winprob" in r)
    return {"pairs": len(records), "with_winprobs": with_probs}


# ---------------------------------------------------------------------------------------------
def _check_json(path: Path) -> list[str]:
    """Validate a JSON file row by row; return each row's location (``file:line``)."""
    with path.open("rb") as fh:
        is_array = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    if is_array:
        text = read_text(path, PreferenceDataError)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PreferenceDataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        rows = [(f"{path}: item {i}", item) for i, item in enumerate(items)]
    else:
        rows = []
        for lineno, line in read_lines(path, PreferenceDataError):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise PreferenceDataError(
                    f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
    if not rows:
        raise PreferenceDataError(f"{path}: no preference pairs (the file is empty)")
    first_where, first = rows[0]
    shape = _shape(first) if isinstance(first, dict) else None
    for where, row in rows:
        normalise_row(row, where)
        if _shape(row) != shape:  # Arrow needs one type per column
            raise PreferenceDataError(
                f"{where}: the row mixes formats with {first_where} ({_shape_text(row)} vs {_shape_text(first)}); "
                "use one format (strings or message lists) per file"
            )
    return [where for where, _ in rows]


def _load_with_datasets(path: Path, builder: str) -> list[dict[str, Any]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets wraps parser errors without the file name
        detail = " ".join(str(exc).split())[:200]
        raise PreferenceDataError(f"{path}: could not be read as {builder}: {detail}") from exc
    return dataset.to_list()


def _shape(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(
        "absent" if row.get(k) is None else "messages" if isinstance(row.get(k), list) else "string"
        for k in REQUIRED
    )


def _shape_text(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {s}" for k, s in zip(REQUIRED, _shape(row)))


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) for m in value)


def _message(m: Any, key: str, where: str) -> Message:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
        raise PreferenceDataError(
            f"{where}: '{key}' holds {snippet(m)}; expected messages like {{'role': ..., 'content': ...}}"
        )
    if m["role"] not in ROLES:
        raise PreferenceDataError(
            f"{where}: '{key}' has a message with role {snippet(m['role'])}; expected one of {list(ROLES)}"
        )
    return {"role": m["role"], "content": m["content"]}


def _prompt(value: Any, where: str) -> str | list[Message]:
    if isinstance(value, str):
        if not value.strip():
            raise PreferenceDataError(f"{where}: 'prompt' is empty")
        return value
    if isinstance(value, list) and value:
        messages = [_message(m, "prompt", where) for m in value]
        if messages[-1]["role"] != "user":
            raise PreferenceDataError(
                f"{where}: 'prompt' ends with a {messages[-1]['role']} message; expected the user turn the "
                "responses answer"
            )
        return messages
    raise PreferenceDataError(
        f"{where}: 'prompt' must be a string or a non-empty list of messages, got {snippet(value)}"
    )


def _response(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        messages = [_message(m, key, where) for m in value]
        if len(messages) == 1 and messages[0]["role"] == "assistant":
            return messages[0]["content"]
        raise PreferenceDataError(
            f"{where}: '{key}' must hold exactly one assistant message after the prompt, got {len(messages)} "
            f"message(s) with roles {[m['role'] for m in messages]}"
        )
    raise PreferenceDataError(
        f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}"
    )


def _split_implicit_prompt(
    chosen: list[Any], rejected: list[Any], where: str
) -> tuple[list[Any], list[Any], list[Any]]:
    """TRL's implicit prompt: the longest shared prefix of the two conversations."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise PreferenceDataError(f"{where}: no 'prompt' key and chosen/rejected share no leading messages")
    return chosen[:n], chosen[n:], rejected[n:]
