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
from dataclasses import dataclass, field
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


def bootstrap_means(
    values: Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> Tensor:
    """Means of ``values`` over the last axis (prompts) in each bootstrap resample: ``[..., resamples]``.

    All rows share one set of resamples drawn from a fixed seed, so the result is reproducible
    and a statistic of several rows (a round robin's minimum over opponents) can be taken per
    resample. The resamples are a ``[resamples, P]`` matrix of counts and the means one matrix
    product, so a round robin of many pairs costs no loop. ``nan`` without prompts.
    """
    if resamples < 1:
        raise ValueError(f"resamples={resamples}: expected at least 1 bootstrap resample")
    values = torch.as_tensor(values, dtype=torch.float64)
    num = values.shape[-1]
    if num == 0:
        return torch.full((*values.shape[:-1], resamples), math.nan, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(num, (resamples, num), generator=generator)
    weights = torch.zeros(resamples, num, dtype=torch.float64)
    weights.scatter_add_(1, draws, torch.ones(resamples, num, dtype=torch.float64))
    return values @ weights.T / num


def percentile_interval(means: Tensor, level: float = CI_LEVEL) -> Tensor:
    """The central ``level`` percentile interval over the last axis (resamples): ``[..., 2]`` (low, high).

    Linear interpolation between order statistics is symmetric, so the interval of ``1 − x``
    is ``1 − `` that of ``x`` reversed: those of ``W[a][b]`` and ``W[b][a]`` mirror each other.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level}: expected an interval level in (0, 1), e.g. 0.95")
    means = torch.as_tensor(means, dtype=torch.float64)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(means, q, dim=-1).movedim(0, -1)


def bootstrap_ci(
    values: Tensor,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = CI_LEVEL,
) -> Tensor:
    """Percentile-bootstrap interval of the mean over the last axis (prompts): ``[..., 2]`` (low, high).

    See :func:`bootstrap_means` and :func:`percentile_interval`; ``nan`` without prompts.
    """
    if not 0 < level < 1:  # checked before any resampling
        raise ValueError(f"level={level}: expected an interval level in (0, 1), e.g. 0.95")
    return percentile_interval(bootstrap_means(values, resamples, seed), level)


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "soft": self.soft,
            "soft_ci": list(self.soft_ci),
            "hard": self.hard,
            "hard_ci": list(self.hard_ci),
            "num_prompts": self.num_prompts,
        }

    def describe(self) -> str:
        """``soft 0.50 [0.45, 0.55], hard 0.50 [0.38, 0.62]``."""
        return f"soft {_cell(self.soft, self.soft_ci)}, hard {_cell(self.hard, self.hard_ci)}"

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
def _pairs(values: Tensor) -> list[list[float]]:
    """A ``[..., 2]`` interval tensor as nested ``[low, high]`` lists (JSON)."""
    return values.tolist()


@dataclass
class RoundRobin:
    """Every contestant against every other on the same prompts.

    ``per_prompt[i][j][p]`` is P̂(contestant i ≻ contestant j | prompt p), judged in both orders
    (½ on the diagonal, ``per_prompt[j][i] = 1 − per_prompt[i][j]``). Everything else is derived
    from it: the soft matrix ``win_rates`` (its mean over prompts), the hard matrix
    ``hard_win_rates`` (the share of prompts won, :func:`hard_wins`), ``stderr`` over prompts,
    and 95% percentile-bootstrap intervals over prompts of every cell and of every
    contestant's minimum (docs/evaluation.md).
    """

    names: list[str]
    per_prompt: Tensor
    samples_per_prompt: int
    win_rates: Tensor = field(init=False)
    hard_win_rates: Tensor = field(init=False)
    stderr: Tensor = field(init=False)
    #: ``[k, k, 2]``: the interval of each cell of ``win_rates`` / ``hard_win_rates``
    win_rates_ci: Tensor = field(init=False)
    hard_win_rates_ci: Tensor = field(init=False)
    #: ``[k, 2]``: the interval of each row's minimum over its opponents, soft / hard
    min_ci: Tensor = field(init=False)
    hard_min_ci: Tensor = field(init=False)

    def __post_init__(self) -> None:
        soft = torch.as_tensor(self.per_prompt, dtype=torch.float64)
        k = len(self.names)
        if soft.ndim != 3 or soft.shape[:2] != (k, k) or soft.shape[2] == 0:
            raise ValueError(
                f"per_prompt: expected shape [{k}, {k}, prompts >= 1] for {k} contestants, "
                f"got {tuple(soft.shape)}"
            )
        self.per_prompt = soft
        hard = hard_wins(soft)
        both = torch.stack([soft, hard])  # [2, k, k, P]
        self.win_rates, self.hard_win_rates = both.mean(-1).unbind(0)
        num = soft.shape[-1]
        self.stderr = soft.std(-1) / math.sqrt(num) if num > 1 else torch.zeros(k, k, dtype=torch.float64)
        means = bootstrap_means(both)  # [2, k, k, R], the same resamples for every cell
        self.win_rates_ci, self.hard_win_rates_ci = percentile_interval(means).unbind(0)
        off_diagonal = torch.eye(k, dtype=torch.bool)[None, :, :, None]
        minima = means.masked_fill(off_diagonal, math.inf).amin(dim=2)  # [2, k, R]
        self.min_ci, self.hard_min_ci = percentile_interval(minima).unbind(0)

    @property
    def num_prompts(self) -> int:
        return int(self.per_prompt.shape[-1])

    def _others(self, i: int) -> list[int]:
        return [j for j in range(len(self.names)) if j != i]

    def _min(self, matrix: Tensor) -> dict[str, float]:
        return {n: min(float(matrix[i, j]) for j in self._others(i)) for i, n in enumerate(self.names)}

    @property
    def min_win_rate(self) -> dict[str, float]:
        """Each contestant's worst (soft) win rate against the others: its empirical exploitability."""
        return self._min(self.win_rates)

    @property
    def min_hard_win_rate(self) -> dict[str, float]:
        """Each contestant's worst hard win rate (share of prompts won) against the others."""
        return self._min(self.hard_win_rates)

    @property
    def min_win_rate_ci(self) -> dict[str, tuple[float, float]]:
        """The bootstrap interval of :attr:`min_win_rate`: the minimum is taken in every resample."""
        return {n: (float(lo), float(hi)) for n, (lo, hi) in zip(self.names, self.min_ci)}

    @property
    def min_hard_win_rate_ci(self) -> dict[str, tuple[float, float]]:
        return {n: (float(lo), float(hi)) for n, (lo, hi) in zip(self.names, self.hard_min_ci)}

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

    def head_to_head(self, a: str, b: str) -> WinRate:
        """The result of ``a`` against ``b`` with both intervals, as the online loop logs it."""
        i, j = self.names.index(a), self.names.index(b)
        return WinRate(
            soft=float(self.win_rates[i, j]),
            soft_ci=tuple(self.win_rates_ci[i, j].tolist()),  # type: ignore[arg-type]
            hard=float(self.hard_win_rates[i, j]),
            hard_ci=tuple(self.hard_win_rates_ci[i, j].tolist()),  # type: ignore[arg-type]
            num_prompts=self.num_prompts,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoints": self.names,
            "win_rates": self.win_rates.tolist(),
            "win_rates_ci": _pairs(self.win_rates_ci),
            "hard_win_rates": self.hard_win_rates.tolist(),
            "hard_win_rates_ci": _pairs(self.hard_win_rates_ci),
            "stderr": self.stderr.tolist(),
            "per_prompt_win_rates": self.per_prompt.tolist(),
            "num_prompts": self.num_prompts,
            "samples_per_prompt": self.samples_per_prompt,
            "interval": {
                "level": CI_LEVEL,
                "method": "percentile bootstrap over prompts",
                "resamples": BOOTSTRAP_RESAMPLES,
                "seed": BOOTSTRAP_SEED,
            },
            "min_win_rate": self.min_win_rate,
            "min_win_rate_ci": {n: list(v) for n, v in self.min_win_rate_ci.items()},
            "min_hard_win_rate": self.min_hard_win_rate,
            "min_hard_win_rate_ci": {n: list(v) for n, v in self.min_hard_win_rate_ci.items()},
            "worst_opponent": self.worst_opponent,
            "mean_win_rate": self.mean_win_rate,
            "least_exploitable": self.least_exploitable,
        }

    def to_csv(self) -> str:
        """The soft matrix as CSV, one row per contestant, then its minimum (with interval) and summary."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        summary = ["min_win_rate", "min_win_rate_low", "min_win_rate_high", "worst_opponent"]
        writer.writerow(["checkpoint", *self.names, *summary, "mean_win_rate", "min_hard_win_rate"])
        mins, worst, means = self.min_win_rate, self.worst_opponent, self.mean_win_rate
        ci, hard = self.min_win_rate_ci, self.min_hard_win_rate
        for i, n in enumerate(self.names):
            cells = [f"{float(v):.6f}" for v in self.win_rates[i]]
            low, high = ci[n]
            row = [n, *cells, f"{mins[n]:.6f}", f"{low:.6f}", f"{high:.6f}", worst[n]]
            writer.writerow([*row, f"{means[n]:.6f}", f"{hard[n]:.6f}"])
        return out.getvalue()

    def to_markdown(self, control: WinRate | None = None, control_label: str = "control") -> str:
        """Both matrices as Markdown tables, each cell ``value [low, high]``, then each row's minimum.

        ``control`` (the untrained policy redrawn with another seed, against itself) is written
        under the tables as the noise floor the cells are to be read against."""
        lines = [
            f"{self.num_prompts} prompts × {self.samples_per_prompt} sample(s), both orders judged; "
            f"{100 * CI_LEVEL:.0f}% percentile-bootstrap intervals over prompts.",
            "",
        ]
        tables = (
            (
                "soft win rate (mean win probability), row vs column",
                self.win_rates,
                self.win_rates_ci,
                self.min_win_rate,
                self.min_win_rate_ci,
            ),
            (
                "hard win rate (share of prompts won), row vs column",
                self.hard_win_rates,
                self.hard_win_rates_ci,
                self.min_hard_win_rate,
                self.min_hard_win_rate_ci,
            ),
        )
        for title, matrix, ci, mins, min_ci in tables:
            lines += [f"**{title}**", "", "| row vs column | " + " | ".join(self.names) + " | min |"]
            lines.append("|---" * (len(self.names) + 2) + "|")
            for i, n in enumerate(self.names):
                cells = [
                    "–" if i == j else _cell(float(matrix[i, j]), ci[i, j].tolist())
                    for j in range(len(self.names))
                ]
                lines.append(f"| {n} | " + " | ".join(cells) + f" | {_cell(mins[n], min_ci[n])} |")
            lines.append("")
        if control is not None:
            lines += [
                f"**untrained control** ({control_label}): {control.describe()}. An unchanged policy "
                "scores this against itself from sampling noise alone; cells within it are not told apart.",
                "",
            ]
        return "\n".join(lines)


def _cell(value: float, interval: Sequence[float], sep: str = " ") -> str:
    return f"{value:.2f}{sep}[{interval[0]:.2f}, {interval[1]:.2f}]"


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
    per_prompt = torch.full((k, k, len(prompts)), 0.5, dtype=torch.float64)
    for (i, j), questions in games.items():
        rates = _resolve(questions, answers)
        per_prompt[i, j], per_prompt[j, i] = rates, 1.0 - rates
    n = len(next(iter(samples.values()))[0])
    return RoundRobin(names, per_prompt, n)


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------
def plot_heatmap(result: RoundRobin, path: str | Path, control: WinRate | None = None) -> Path:
    """Annotated heatmaps of the soft and the hard win-rate matrix (row against column), saved atomically.

    Each cell shows its value and its bootstrap interval; each row label its minimum with the
    minimum's interval. matplotlib is imported here, through its object-oriented API, so no
    global backend changes.
    """
    from matplotlib.figure import Figure

    k = len(result.names)
    size = 2.4 + 1.0 * k
    fig = Figure(figsize=(2 * size + 2.4, size), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (
        (
            "soft: mean win probability",
            result.win_rates,
            result.win_rates_ci,
            result.min_win_rate,
            result.min_win_rate_ci,
        ),
        (
            "hard: share of prompts won",
            result.hard_win_rates,
            result.hard_win_rates_ci,
            result.min_hard_win_rate,
            result.min_hard_win_rate_ci,
        ),
    )
    fontsize = "small" if k <= 5 else "x-small"
    for ax, (title, matrix, ci, mins, min_ci) in zip(axes, panels):
        image = ax.imshow(matrix.numpy(), cmap="RdBu", vmin=0.0, vmax=1.0)
        for i in range(k):
            for j in range(k):
                value = float(matrix[i, j])
                color = "white" if abs(value - 0.5) > 0.3 else "black"
                text = "–" if i == j else _cell(value, ci[i, j].tolist(), "\n")
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=fontsize)
        ax.set_xticks(range(k), result.names, rotation=45, ha="right")
        ax.set_yticks(range(k), [f"{n}\nmin {_cell(mins[n], min_ci[n])}" for n in result.names])
        ax.set_xlabel("opponent")
        ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=axes, label="win rate of row vs column", shrink=0.8)
    prompts = f"{result.num_prompts} prompt{'s' if result.num_prompts != 1 else ''}"
    title = f"round robin on {prompts}, both orders judged; {100 * CI_LEVEL:.0f}% bootstrap intervals over prompts"
    if control is not None:
        title += f"\nuntrained control (same policy, another seed): {control.describe()}"
    fig.suptitle(title, fontsize="medium")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    return path


def write_results(
    result: RoundRobin,
    out_dir: str | Path,
    extra: Mapping[str, Any] | None = None,
    control: WinRate | None = None,
    control_label: str = "control",
) -> dict[str, Path]:
    """Write ``win_rates.json`` (``extra`` merged in), ``.csv``, ``.md`` and the heatmap ``.png``.

    ``control``, the untrained control's result, goes to the JSON (as ``control``), under the
    Markdown tables and into the heatmap's title."""
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / "win_rates.json",
        "csv": out_dir / "win_rates.csv",
        "markdown": out_dir / "win_rates.md",
        "heatmap": out_dir / "win_rates.png",
    }
    data = {**result.to_dict(), **(extra or {})}
    if control is not None:
        data["control"] = {"label": control_label, **control.to_dict()}
    write_json(paths["json"], data)
    atomic_write(paths["csv"], result.to_csv())
    atomic_write(paths["markdown"], result.to_markdown(control, control_label))
    plot_heatmap(result, paths["heatmap"], control)
    return paths
