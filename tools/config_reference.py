"""Write docs/configuration.md, the configuration reference, from the registry's schemas.

Every option of every config group is a dataclass registered with ``@plugin``; its fields,
types, defaults, ``param`` limits and help texts are the whole truth about what it accepts,
so the page is generated from them and cannot drift. ``make docs`` runs this before
``mkdocs build``; tests/test_registry.py fails when the committed page is out of date.

    python tools/config_reference.py           # rewrite docs/configuration.md
    python tools/config_reference.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
#: Only comalkit's own plugins: an installed third-party package must not change the page.
BUILTIN_PACKAGES = {"comalkit", "comalkit_plugins"}

GROUPS = {
    "task": "What `python -m comalkit` runs; usually chosen through `experiment=`.",
    "model": "The policy being trained: a causal LM, with a LoRA adapter by default.",
    "solver": "The subgame solver: a loss on preference pairs plus its exact population update (docs/solvers.md).",
    "oracle": "The preference oracle that judges pairs of responses (docs/oracles.md).",
    "reference": "The reference updater, which moves the KL anchor between subgames: the *meta* in COMAL.",
    "sampler": "How responses are drawn from the policy.",
    "data": "Prompts (online) or preference pairs (offline) (docs/data.md).",
    "pairs": "How sampled, judged responses become training pairs.",
    "logger": "An extra metric sink; `metrics.jsonl` is always written.",
    "game": "Exact matrix games for `experiment=synthetic` (docs/games.md).",
}


def type_name(tp: Any) -> str:
    """``list[float]``, ``int | None``, ``dict[str, Any]``: the annotation as a user writes it."""
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def value(v: Any) -> str:
    """A default as YAML would spell it on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f"`{v}`" if v else '`""`'
    if isinstance(v, (list, tuple, dict)):
        text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
        return f"`{text}`"
    return f"`{v}`"


def limits(meta: dict[str, Any]) -> str:
    parts = []
    low = ("> ", meta.get("gt")) if meta.get("gt") is not None else ("≥ ", meta.get("ge"))
    high = ("< ", meta.get("lt")) if meta.get("lt") is not None else ("≤ ", meta.get("le"))
    if low[1] is not None:
        parts.append(f"{low[0]}{low[1]}")
    if high[1] is not None:
        parts.append(f"{high[0]}{high[1]}")
    if meta.get("choices"):
        parts.append("one of " + ", ".join(f"`{c}`" for c in meta["choices"]))
    return ", ".join(parts)


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def plain(doc: str) -> str:
    """The first paragraph of a docstring on one line, reST roles reduced to code."""
    first = inspect.cleandoc(doc).split("\n\n")[0]
    first = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", first)
    parts = " ".join(first.split()).split("`")
    parts[::2] = [p.replace("*", "\\*") for p in parts[::2]]  # π* is not emphasis (outside code only)
    return "`".join(parts)


def rows(cls: type, prefix: str = "", preset: dict[str, Any] | None = None) -> list[str]:
    """Markdown table rows for the init fields of dataclass ``cls`` (nested dataclasses expanded);
    a key that ``preset`` (a parsed YAML file) sets shows that value as its default."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        meta = dict(f.metadata)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
                nested = (preset or {}).get(f.name)
                out.extend(
                    rows(
                        f.default_factory, f"{prefix}{f.name}.", nested if isinstance(nested, dict) else None
                    )
                )
                continue
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if preset is not None and f.name in preset:
            default = preset[f.name]
        shown = "*required*" if default is dataclasses.MISSING else value(default)
        tp = type_name(hints.get(f.name, f.type))
        out.append(
            f"| `{prefix}{f.name}` | {cell(tp)} | {cell(shown)} | {cell(limits(meta))} | {cell(meta.get('help', ''))} |"
        )
    return out


def option_section(group: str, name: str, cls: type) -> list[str]:
    lines = [
        f"### `{group}={name}`",
        "",
        f"`{cls.__module__}.{cls.__qualname__}`: {plain(cls.__doc__ or '')}",
        "",
    ]
    table = rows(cls)
    if table:
        lines += ["| key | type | default | range | help |", "|---|---|---|---|---|", *table]
    else:
        lines.append("No settings.")
    return [*lines, ""]


def yaml_header(path: Path) -> str:
    """The leading comment block of a YAML file up to its first example command (its description)."""
    comments = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith(("python ", "pip ")):  # example commands: the description ends there
            break
        if not text.startswith("@package"):
            comments.append(text)
    return " ".join(c for c in comments if c).rstrip(":")


def defaults(conf: Path) -> dict[str, str]:
    """``group -> option`` from the root config's defaults list."""
    out = {}
    for entry in yaml.safe_load((conf / "config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            (key, val), *_ = entry.items()
            if not key.startswith("optional "):
                out[key] = "null" if val is None else str(val)
    return out


def render() -> str:
    sys.path[:0] = [str(ROOT), str(ROOT / "plugins")]
    registry_module = importlib.import_module("comalkit.registry")
    from comalkit.__main__ import load_plugins
    from comalkit.app import CONF_DIR

    load_plugins()
    reg = registry_module.registry
    chosen = defaults(CONF_DIR)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by tools/config_reference.py from the registry's schemas; edit the plugins, not this page. -->",
        "",
        "Every option below is a dataclass registered with `@plugin`; this page is generated from those",
        "dataclasses (types, defaults, `param` limits and help texts), so it lists exactly what the code",
        "accepts. Choose an option with `group=option`, set a key with `group.key=value`, and print the",
        "composed config of any command with `--cfg job`. Values outside a range stop the run before any",
        "work with a message naming the key. Third-party packages add options of their own",
        "([Writing a plugin](writing-a-plugin.md)); `python -m comalkit --help` lists what is installed.",
        "",
        "## Defaults",
        "",
        "| group | default option | options |",
        "|---|---|---|",
    ]
    groups = [g for g in registry_module.PLUGIN_GROUPS if _builtins(reg, g)]
    schema_groups = getattr(registry_module, "SCHEMA_GROUPS", {})
    for group in [*groups, *schema_groups, "experiment"]:
        if group in schema_groups or group == "experiment":
            options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        else:
            options = sorted(_builtins(reg, group))
        out.append(f"| [`{group}`](#{group}) | `{chosen.get(group, 'null')}` | {', '.join(options)} |")
    out += ["", "Top-level key: `seed` (default `0`), the run's seed.", ""]
    for group in groups:
        out += [f"## {group}", "", GROUPS.get(group, ""), ""]
        for name, cls in sorted(_builtins(reg, group).items()):
            out += option_section(group, name, cls)
    for group, (module, cls_name) in schema_groups.items():
        cls = getattr(importlib.import_module(module), cls_name)
        out += [
            f"## {group}",
            "",
            f"Plain YAML files under `conf/{group}/`, checked against `{module}.{cls_name}`: "
            f"{plain(cls.__doc__ or '')} Defaults are those of `{group}={chosen.get(group)}`.",
            "",
            "| file | description |",
            "|---|---|",
            *(
                f"| `{group}={p.stem}` | {cell(yaml_header(p))} |"
                for p in sorted((CONF_DIR / group).glob("*.yaml"))
            ),
            "",
            "| key | type | default | range | help |",
            "|---|---|---|---|---|",
            *rows(cls, preset=yaml.safe_load((CONF_DIR / group / f"{chosen.get(group)}.yaml").read_text())),
            "",
        ]
    out += [
        "## experiment",
        "",
        "Presets under `conf/experiment/` that set several groups at once (`experiment=<name>`); "
        "command-line values win over them.",
        "",
        "| preset | description |",
        "|---|---|",
        *(
            f"| `experiment={p.stem}` | {cell(yaml_header(p))} |"
            for p in sorted((CONF_DIR / "experiment").glob("*.yaml"))
        ),
        "",
    ]
    return "\n".join(out)


def _builtins(reg: Any, group: str) -> dict[str, type]:
    return {
        name: reg.get(group, name)
        for name in reg.names(group)
        if reg.get(group, name).__module__.split(".")[0] in BUILTIN_PACKAGES
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(
                f"{PAGE.relative_to(ROOT)} is out of date: run python tools/config_reference.py",
                file=sys.stderr,
            )
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
