"""Head-to-head evaluation of policies by a preference oracle: win rates, round robin, heatmap.

The win rate of π_a over π_b is ``P(π_a ≻ π_b) = E_x E_{y_a ~ π_a, y_b ~ π_b} P(y_a ≻ y_b | x)``
(the alignment game of the COMAL paper, ``J(π_a, π_b) = P(π_a ≻ π_b) − ½``). It is estimated
on held-out prompts from already-sampled responses, every response of ``a`` against every
response of ``b`` for the same prompt, and each comparison is judged in both orders,
``½[P(y_a ≻ y_b) + 1 − P(y_b ≻ y_a)]``, which cancels a judge's position bias (as COMAL's
``eval.py`` does). Identical responses count as exactly ½ without asking the oracle.

A Nash policy wins at least half of its games against every policy, so the *minimum* win
rate of a checkpoint against all others is an empirical exploitability: ≥ 50% is what a
policy at the Nash equilibrium of the preference game would show.

Every win rate comes two ways, each with a 95% percentile-bootstrap interval over prompts
(docs/evaluation.md): *soft*, the mean win probability above, and *hard*, the share of prompts a
policy wins (its per-prompt probability above ½, a tie counting ½). A likelihood judge's
probabilities sit near ½, so a policy preferred on every prompt can show a soft rate near 50%;
the hard rate shows it, and the intervals tell a real difference from prompt noise.

Everything here takes responses, not models, so it is tested without sampling; the task
``evaluate`` (plugins) samples the responses and calls :func:`round_robin`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from comalkit.diagnostics import TIE_TOLERANCE
from comalkit.interfaces import Comparison, PreferenceOracle
from comalkit.outputs import atomic_path, atomic_write, write_json

#: responses of one policy: one string per prompt, or a list of samples per prompt
Responses = Sequence[str] | Sequence[Sequence[str]]
#: the percentile bootstrap over prompts: resamples, generator seed and interval level
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95


def as_samples(responses: Responses, num_prompts: int, name: str = "responses") -> list[list[str]]:
    """``responses`` as a list of sample lists, one non-empty list per prompt."""
    if len(responses) != num_prompts:
        raise ValueError(
            f"{name}: {len(responses)} entries for {num_prompts} prompts; expected one per prompt"
        )
    samples = [[r] if isinstance(r, str) else list(r) for r in responses]
    for i, s in enumerate(samples):
        if not s or not all(isinstance(r, str) for r in s):
            raise ValueError(
                f"{name}[{i}]: expected a response string or a non-empty list of strings, got {s!r:.80}"
            )
    return samples


class _Judge:
    """Collects comparisons, asks the oracle once for the distinct ones, and hands back answers."""

    def __init__(self) -> None:
        self.index: dict[tuple[str, str, str], int] = {}

    def ask(self, prompt: str, a: str, b: str) -> int | None:
        """Register ``P(a ≻ b | prompt)``; ``None`` for identical responses (exactly ½)."""
        if a == b:
            return None
        return self.index.setdefault((prompt, a, b), len(self.index))

    def answer(self, oracle: PreferenceOracle) -> list[float]:
        if not self.index:
            return []
        probs = oracle.compare([Comparison(p, a, b) for p, a, b in self.index])
        values = [float(v) for v in torch.as_tensor(probs).reshape(-1)]
        if len(values) != len(self.index):
            raise ValueError(f"the oracle answered {len(values)} of {len(self.index)} comparisons")
        return values


def _questions(
    judge: _Judge, prompts: Sequence[str], a: list[list[str]], b: list[list[str]]
) -> list[list[tuple[int | None, int | None]]]:
    """Per prompt, the (a-vs-b, b-vs-a) question ids of every sample pair."""
    return [
        [(judge.ask(x, ya, yb), judge.ask(x, yb, ya)) for ya in sa for yb in sb]
        for x, sa, sb in zip(prompts, a, b)
    ]


def _resolve(questions: list[list[tuple[int | None, int | None]]], answers: list[float]) -> Tensor:
    """Per-prompt win rates of ``a`` from the question ids and the oracle's answers (float64, [P])."""
    rates = []
    for pairs in questions:
        both = [
            0.5 if ab is None else 0.5 * (answers[ab] + 1.0 - answers[ba])  # type: ignore[index]
            for ab, ba in pairs
        ]
        rates.append(sum(both) / len(both))
    return torch.tensor(rates, dtype=torch.float64)


def prompt_win_rates(
    oracle: PreferenceOracle, prompts: Sequence[str], responses_a: Responses, responses_b: Responses
) -> Tensor:
    """The win rate of ``a`` over ``b`` on each prompt, judged in both orders (float64, [P])."""
    a = as_samples(responses_a, len(prompts), "responses_a")
    b = as_samples(responses_b, len(prompts), "responses_b")
    judge = _Judge()
    questions = _questions(judge, prompts, a, b)
    return _resolve(questions, judge.answer(oracle))


def hard_wins(per_prompt: Tensor) -> Tensor:
    """Per prompt, 1 where ``a`` wins (its win probability above ½), ½ on a tie, 0 where it loses.

    Their mean is the hard win rate; values within :data:`TIE_TOLERANCE` of ½ are ties, so a
    prompt whose two orders cancel up to rounding is not counted as won or lost.
    """
    p = torch.as_tensor(per_prompt, dtype=torch.float64)
    return torch.where((p - 0.5).abs() <= TIE_TOLERANCE, 0.5, (p > 0.5).to(torch.float64))


def bootstrap_ci(
    values: Tensor,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> Tensor:
    """Percentile-bootstrap interval of the mean over the last axis (prompts): ``[..., 2]`` (low, high).

    All rows share one set of resamples drawn from a fixed seed, so the intervals are
    reproducible and those of ``W[a][b]`` and ``W[b][a] = 1 − W[a][b]`` mirror each other. The
    resamples are a ``[resamples, P]`` matrix of counts, and the resampled means one matrix
    product, so a round robin of many pairs costs no loop. ``nan`` without prompts.
    """
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"resamples={resamples} must be >= 1 and level={level} in (0, 1)")
    values = torch.as_tensor(values, dtype=torch.float64)
    num = values.shape[-1]
    if num == 0:
        return torch.full((*values.shape[:-1], 2), math.nan, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(num, (resamples, num), generator=generator)
    weights = torch.zeros(resamples, num, dtype=torch.float64)
    weights.scatter_add_(1, draws, torch.ones(resamples, num, dtype=torch.float64))
    means = values @ weights.T / num  # [..., resamples]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(means, q, dim=-1).movedim(0, -1)


@dataclass(frozen=True)
class WinRate:
    """One head-to-head result: soft and hard win rate of ``a`` over ``b``, each with its interval."""

    soft: float
    soft_ci: tuple[float, float]
    hard: float
    hard_ci: tuple[float, float]
    num_prompts: int

    @classmethod
    def of(cls, per_prompt: Tensor) -> WinRate:
        """Summarise per-prompt win rates (see :func:`prompt_win_rates`); all ``nan`` without prompts."""
        per_prompt = torch.as_tensor(per_prompt, dtype=torch.float64).reshape(-1)
        hard = hard_wins(per_prompt)
        soft_ci, hard_ci = bootstrap_ci(torch.stack([per_prompt, hard])).tolist()
        empty = len(per_prompt) == 0
        return cls(
            soft=math.nan if empty else float(per_prompt.mean()),
            soft_ci=(soft_ci[0], soft_ci[1]),
            hard=math.nan if empty else float(hard.mean()),
            hard_ci=(hard_ci[0], hard_ci[1]),
            num_prompts=len(per_prompt),
        )

    def metrics(self, key: str) -> dict[str, float]:
        """Flat metrics: ``key`` (soft, as before), ``key_low``/``_high``, ``key_hard`` and its interval."""
        return {
            key: self.soft,
            f"{key}_low": self.soft_ci[0],
            f"{key}_high": self.soft_ci[1],
            f"{key}_hard": self.hard,
            f"{key}_hard_low": self.hard_ci[0],
            f"{key}_hard_high": self.hard_ci[1],
        }


def win_rate_stats(
    oracle: PreferenceOracle, prompts: Sequence[str], responses_a: Responses, responses_b: Responses
) -> WinRate:
    """Soft and hard win rate of ``a`` over ``b`` with bootstrap intervals (see :func:`win_rate`)."""
    if not prompts:
        return WinRate.of(torch.zeros(0, dtype=torch.float64))
    return WinRate.of(prompt_win_rates(oracle, prompts, responses_a, responses_b))


def win_rate(
    oracle: PreferenceOracle, prompts: Sequence[str], responses_a: Responses, responses_b: Responses
) -> float:
    """P̂(π_a ≻ π_b): the mean over prompts of :func:`prompt_win_rates` (both orders judged).

    ``responses_a[i]`` / ``responses_b[i]`` answer ``prompts[i]``: a string, or a list of
    samples (all of ``a``'s samples meet all of ``b``'s). ``nan`` when there are no prompts.
    """
    if not prompts:
        return math.nan
    return float(prompt_win_rates(oracle, prompts, responses_a, responses_b).mean())


# ---------------------------------------------------------------------------------------------
# Round robin
# ---------------------------------------------------------------------------------------------
@dataclass
class RoundRobin:
    """Every contestant against every other on the same prompts.

    ``win_rates[i][j]`` = P̂(contestant i ≻ contestant j) (½ on the diagonal,
    ``win_rates[j][i] = 1 − win_rates[i][j]``); ``stderr[i][j]`` its standard error over
    prompts (0 with a single prompt).
    """

    names: list[str]
    win_rates: Tensor
    stderr: Tensor
    num_prompts: int
    samples_per_prompt: int

    def _others(self, i: int) -> list[int]:
        return [j for j in range(len(self.names)) if j != i]

    @property
    def min_win_rate(self) -> dict[str, float]:
        """Each contestant's worst win rate against the others: its empirical exploitability."""
        return {
            n: min(float(self.win_rates[i, j]) for j in self._others(i)) for i, n in enumerate(self.names)
        }

    @property
    def worst_opponent(self) -> dict[str, str]:
        """The opponent each contestant scores its minimum against."""
        return {
            n: self.names[min(self._others(i), key=lambda j: (float(self.win_rates[i, j]), j))]
            for i, n in enumerate(self.names)
        }

    @property
    def mean_win_rate(self) -> dict[str, float]:
        """Each contestant's average win rate against the others (the diagonal excluded)."""
        k = len(self.names)
        return {n: float((self.win_rates[i].sum() - 0.5) / (k - 1)) for i, n in enumerate(self.names)}

    @property
    def least_exploitable(self) -> str:
        """The contestant with the highest minimum win rate (the first one on a tie)."""
        mins = self.min_win_rate
        return max(self.names, key=lambda n: (mins[n], -self.names.index(n)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoints": self.names,
            "win_rates": self.win_rates.tolist(),
            "stderr": self.stderr.tolist(),
            "num_prompts": self.num_prompts,
            "samples_per_prompt": self.samples_per_prompt,
            "min_win_rate": self.min_win_rate,
            "worst_opponent": self.worst_opponent,
            "mean_win_rate": self.mean_win_rate,
            "least_exploitable": self.least_exploitable,
        }

    def to_csv(self) -> str:
        """The matrix as CSV: one row per contestant, one column per opponent, then its summary."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["checkpoint", *self.names, "min_win_rate", "worst_opponent", "mean_win_rate"])
        mins, worst, means = self.min_win_rate, self.worst_opponent, self.mean_win_rate
        for i, n in enumerate(self.names):
            cells = [f"{float(v):.6f}" for v in self.win_rates[i]]
            writer.writerow([n, *cells, f"{mins[n]:.6f}", worst[n], f"{means[n]:.6f}"])
        return out.getvalue()


def round_robin(
    oracle: PreferenceOracle, prompts: Sequence[str], responses: Mapping[str, Responses]
) -> RoundRobin:
    """Judge every pair of contestants on ``prompts`` in both orders; one batched oracle call.

    ``responses`` maps a contestant's name to its responses (see :func:`win_rate`); every
    contestant needs the same number of samples per prompt, and there must be at least two.
    """
    names = list(responses)
    if len(names) < 2:
        raise ValueError(f"a round robin needs at least two contestants, got {names}")
    if not prompts:
        raise ValueError("a round robin needs at least one prompt")
    samples = {n: as_samples(r, len(prompts), f"responses[{n!r}]") for n, r in responses.items()}
    counts = {n: {len(s) for s in v} for n, v in samples.items()}
    if len(set().union(*counts.values())) != 1:
        raise ValueError(f"every contestant needs the same number of samples per prompt, got {counts}")
    judge = _Judge()
    games = {
        (i, j): _questions(judge, prompts, samples[names[i]], samples[names[j]])
        for i in range(len(names))
        for j in range(i + 1, len(names))
    }
    answers = judge.answer(oracle)
    k = len(names)
    rates = torch.full((k, k), 0.5, dtype=torch.float64)
    stderr = torch.zeros((k, k), dtype=torch.float64)
    for (i, j), questions in games.items():
        per_prompt = _resolve(questions, answers)
        rates[i, j], rates[j, i] = per_prompt.mean(), 1.0 - per_prompt.mean()
        if len(per_prompt) > 1:
            stderr[i, j] = stderr[j, i] = per_prompt.std() / math.sqrt(len(per_prompt))
    n = len(next(iter(samples.values()))[0])
    return RoundRobin(names, rates, stderr, len(prompts), n)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def plot_heatmap(result: RoundRobin, path: str | Path) -> Path:
    """An annotated heatmap of the win-rate matrix (row's win rate against column), saved atomically.

    matplotlib is imported here, through its object-oriented API, so no global backend changes.
    """
    from matplotlib.figure import Figure

    k = len(result.names)
    mins = result.min_win_rate
    size = 2.2 + 0.75 * k
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(result.win_rates.numpy(), cmap="RdBu", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="win rate of row vs column")
    for i in range(k):
        for j in range(k):
            value = float(result.win_rates[i, j])
            color = "white" if abs(value - 0.5) > 0.3 else "black"
            ax.text(j, i, "–" if i == j else f"{100 * value:.0f}%", ha="center", va="center", color=color)
    ax.set_xticks(range(k), result.names, rotation=45, ha="right")
    ax.set_yticks(range(k), [f"{n} (min {100 * mins[n]:.0f}%)" for n in result.names])
    ax.set_xlabel("opponent")
    prompts = f"{result.num_prompts} prompt{'s' if result.num_prompts != 1 else ''}"
    ax.set_title(f"round robin on {prompts}, both orders judged", fontsize="medium")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return path


def write_results(
    result: RoundRobin, out_dir: str | Path, extra: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``win_rates.json`` (``extra`` merged in), ``win_rates.csv`` and ``win_rates.png``."""
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / "win_rates.json",
        "csv": out_dir / "win_rates.csv",
        "heatmap": out_dir / "win_rates.png",
    }
    write_json(paths["json"], {**result.to_dict(), **(extra or {})})
    atomic_write(paths["csv"], result.to_csv())
    plot_heatmap(result, paths["heatmap"])
    return paths
