"""Oracle ``reward_model``: a Bradley–Terry preference from a scalar reward, σ((r(a) − r(b)) / T).

The reward is either a sequence-classification reward model with one output (``scorer:
classifier``, any local Hugging Face directory, as used for RLHF reward models) or the
likelihood score of a judge LM (``scorer: likelihood``, the mean per-token log-prob of
:mod:`~comalkit_plugins.oracles.llm_judge`). Each distinct response is scored once per prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.registry import ConfigError, param, plugin
from comalkit_plugins.oracles.base import bradley_terry, settings_identity
from comalkit_plugins.oracles.judge_lm import JudgeModelSettings, judge_fingerprint

log = logging.getLogger(__name__)


class ClassifierReward:
    """A sequence-classification model with a single output, read as the reward of (prompt, response)."""

    def __init__(self, path: str, dtype: str = "float32") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from comalkit.lm.loading import resolve_dtype
        from comalkit.lm.quiet import quiet_progress_bars
        from comalkit.lm.tokens import ensure_pad_token

        with quiet_progress_bars():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=resolve_dtype(dtype), local_files_only=True
            )
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"oracle.path={path}: a reward model has one output, this one has num_labels={self.model.config.num_labels}"
            )
        ensure_pad_token(self.tokenizer, self.model)
        self.model.eval()

    def text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return f"{prompt}\n\n{response}"

    def scores(
        self, prompt: str, responses: list[str], max_tokens: int, batch_size: int
    ) -> tuple[Tensor, int]:
        texts = [self.text(prompt, r) for r in responses]
        truncated = sum(len(self.tokenizer(t)["input_ids"]) > max_tokens for t in texts)
        if truncated:
            log.warning("reward_model: %d input(s) truncated to %d tokens", truncated, max_tokens)
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                truncation=True,
                max_length=max_tokens,
                padding=True,
                return_tensors="pt",
            )
            with torch.inference_mode():
                out.append(self.model(**batch).logits[:, 0].double())
        return torch.cat(out), truncated


@plugin("oracle", "reward_model")
@dataclass
class RewardModelOracle(JudgeModelSettings, PreferenceOracle):
    """Bradley–Terry on a scalar reward (see the module docstring)."""

    scorer: str = param(
        "likelihood", choices=("likelihood", "classifier"), help="where the reward comes from"
    )
    path: str = param(
        "", help="scorer=classifier: local HF dir of a sequence-classification model with one output"
    )
    temperature: float = param(1.0, gt=0.0, help="σ(Δr / T)")

    def __post_init__(self) -> None:
        self.check_engine()
        if self.scorer == "likelihood":
            self.check_judge(self.judge)
        if self.scorer == "classifier" and not self.path:
            raise ConfigError("oracle.path is empty; scorer=classifier needs a reward model directory")
        self._classifier: ClassifierReward | None = None

    def identity(self) -> str:
        if self.scorer == "classifier":
            return settings_identity(
                "reward_model",
                self,
                exclude=("batch_size", "engine_memory", "judge", "system_prompt"),
                path=judge_fingerprint(self.path),
            )
        return settings_identity(
            "reward_model",
            self,
            exclude=("batch_size", "engine_memory", "path"),
            judge=judge_fingerprint(self.judge),
        )

    def scores(self, prompt: str, responses: list[str]) -> Tensor:
        """The reward of each response to ``prompt``."""
        if self.scorer == "likelihood":
            return self.likelihood_scores(prompt, responses)
        if self._classifier is None:
            self._classifier = ClassifierReward(self.path, self.dtype)
        scores, truncated = self._classifier.scores(
            prompt, responses, self.max_prompt_tokens + self.max_response_tokens, self.batch_size
        )
        self.count_truncated(truncated)
        return scores

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        return bradley_terry(comparisons, self.scores, self.temperature)

    def diagnostics(self) -> dict[str, Any]:
        return self.judge_diagnostics()

    def close(self) -> None:
        self.release_judge()
        self._classifier = None
