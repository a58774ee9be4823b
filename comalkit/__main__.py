"""``python -m comalkit``: load plugins, check group options, hand over to Hydra."""

from __future__ import annotations

import os
import sys

from comalkit.app import CONF_DIR
from comalkit.env_keys import check_key_overrides
from comalkit.registry import closest, registry


def load_plugins() -> None:
    """Load every ``comalkit.plugins`` entry point and store their schemas in Hydra's ConfigStore."""
    registry.load_entry_points()
    registry.store()


def group_options(group: str) -> list[str]:
    """Every option of a config group: registered plugins plus YAML files under ``conf/<group>``
    and under the config directories that installed packages add through a Hydra SearchPathPlugin."""
    yaml = {p.stem for p in (CONF_DIR / group).glob("*.yaml")} if (CONF_DIR / group).is_dir() else set()
    return sorted(set(registry.names(group)) | yaml | set(searchpath_options(group)))


def searchpath_options(group: str) -> list[str]:
    """The YAML options of ``group`` on Hydra's search path as Hydra builds it (conf/ plus every
    ``hydra_plugins`` SearchPathPlugin, e.g. the example package's ``experiment=example_preset``)."""
    # Hydra 1.3 exposes no public listing outside a running app; these are the classes it uses itself.
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    path = ConfigSearchPathImpl()
    path.append("main", f"file://{CONF_DIR}")
    for cls in Plugins.instance().discover(SearchPathPlugin):
        cls().manipulate_search_path(path)
    repo = ConfigRepository(path)
    return repo.get_group_options(group) if repo.group_exists(group) else []


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
    # before Hydra writes .hydra/*.yaml or names the run directory: a pasted key must not be kept
    error = check_key_overrides(sys.argv[1:]) or check_group_overrides(sys.argv[1:])
    if error:
        print(error, file=sys.stderr)
        sys.exit(2)
    from comalkit.app import EXIT_CONFIG, hydra_main

    try:
        hydra_main()
    except SystemExit as exc:
        # Hydra reports a composition error (a wrong type, an unknown key) itself, then exits 1;
        # comalkit's own errors exit with their code from inside the job
        sys.exit(EXIT_CONFIG if exc.code == 1 and not _job_started() else exc.code)
    except KeyboardInterrupt:
        print("comalkit: interrupted before the run started; nothing was written", file=sys.stderr)
        sys.exit(130)


def _job_started() -> bool:
    from comalkit import app

    return app.JOB_STARTED


if __name__ == "__main__":
    main()
