"""Prompts for the online loop: read any local prompt file, cut it into fixed training splits.

COMAL's public code cuts its prompt set into 6 fixed splits and gives iteration ``k`` the
split ``k mod 6``, so that each subgame sees fresh prompts and a long run cycles through the
data. :class:`comalkit.interfaces.PromptSource` is that contract (``split(k)``, ``num_splits``,
``eval_prompts()``); :class:`SplitPrompts` implements it on top of :func:`make_splits`, and
the ``data`` plugins only decide where the prompts come from.

Every check runs when a source is built, so a bad file or an impossible split fails before
the first response is sampled, with a message that names the file (and line) and the setting
to change.

Prompts are single-turn user messages (plain strings). A chat-message row is accepted and
reduced to its one user turn: system messages and trailing assistant turns are dropped, and a
multi-turn conversation is an error rather than silently truncated context.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comalkit.interfaces import PromptSource
from comalkit.registry import ConfigError

log = logging.getLogger("comalkit")

#: the longest line a data file may hold (a longer one is a wrong file, not a prompt)
MAX_LINE_BYTES = 16 * 2**20
#: the chat roles a message may have
ROLES = ("system", "user", "assistant")

#: file suffixes read as JSON (lines, or one array), plain text (one prompt per line) or parquet
JSON_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)
PARQUET_SUFFIXES = (".parquet",)


class PromptDataError(ConfigError):
    """A prompt file is missing, malformed, empty, or too small for the requested splits.

    A :class:`~comalkit.registry.ConfigError` (so a ``ValueError``): the app reports it as a
    one-line error naming what to change, without a traceback.
    """


@dataclass
class LoadedPrompts:
    """Prompts read from one source, with where they came from and how many rows were skipped."""

    prompts: list[str]
    origin: str
    skipped_empty: int = 0


class SplitPrompts(PromptSource):
    """A :class:`PromptSource` over precomputed splits; plugins call :meth:`_set_splits` once."""

    _splits: list[list[str]]
    _eval: list[str]
    _unused: int

    def _set_splits(self, splits: list[list[str]], held_out: list[str], unused: int = 0) -> None:
        self._splits, self._eval, self._unused = splits, held_out, unused
        self.num_splits = len(splits)

    def split(self, k: int) -> list[str]:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"split index must be an int >= 0, got {k!r}")
        return list(self._splits[k % self.num_splits])

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def describe(self) -> dict[str, int]:
        """Counts for logs and summaries."""
        return {
            "num_splits": self.num_splits,
            "split_size": len(self._splits[0]),
            "train_prompts": sum(len(s) for s in self._splits),
            "eval_prompts": len(self._eval),
            "unused_prompts": self._unused,
        }


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------
def make_splits(
    prompts: Sequence[str],
    *,
    split_size: int | None,
    num_splits: int | None,
    origin: str,
    shuffle: bool = False,
    seed: int = 0,
) -> tuple[list[list[str]], int]:
    """Cut ``prompts`` into equal training splits; return ``(splits, number of prompts left over)``.

    ``split_size`` prompts per split and ``num_splits`` splits; either may be ``None``: it is
    then derived from the other (as many full splits as fit, or an equal share of the data),
    and both ``None`` gives one split of everything. A remainder that fills no whole split is
    left unused, so every iteration costs the same. ``origin`` names the data in errors.
    """
    n = len(prompts)
    for key, value in (("split_size", split_size), ("num_splits", num_splits)):
        if value is not None and value < 1:
            raise PromptDataError(f"data.{key}={value}: expected a value >= 1")
    if split_size is not None and split_size > n:
        raise PromptDataError(
            f"split_size={split_size} but only {n} prompts in {origin}: lower data.split_size"
        )
    if num_splits is not None and num_splits > n:
        raise PromptDataError(
            f"num_splits={num_splits} but only {n} prompts in {origin}: lower data.num_splits"
        )
    if split_size is None:
        split_size = n // (num_splits or 1)
    if num_splits is None:
        num_splits = n // split_size
    if split_size * num_splits > n:
        raise PromptDataError(
            f"split_size={split_size} x num_splits={num_splits} needs {split_size * num_splits} prompts but "
            f"{origin} has {n}: lower data.split_size or data.num_splits"
        )
    order = list(prompts)
    if shuffle:
        random.Random(seed).shuffle(order)
    splits = [order[i * split_size : (i + 1) * split_size] for i in range(num_splits)]
    return splits, n - split_size * num_splits


def take(prompts: Sequence[str], size: int | None, origin: str, key: str = "eval_size") -> list[str]:
    """The first ``size`` prompts (all when ``None``), with an error naming ``key`` when there are too few."""
    if size is None:
        return list(prompts)
    if size < 0:
        raise PromptDataError(f"data.{key}={size}: expected a value >= 0")
    if size > len(prompts):
        raise PromptDataError(f"{key}={size} but only {len(prompts)} prompts in {origin}: lower data.{key}")
    return list(prompts[:size])


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
def read_lines(path: Path, error: type[ConfigError] = ConfigError) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 text file, read a line at a time with bounded memory.

    A byte that is not UTF-8 or a line over :data:`MAX_LINE_BYTES` raises ``error`` naming
    ``file:line`` and the byte offset; nothing of the file's content goes into the message.
    """
    if path.is_dir():
        raise error(f"{path} is a directory; expected a file")
    offset = 0
    with path.open("rb") as fh:
        lineno = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise error(
                    f"{path}:{lineno}: the line is longer than {MAX_LINE_BYTES // 2**20} MiB; "
                    "expected one row per line (is this the right file?)"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}, byte offset "
                    f"{offset + exc.start} of the file); save the file as UTF-8"
                ) from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")  # a byte-order mark is not content
            offset += len(raw)
            yield lineno, text.rstrip("\r\n")


def read_text(path: Path, error: type[ConfigError] = ConfigError) -> str:
    """A whole UTF-8 file (a JSON array); a bad byte raises ``error`` naming ``file:line``."""
    if path.is_dir():
        raise error(f"{path} is a directory; expected a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(
            f"{path}:{line}: not UTF-8 (byte 0x{data[exc.start]:02x} at byte offset {exc.start}); save the file as UTF-8"
        ) from None


def snippet(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about huge rows."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_prompts(path: str | Path, field: str = "prompt", dataset_split: str = "train") -> LoadedPrompts:
    """Read the prompts of a local file or ``datasets`` directory; raise :class:`PromptDataError`.

    Formats: JSON lines (``.jsonl``/``.json``; rows are objects holding ``field``, or bare
    strings), a JSON array (``.json``), plain text (``.txt``, one prompt per line), parquet, or
    a directory written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` uses
    ``dataset_split``). Each value is a string or a chat-message list (see the module
    docstring). Empty prompts are skipped and counted; a source with none left is an error.
    """
    path = Path(path).expanduser()
    if not path.exists():
        hint = "" if path.parent.is_dir() else f" (the directory {path.parent} does not exist either)"
        raise PromptDataError(f"prompt file not found: {path}{hint}")
    if path.is_dir():
        rows = _dataset_rows(path, field, dataset_split)
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        rows = _parquet_rows(path, field)
    elif path.suffix.lower() in JSON_SUFFIXES:
        rows = _json_rows(path, field)
    elif path.suffix.lower() in TEXT_SUFFIXES:
        rows = ((f"{path}:{i}", line) for i, line in read_lines(path, PromptDataError))
    else:
        known = JSON_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES
        raise PromptDataError(
            f"{path}: unsupported format '{path.suffix}'; expected one of {list(known)} or a directory"
        )
    prompts, empty = [], 0
    for where, value in rows:
        text = prompt_text(value, where, field)
        if text is None:
            empty += 1
        else:
            prompts.append(text)
    if not prompts:
        detail = f"all {empty} rows are empty" if empty else "the file holds no rows"
        raise PromptDataError(f"no usable prompts in {path}: {detail}")
    duplicates = len(prompts) - len(set(prompts))
    if duplicates:
        log.warning(
            "%s: %d duplicate prompt(s); each copy is sampled like any other prompt", path, duplicates
        )
    return LoadedPrompts(prompts, str(path), empty)


def prompt_text(value: Any, where: str, field: str = "prompt") -> str | None:
    """One prompt value -> its text, or ``None`` when it is empty; ``where`` names it in errors."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):
        return _user_turn(list(value), where, field)
    raise PromptDataError(
        f"{where}: '{field}' must be a string or a list of chat messages, got {type(value).__name__} {snippet(value)}"
    )


def _user_turn(messages: list[Any], where: str, field: str) -> str | None:
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise PromptDataError(
                f"{where}: '{field}' holds {snippet(m)}; expected messages like {{'role': ..., 'content': ...}}"
            )
        if m["role"] not in ROLES:
            raise PromptDataError(
                f"{where}: '{field}' has a message with role {snippet(m['role'])}; expected one of {list(ROLES)}"
            )
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # a conversation with its reply: the prompt is what precedes it
    turns = [m for m in messages if m["role"] != "system"]
    if not turns:
        return None
    if len(turns) > 1 or turns[0]["role"] != "user":
        roles = [m["role"] for m in messages]
        raise PromptDataError(
            f"{where}: '{field}' is a multi-turn conversation (roles {roles}); prompts must be a single user turn"
        )
    return turns[0]["content"].strip() or None


def _json_rows(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    if path.suffix.lower() == ".json" and _starts_with_bracket(path):
        text = read_text(path, PromptDataError)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptDataError(
                f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        located = ((f"{path}: item {i}", item) for i, item in enumerate(items))
    else:
        located = _json_lines(path)
    for where, row in located:
        yield where, _field(row, field, where)


def _starts_with_bracket(path: Path) -> bool:
    """Whether a JSON file holds one array (its first non-blank byte is ``[``)."""
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    for lineno, line in read_lines(path, PromptDataError):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptDataError(
                f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None


def _field(row: Any, field: str, where: str) -> Any:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        raise PromptDataError(
            f"{where}: expected an object with a '{field}' key or a string, got {type(row).__name__}"
        )
    if field not in row:
        raise PromptDataError(
            f"{where}: no '{field}' key (keys: {', '.join(map(str, row)) or 'none'}); set data.field"
        )
    return row[field]


def _parquet_rows(path: Path, field: str) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow's errors do not name the file
        raise PromptDataError(f"{path}: could not be read as parquet: {exc}") from exc
    if field not in names:
        raise PromptDataError(f"{path}: no '{field}' column (columns: {', '.join(names)}); set data.field")
    values = pq.read_table(path, columns=[field]).column(field).to_pylist()
    return ((f"{path}: row {i}", v) for i, v in enumerate(values))


def _dataset_rows(path: Path, field: str, dataset_split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise PromptDataError(
            f"{path}: not a directory written by datasets' save_to_disk ({detail})"
        ) from exc
    if isinstance(data, datasets.DatasetDict):
        if dataset_split not in data:
            raise PromptDataError(
                f"{path}: no split '{dataset_split}' (splits: {', '.join(data)}); set data.dataset_split"
            )
        data = data[dataset_split]
    if field not in data.column_names:
        raise PromptDataError(
            f"{path}: no '{field}' column (columns: {', '.join(data.column_names)}); set data.field"
        )
    return ((f"{path}: row {i}", v) for i, v in enumerate(data[field]))
