"""comalkit: convergent meta-alignment (COMAL) of language models with general preferences."""

from comalkit.registry import instantiate, param, plugin, registry

__all__ = ["instantiate", "param", "plugin", "registry"]
__version__ = "0.1.0"
