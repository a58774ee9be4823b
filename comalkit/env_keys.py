"""API keys live in environment variables; a config only names the variable (docs/oracles.md).

A setting such as ``oracle.api_key_env`` must hold a variable *name*. Someone may paste the
key itself there, so these checks refuse such a value without ever repeating it, and
``python -m comalkit`` applies them to the command line before Hydra writes ``.hydra/*.yaml``
or names the run directory after the overrides.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

#: a POSIX shell variable name
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_key_setting(key: str) -> bool:
    """Whether a config key names a variable that holds a secret (``api_key_env``, ``*_key_env``)."""
    return key.rsplit(".", 1)[-1].endswith("key_env")


def env_name_error(setting: str, name: str) -> str | None:
    """Why ``name`` cannot be the variable holding the key for ``setting``; None when it is set.

    The message never contains ``name``: it may be the key itself.
    """
    if not name:
        return None
    if not ENV_NAME.fullmatch(name):
        return (
            f"{setting} must be the name of the environment variable that holds the key, not the key: "
            f"the value given ({len(name)} characters, not shown) is not a variable name. "
            f"Export the key (export JUDGE_API_KEY=...) and pass {setting}=JUDGE_API_KEY."
        )
    if not os.environ.get(name):
        return (
            f"{setting} names an environment variable that is not set or empty (the value, "
            f"{len(name)} characters, is not shown in case it is the key itself). "
            f"Export the key (export JUDGE_API_KEY=...) and pass {setting}=JUDGE_API_KEY."
        )
    return None


def check_key_overrides(args: Sequence[str]) -> str | None:
    """An error for a command-line override of a key setting whose value names no set variable.

    A sweep (``-m oracle.api_key_env=A,B``) must name set variables only.
    """
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.removeprefix("override ").lstrip("+~").strip()
        if not is_key_setting(key):
            continue
        names = [v.strip().strip("'\"") for v in value.split(",")]
        for name in names if all(ENV_NAME.fullmatch(n) for n in names) else [value]:
            error = env_name_error(key, name)
            if error:
                return f"comalkit: {error}"
    return None
