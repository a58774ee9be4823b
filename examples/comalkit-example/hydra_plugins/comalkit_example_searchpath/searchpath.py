"""Puts the example package's YAML config groups (``comalkit_example/conf``) on Hydra's search path.

Hydra discovers every ``SearchPathPlugin`` under the ``hydra_plugins`` namespace package; this
one appends ``pkg://comalkit_example/conf``, so ``experiment=example_preset`` composes as if
``conf/experiment/example_preset.yaml`` were in comalkit's own ``conf/``. Appended, not
prepended: comalkit's own files win on a name clash.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ComalkitExampleSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="comalkit-example", path="pkg://comalkit_example/conf")
