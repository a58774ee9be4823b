"""The pairwise judge prompt: a template with ``{prompt}``, ``{a}`` and ``{b}``, filled and parsed back.

One template format serves the prompted LLM judge, the HTTP judge (which sends the filled
prompt) and the judge server (which parses it back into ``(prompt, a, b)``).

Responses are untrusted text. Each placeholder is quoted between delimiter lines of the
template (the nearest non-empty literal line before and after it, e.g. ``[RESPONSE A]`` and
``[/RESPONSE A]``); before filling, every delimiter is removed from the values, so a
response can neither close its quote and address the judge from outside it, nor make the
filled prompt ambiguous to parse.

Templates are files. A name without a path separator (``pairwise``) is looked up as
``<name>.txt`` in the directories registered with :func:`register_template_dir`; plugin
packages register theirs at import.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIELDS = ("prompt", "a", "b")
_TEMPLATE_DIRS: list[Path] = []


def register_template_dir(directory: str | Path) -> None:
    """Make the ``*.txt`` templates in ``directory`` loadable by name."""
    path = Path(directory).resolve()
    if path not in _TEMPLATE_DIRS:
        _TEMPLATE_DIRS.append(path)


def resolve_template(name_or_path: str) -> Path:
    """The file of a template given by path or by registered name; FileNotFoundError names both."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    if "/" not in name_or_path and path.suffix == "":
        for directory in _TEMPLATE_DIRS:
            candidate = directory / f"{name_or_path}.txt"
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for d in _TEMPLATE_DIRS for p in d.glob("*.txt")})
    raise FileNotFoundError(
        f"judge template '{name_or_path}' is neither a file nor a registered template name "
        f"(known names: {', '.join(known) or 'none'})"
    )


def remove_all(text: str, needles: Sequence[str]) -> str:
    """``text`` without any of ``needles``, removed until none is left, so that removing one
    cannot join the rest into a new one (``[/RESP[/RESPONSE A]ONSE A]``)."""
    previous = None
    while previous != text:
        previous = text
        for needle in needles:
            text = text.replace(needle, "")
    return text


@dataclass(frozen=True)
class JudgePrompt:
    """A validated pairwise template (see the module docstring)."""

    text: str
    source: str = "<string>"
    _literals: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _order: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)
    delimiters: tuple[str, ...] = field(init=False, compare=False)

    @classmethod
    def load(cls, name_or_path: str) -> JudgePrompt:
        path = resolve_template(name_or_path)
        return cls(path.read_text(encoding="utf-8"), str(path))

    def __post_init__(self) -> None:
        literals, order = [], []
        try:
            parsed = list(string.Formatter().parse(self.text))
        except ValueError as exc:
            raise ValueError(f"judge template {self.source}: {exc}") from None
        pending = ""
        for literal, name, spec, conversion in parsed:
            pending += literal
            if name is None:
                continue
            if name not in FIELDS or spec or conversion:
                raise ValueError(
                    f"judge template {self.source}: unknown placeholder '{{{name}}}'; "
                    f"expected exactly {{prompt}}, {{a}} and {{b}} (write literal braces as {{{{ }}}})"
                )
            literals.append(pending)
            order.append(name)
            pending = ""
        literals.append(pending)
        if sorted(order) != sorted(FIELDS):
            raise ValueError(
                f"judge template {self.source}: placeholders {order}; expected each of "
                f"{{prompt}}, {{a}} and {{b}} exactly once"
            )
        delimiters = []
        for i in range(len(order)):
            before = [line.strip() for line in literals[i].splitlines() if line.strip()]
            after = [line.strip() for line in literals[i + 1].splitlines() if line.strip()]
            if not before or not after:
                raise ValueError(
                    f"judge template {self.source}: placeholder {{{order[i]}}} must stand between "
                    f"two non-empty delimiter lines"
                )
            delimiters += [before[-1], after[0]]
        regex = re.escape(literals[0])
        for name, literal in zip(order, literals[1:]):
            regex += f"(?P<{name}>.*?)" + re.escape(literal)
        object.__setattr__(self, "_literals", tuple(literals))
        object.__setattr__(self, "_order", tuple(order))
        object.__setattr__(self, "_pattern", re.compile(regex, re.DOTALL))
        object.__setattr__(self, "delimiters", tuple(dict.fromkeys(delimiters)))

    @property
    def digest(self) -> str:
        """A short hash of the template text (part of an oracle's identity)."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def sanitize(self, value: str) -> str:
        """``value`` with every delimiter removed (see :func:`remove_all`)."""
        return remove_all(value, self.delimiters)

    def render(self, prompt: str, a: str, b: str) -> str:
        """The filled template, with ``a`` in the first response slot and ``b`` in the second."""
        values = {"prompt": self.sanitize(prompt), "a": self.sanitize(a), "b": self.sanitize(b)}
        out = self._literals[0]
        for name, literal in zip(self._order, self._literals[1:]):
            out += values[name] + literal
        return out

    def parse(self, text: str) -> tuple[str, str, str]:
        """``(prompt, a, b)`` from a filled template; ValueError when ``text`` does not fit it."""
        match = self._pattern.fullmatch(text)
        if match is None:
            raise ValueError(f"the message does not follow the judge template {self.source}")
        return match["prompt"], match["a"], match["b"]
