"""Oracle ``llm_judge``: a language model as the judge, in one of two modes.

``likelihood`` (the default): each response is scored by the judge's mean per-token
log-probability given the prompt (chat template applied), s(y) = (1/|y|) Σ_t log p(y_t | x,
y_<t), and P(a ≻ b) = σ((s(a) − s(b)) / T), a Bradley–Terry model. Each distinct response is
scored once per prompt, so a K×K win matrix costs K scored sequences.

``prompted``: the judge reads both responses, quoted between delimiters in a template, and
P(a ≻ b) comes from the logits of the two label tokens, p = softmax(ℓ_A, ℓ_B)_A, as the COMAL
code does with its 8B judge. Every comparison is asked in both orders and averaged,
P(a ≻ b) = ½ [p_A(a, b) + p_B(b, a)], which cancels a constant position bias and makes the
result exactly antisymmetric; position consistency (both orders pick the same winner) is
reported by :meth:`LlmJudge.diagnostics`.

Why likelihood is the default (measured on this project's CPU, docs/oracles.md and
/work/shared/feasibility.md §4): the bundled 135M–270M models are unusable as prompted
judges: they pick the same position 100 % of the time and are at chance after swapping,
while the likelihood mode ranks obvious good/bad pairs correctly (SmolLM2: 12/12 there,
and ≥ 90 % on this package's data/obvious_pairs.jsonl). ``prompted`` is for larger judges.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.judge_prompt import JudgePrompt
from comalkit.registry import ConfigError, param, plugin
from comalkit_plugins.oracles.base import bradley_terry, settings_identity
from comalkit_plugins.oracles.judge_lm import JudgeModelSettings, judge_fingerprint

log = logging.getLogger(__name__)


@plugin("oracle", "llm_judge")
@dataclass
class LlmJudge(JudgeModelSettings, PreferenceOracle):
    """A frozen causal LM judging pairs by likelihood or by prompt (see the module docstring)."""

    mode: str = param("likelihood", choices=("likelihood", "prompted"), help="how the judge decides")
    temperature: float = param(1.0, gt=0.0, help="likelihood: σ(Δs / T) with Δs in nats per token")
    template: str = param("pairwise", help="prompted: template name or file with {prompt}, {a}, {b}")
    labels: list[str] = param(default_factory=lambda: ["A", "B"], help="prompted: the two answer labels")

    def __post_init__(self) -> None:
        if len(self.labels) != 2 or self.labels[0] == self.labels[1]:
            raise ConfigError(f"oracle.labels={self.labels}: expected two different labels, e.g. [A, B]")
        self.prompt_template = JudgePrompt.load(self.template) if self.mode == "prompted" else None
        self._orders = 0
        self._consistent = 0

    def identity(self) -> str:
        if self.prompt_template is None:
            return settings_identity(
                "llm_judge",
                self,
                exclude=("batch_size", "template", "labels"),
                judge=judge_fingerprint(self.judge),
            )
        return settings_identity(
            "llm_judge", self, exclude=("batch_size", "temperature"),
            judge=judge_fingerprint(self.judge), template=self.prompt_template.digest,
        )  # fmt: skip

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        if not comparisons:
            return torch.empty(0, dtype=torch.float64)
        if self.prompt_template is None:
            return bradley_terry(comparisons, self.likelihood_scores, self.temperature)
        first, second = self.both_orders(comparisons)
        self._orders += len(comparisons)
        self._consistent += int(((first > 0.5) == (second > 0.5)).sum())
        return (first + second) / 2

    def both_orders(self, comparisons: Sequence[Comparison]) -> tuple[Tensor, Tensor]:
        """P(a ≻ b) read with ``a`` in the first slot, and with ``a`` in the second slot (prompted mode)."""
        model = self.judge_model()
        label_ids = [model.label_token_ids(label) for label in self.labels]
        texts, truncated = [], 0
        for c in comparisons:
            prompt, _ = model.truncate(model.clean(c.prompt), self.max_prompt_tokens, keep_end=True)
            (a, cut_a), (b, cut_b) = (
                model.truncate(model.clean(r), self.max_response_tokens) for r in (c.a, c.b)
            )
            truncated += cut_a + cut_b
            for x, y in ((a, b), (b, a)):
                texts.append(
                    model.format_prompt(self.prompt_template.render(prompt, x, y), self.system_prompt)
                )
        if truncated:
            log.warning(
                "llm_judge: %d response(s) truncated to %d tokens", truncated, self.max_response_tokens
            )
        self.count_truncated(truncated)
        p_first_label = model.next_token_logprobs(texts, label_ids, self.batch_size).softmax(-1)[:, 0]
        return p_first_label[0::2], 1.0 - p_first_label[1::2]

    def diagnostics(self) -> dict[str, Any]:
        out = self.judge_diagnostics()
        if self.prompt_template is not None:
            out["position_consistency"] = self._consistent / self._orders if self._orders else None
        return out

    def close(self) -> None:
        self.release_judge()
