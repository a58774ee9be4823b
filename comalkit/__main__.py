"""``python -m comalkit``: load plugins, check group options, hand over to Hydra."""

from __future__ import annotations

import os
import sys

from comalkit.app import CONF_DIR
from comalkit.registry import closest, registry


def load_plugins() -> None:
    """Load every ``comalkit.plugins`` entry point and store their schemas in Hydra's ConfigStore."""
    registry.load_entry_points()
    registry.store()


def group_options(group: str) -> list[str]:
    """Every option of a config group: registered plugins plus YAML files under ``conf/<group>``."""
    yaml = {p.stem for p in (CONF_DIR / group).glob("*.yaml")} if (CONF_DIR / group).is_dir() else set()
    return sorted(set(registry.names(group)) | yaml)


def check_group_overrides(args: list[str]) -> str | None:
    """An error message for a ``group=option`` override that names no option, before any work starts."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {
        g for g in registry._plugins if registry.names(g)
    }
    for arg in args:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.removeprefix("override ").strip()
        if key not in groups or any(c in value for c in "${}()[]*") or value in ("", "null"):
            continue
        options = group_options(key)
        for name in value.split(","):
            if name not in options:
                return (
                    f"comalkit: unknown {key} '{name}'. Available {key} options: {', '.join(options)}."
                    f"{closest(name, options)}"
                )
    return None


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # never block on a login prompt
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    load_plugins()
    error = check_group_overrides(sys.argv[1:])
    if error:
        print(error, file=sys.stderr)
        sys.exit(2)
    from comalkit.app import hydra_main

    hydra_main()


if __name__ == "__main__":
    main()
