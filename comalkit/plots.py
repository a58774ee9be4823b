"""Figures: metric curves of game runs (the paper's Figure 1), simplex trajectories (Figure 3),
and the per-iteration progress of an online run.

matplotlib is imported lazily and only through its object-oriented API (``Figure`` and the
Agg canvas), so no global backend is changed and nothing needs a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Values below this are drawn at this level on log axes (a gap of exactly 0 has no logarithm).
LOG_FLOOR = 1e-16
#: Curves beyond this many per figure are summarised by their median and range.
MAX_CURVES = 12


@dataclass
class Curve:
    """One line of a figure: a label and the y values at steps x, with an optional interval band."""

    label: str
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None


def _figure(width: float = 6.4, height: float = 4.2, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def _save(fig, path: str | Path, dpi: int = 150) -> Path:
    from comalkit.outputs import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)
    return path


def plot_curves(
    curves: Sequence[Curve],
    path: str | Path,
    *,
    ylabel: str = "duality gap",
    title: str = "",
    log: bool = True,
) -> Path:
    """Draw ``curves`` against iteration on one axis (log-scale y by default) and save to ``path``.

    More than :data:`MAX_CURVES` curves sharing the same x are drawn as a median with a
    min-max band, so a batch of thousands of games stays readable.
    """
    fig = _figure()
    ax = fig.add_subplot()
    if len(curves) > MAX_CURVES and all(np.array_equal(c.x, curves[0].x) for c in curves):
        ys = np.stack([c.y for c in curves])
        ys = np.maximum(ys, LOG_FLOOR) if log else ys
        ax.fill_between(curves[0].x, ys.min(0), ys.max(0), alpha=0.3, label=f"range over {len(curves)} games")
        ax.plot(curves[0].x, np.median(ys, 0), label="median")
    else:
        for c in curves:
            (line,) = ax.plot(c.x, np.maximum(c.y, LOG_FLOOR) if log else c.y, label=c.label, linewidth=1.5)
            if c.low is not None and c.high is not None:
                ax.fill_between(c.x, c.low, c.high, color=line.get_color(), alpha=0.15, linewidth=0)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if any(c.label for c in curves):
        ax.legend(fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    return _save(fig, path)


#: The panels of :func:`plot_progress`: a title and the metrics drawn in it. A metric with
#: ``<key>_low`` and ``<key>_high`` in the rows is drawn with its interval as a band.
PROGRESS_PANELS = (
    ("win rate, soft (held-out)", ("win_rate/initial", "win_rate/previous", "win_rate/control")),
    ("win rate, hard: share of prompts won", ("win_rate/initial_hard", "win_rate/control_hard")),
    ("oracle cycle rate (sampled triples)", ("oracle/cycle_rate",)),
    ("loss (last training step)", ("loss",)),
    ("reward margin (last training step)", ("rewards/margins",)),
    ("KL to reference (estimate)", ("kl_to_reference",)),
)
#: how the untrained control is drawn: a grey line and band, the noise floor behind the curves
CONTROL_STYLE = {"color": "0.45", "linestyle": "--", "marker": None, "linewidth": 1.2}


def _points(rows: Sequence[dict], x: Sequence[int], key: str) -> list[tuple[int, float]]:
    return [(xi, row[key]) for xi, row in zip(x, rows) if isinstance(row.get(key), (int, float))]


def plot_progress(rows: Sequence[dict], path: str | Path) -> Path:
    """A 2×3 overview of an online run, one point per iteration (rows as in ``metrics.jsonl``).

    Rewritten after every iteration, so a long run can be watched as a picture; metrics a run
    does not produce (win rates with ``task.eval_prompts=0``, the cycle rate with fewer than
    three samples per prompt) leave their panel empty. Win rates carry their bootstrap
    intervals as bands, and the untrained control (``win_rate/control``, the same policy drawn
    with another seed; docs/evaluation.md) is a grey dashed line with its band: a curve inside
    that band is not told apart from sampling noise. A dotted vertical line marks each move of
    the reference μ (rows with ``reference_moved``), i.e. the end of a COMAL round. The layout
    is fixed rather than computed, which keeps a redraw cheap.
    """
    from matplotlib.ticker import MaxNLocator

    fig = _figure(13.0, 6.4, layout=None)
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.09, top=0.93, wspace=0.25, hspace=0.42)
    x = [row.get("iteration", i) + 1 for i, row in enumerate(rows)]
    moves = [xi + 0.5 for xi, row in zip(x, rows) if row.get("reference_moved")]
    for i, (title, keys) in enumerate(PROGRESS_PANELS):
        ax = fig.add_subplot(2, 3, i + 1)
        for key in keys:
            points = _points(rows, x, key)
            if not points:
                continue
            control = key.startswith("win_rate/control")
            style = CONTROL_STYLE if control else {"marker": "o"}
            (line,) = ax.plot(*zip(*points), label=key, **style)
            low, high = dict(_points(rows, x, f"{key}_low")), dict(_points(rows, x, f"{key}_high"))
            band = [(xi, low[xi], high[xi]) for xi, _ in points if xi in low and xi in high]
            if band:
                bx, lo, hi = zip(*band)
                color = line.get_color()
                ax.fill_between(bx, lo, hi, color=color, alpha=0.15 if control else 0.2, linewidth=0)
        for n, move in enumerate(moves):
            ax.axvline(
                move, color="tab:purple", linestyle=":", linewidth=1.2, label="μ ← π" if n == 0 else None
            )
        if keys[0].startswith("win_rate"):
            ax.axhline(0.5, color="grey", linestyle="-", linewidth=0.6)
        if (keys[0].startswith("win_rate") or (i == 3 and moves)) and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    return _save(fig, path, dpi=100)


def _barycentric(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points of the 2-simplex in the plane: vertices at (0, 0), (1, 0) and (½, √3/2)."""
    return p[..., 1] + 0.5 * p[..., 2], (np.sqrt(3) / 2) * p[..., 2]


def _simplex_axes(ax, labels: Sequence[str]) -> None:
    """The triangle with its vertices named, on an axis without frame."""
    corners = np.eye(3)
    cx, cy = _barycentric(np.r_[corners, corners[:1]])
    ax.plot(cx, cy, color="0.3", linewidth=1)
    offsets = [(-0.04, -0.05), (0.04, -0.05), (0, 0.04)]
    for x, y, name, (dx, dy) in zip(cx[:3], cy[:3], labels, offsets):
        ax.annotate(name, (x + dx, y + dy), ha="center", va="center")
    ax.set_aspect("equal")
    ax.set_xlim(-0.1, 1.1)
    ax.set_ylim(-0.1, 0.97)
    ax.axis("off")


def _mark_nash(ax, nash: np.ndarray) -> None:
    nx, ny = _barycentric(nash)
    ax.plot(nx, ny, "*", color="tab:red", markersize=14, label="π* (Nash)", zorder=4)


def plot_simplex(
    policies: np.ndarray,
    nash: np.ndarray,
    path: str | Path,
    *,
    labels: Sequence[str] = ("y1", "y2", "y3"),
    titles: Sequence[str] = (),
) -> Path:
    """Trajectories of 3-response policies on the simplex, π* marked (the paper's Figure 3).

    ``policies`` is ``[R, 3]`` for one game or ``[R, G, 3]`` for G games (one panel each, at
    most 4); ``nash`` is ``[3]`` or ``[G, 3]``. Colour runs from early (dark) to late (light).
    """
    policies = np.asarray(policies, dtype=float)
    policies = policies[:, None] if policies.ndim == 2 else policies
    nash = np.broadcast_to(np.asarray(nash, dtype=float), policies.shape[1:])
    games = min(policies.shape[1], 4)
    fig = _figure(4.2 * games, 4.0)
    axes = fig.subplots(1, games, squeeze=False)[0]
    for g, ax in enumerate(axes):
        _simplex_axes(ax, labels)
        x, y = _barycentric(policies[:, g])
        ax.scatter(x, y, c=np.linspace(0, 1, len(x)), cmap="viridis", s=4, zorder=2)
        ax.plot(x, y, color="0.5", linewidth=0.5, alpha=0.6, zorder=1)
        ax.plot(x[0], y[0], "o", color="tab:blue", markersize=7, label="start", zorder=3)
        ax.plot(x[-1], y[-1], "s", color="tab:orange", markersize=6, label="last iterate", zorder=3)
        _mark_nash(ax, nash[g])
        if g < len(titles):
            ax.set_title(titles[g])
    axes[0].legend(loc="upper left", fontsize="small")
    return _save(fig, path)


def plot_simplex_paths(
    paths: Sequence[tuple[str, np.ndarray]],
    nash: np.ndarray,
    path: str | Path,
    *,
    labels: Sequence[str] = ("y1", "y2", "y3"),
) -> Path:
    """Several runs' trajectories (``(label, [R, 3])``) on one simplex of the same game, π* marked."""
    fig = _figure(6.0, 5.2)
    ax = fig.add_subplot()
    _simplex_axes(ax, labels)
    for label, policies in paths:
        x, y = _barycentric(np.asarray(policies, dtype=float))
        (line,) = ax.plot(x, y, linewidth=1, alpha=0.8, label=label)
        ax.plot(x[-1], y[-1], "s", color=line.get_color(), markersize=5)
    x0, y0 = _barycentric(np.asarray(paths[0][1][0], dtype=float))
    ax.plot(x0, y0, "o", color="k", markersize=6, label="start", zorder=3)
    _mark_nash(ax, np.asarray(nash, dtype=float))
    ax.legend(loc="upper left", fontsize="x-small")
    return _save(fig, path)
