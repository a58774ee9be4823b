"""mkdocs hooks for the documentation site (mkdocs.yml ``hooks:``).

* comalkit's docstrings cross-reference with reST roles (``:func:`check_solver```), which
  mkdocstrings renders as the literal role followed by the code span; drop the role, keep the code.
* A page added to docs/ but not to the ``nav`` of mkdocs.yml is listed under "Guides" (by its
  title), so a new page is never left out of the site's navigation.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(?=<code>)")


def _nav_files(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_nav_files(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_nav_files(v) for v in nav)) if nav else set()
    return set()


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("-", " ").capitalize()


def on_config(config: Any, **kwargs: Any) -> Any:
    nav = config.get("nav")
    if not nav:
        return config
    docs = Path(config["docs_dir"])
    listed = _nav_files(nav)
    missing = sorted(p.relative_to(docs).as_posix() for p in docs.rglob("*.md"))
    missing = [p for p in missing if p not in listed]
    if missing:
        guides = next((item["Guides"] for item in nav if isinstance(item, dict) and "Guides" in item), None)
        if guides is None:
            guides = []
            nav.append({"Guides": guides})
        guides.extend({_title(docs / p): p} for p in missing)
    return config


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub("", html)
