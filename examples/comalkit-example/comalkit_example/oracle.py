"""``oracle=noisy``: another oracle seen through symmetric label noise.

Each judgment of the base oracle is flipped with probability ε, so

    P'(a ≻ b) = (1 − ε) P(a ≻ b) + ε P(b ≻ a) = (1 − 2ε) P(a ≻ b) + ε,

the noise model conservative DPO (``solver=cdpo``, Mitchell 2023) is built for. P' is still a
valid preference (``P'(a ≻ b) + P'(b ≻ a) = 1``, ``P'(a ≻ a) = ½``) and keeps the base's
ranking and Nash policy (an affine map of the matrix that fixes ½), so it tests robustness
to a less decisive judge without changing the game's solution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.registry import ConfigError, instantiate, param, plugin, registry, validate


def build_oracle(spec: dict[str, Any], where: str) -> PreferenceOracle:
    """The oracle ``{oracle: <name>, <its settings>}`` describes, type- and range-checked like a top-level one."""
    settings = dict(spec)
    name = settings.pop("oracle", None)
    if not isinstance(name, str):
        raise ConfigError(f"{where}: expected a key 'oracle' naming an oracle plugin, got {spec}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(registry.schema("oracle", name)), settings)
        validate(OmegaConf.create({"oracle": node}))
    except (ConfigError, OmegaConfBaseException) as exc:
        raise ConfigError(f"{where} (oracle={name}): {exc}") from None
    return instantiate(node)


@plugin("oracle", "noisy")
@dataclass
class NoisyOracle(PreferenceOracle):
    """``P' = (1 − 2ε) P_base + ε`` (see the module docstring)."""

    base: dict[str, Any] = param(
        default_factory=lambda: {"oracle": "llm_judge"},
        help="the judged oracle: {oracle: <name>, <that oracle's settings>}",
    )
    flip: float = param(0.2, ge=0.0, le=0.5, help="ε: the probability that a judgment is flipped")

    def __post_init__(self) -> None:
        self.oracle = build_oracle(self.base, "oracle.base")

    def identity(self) -> str:
        return f"noisy[flip={self.flip!r}]({self.oracle.identity()})"

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        return (1 - 2 * self.flip) * self.oracle.compare(comparisons).double() + self.flip

    def diagnostics(self) -> dict[str, Any]:
        return self.oracle.diagnostics()

    def close(self) -> None:
        self.oracle.close()
