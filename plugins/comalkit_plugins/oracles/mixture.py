"""Oracle ``mixture``: a weighted mixture of preference oracles, P = Σ_k w_k P_k.

The final setting of the COMAL paper (Liu et al., 2025, "COMAL: A Convergent Meta-Algorithm
for Aligning LLMs with General Preferences", §5) judges with a mixture of two Bradley–Terry
reward models. Each component alone is transitive, yet the mixture need not be: with three
rankings a≻b≻c, b≻c≻a and c≻a≻b weighted equally, every pair is won 2:1 around a cycle,
which no single Bradley–Terry model can express (tests/test_oracles.py proves it). Such a
general preference is where Nash-seeking methods like COMAL differ from reward maximisation.

Components are other oracle plugins, given by name and settings::

    oracle=mixture oracle.components='[{oracle: rule, weight: 2, kind: longer},
                                       {oracle: reward_model, weight: 1}]'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.registry import ConfigError, instantiate, param, plugin, registry, validate

#: Two Bradley–Terry reward models on the bundled judge that value different things.
DEFAULT_COMPONENTS = [
    {
        "oracle": "reward_model",
        "weight": 0.5,
        "system_prompt": "You are a helpful assistant. Give correct, complete and well-explained answers.",
    },
    {
        "oracle": "reward_model",
        "weight": 0.5,
        "system_prompt": "You are a concise assistant. Answer in as few words as possible.",
    },
]


def build_component(index: int, spec: dict[str, Any]) -> tuple[PreferenceOracle, float]:
    """One component oracle and its weight from ``{oracle: name, weight: w, <its settings>}``."""
    where = f"oracle.components[{index}]"
    settings = dict(spec)
    name, weight = settings.pop("oracle", None), settings.pop("weight", 1.0)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: expected a key 'oracle' naming an oracle plugin, got {spec}")
    if name == "mixture":
        raise ConfigError(f"{where}: a mixture cannot contain a mixture; list its components instead")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise ConfigError(f"{where}.weight={weight!r}: expected a number > 0")
    try:
        node = OmegaConf.merge(OmegaConf.structured(registry.schema("oracle", name)), settings)
        validate(OmegaConf.create({"oracle": node}))
    except (ConfigError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{where} (oracle={name}): {exc}") from None
    return instantiate(node), float(weight)


@plugin("oracle", "mixture")
@dataclass
class MixtureOracle(PreferenceOracle):
    """P(a ≻ b) = Σ_k w_k P_k(a ≻ b) / Σ_k w_k over component oracles (see the module docstring)."""

    components: list[dict[str, Any]] = param(
        default_factory=lambda: [dict(c) for c in DEFAULT_COMPONENTS],
        help="list of {oracle: <name>, weight: <w>, <that oracle's settings>}",
    )

    def __post_init__(self) -> None:
        if not self.components:
            raise ConfigError("oracle.components is empty; a mixture needs at least one component")
        built = [build_component(i, dict(spec)) for i, spec in enumerate(self.components)]
        self.oracles = [oracle for oracle, _ in built]
        total = sum(w for _, w in built)
        self.weights = [w / total for _, w in built]

    def identity(self) -> str:
        parts = ", ".join(f"{w!r}*{o.identity()}" for o, w in zip(self.oracles, self.weights))
        return f"mixture[{parts}]"

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        out = torch.zeros(len(comparisons), dtype=torch.float64)
        for oracle, weight in zip(self.oracles, self.weights):
            out += weight * oracle.compare(comparisons).double()
        return out

    def close(self) -> None:
        for oracle in self.oracles:
            oracle.close()
