"""mkdocs hooks for the documentation site (mkdocs.yml ``hooks:``).

comalkit's docstrings cross-reference with reST roles (``:func:`check_solver```), which
mkdocstrings renders as the literal role followed by the code span; drop the role, keep the code.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):(?=<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub("", html)
