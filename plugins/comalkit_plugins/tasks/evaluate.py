"""Task ``evaluate``: a round robin of checkpoints on held-out prompts, judged by the oracle.

``python -m comalkit experiment=evaluate 'task.checkpoints=[runA,runB/checkpoints/iter_002]'``
samples responses from every checkpoint on the data source's held-out prompts, judges every
pair of checkpoints in both orders (see :mod:`comalkit.evaluate`), and writes soft and hard
win rates with bootstrap intervals to ``win_rates.json``, ``.csv``, ``.md`` and the heatmap
``win_rates.png``.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from comalkit.interfaces import RunContext, Task
from comalkit.outputs import write_json
from comalkit.registry import ConfigError, current_choice, instantiate, param, plugin

log = logging.getLogger("comalkit.evaluate")
#: the name of the untrained model when ``include_initial`` is set
INITIAL = "initial"
#: the untrained model sampled a second time, with the seed after the shared one: the control
CONTROL = "initial-control"
#: the per-cell entries of ``win_rates.json`` left out of ``summary.json`` (which keeps the per-row ones)
MATRICES = (
    "win_rates",
    "win_rates_ci",
    "hard_win_rates",
    "hard_win_rates_ci",
    "stderr",
    "per_prompt_win_rates",
)


def _is_checkpoint(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() or (path / "config.json").is_file()


def resolve_checkpoints(entries: Sequence[str]) -> list[Path]:
    """Expand ``task.checkpoints``: checkpoint directories, run directories, glob patterns.

    A run directory (one with a ``checkpoints/`` folder, as the online loop writes) stands for
    all its checkpoints in order. Raises :class:`ConfigError` naming an entry that matches nothing.
    """
    found: list[Path] = []
    for entry in entries:
        matches = sorted(glob.glob(str(Path(entry).expanduser()))) if glob.has_magic(entry) else [entry]
        if not matches:
            raise ConfigError(f"task.checkpoints: '{entry}' matches no path")
        for match in map(Path, matches):
            if _is_checkpoint(match):
                found.append(match)
            elif (match / "checkpoints").is_dir() and (
                inner := sorted(filter(_is_checkpoint, (match / "checkpoints").iterdir()))
            ):
                found.extend(inner)
            else:
                raise ConfigError(
                    f"task.checkpoints: '{match}' is not a checkpoint (no adapter_config.json or config.json) "
                    "nor a run directory with checkpoints/"
                )
    return list(dict.fromkeys(p.resolve() for p in found))


def short_names(paths: Sequence[Path]) -> list[str]:
    """Distinct labels: each path's shortest unique tail (``checkpoints`` folders left out)."""
    parts = [[p for p in path.parts if p != "checkpoints"] for path in paths]
    depth = 1
    while True:
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names) or depth >= max(map(len, parts)):
            return names
        depth += 1


@plugin("task", "evaluate")
@dataclass
class EvaluateTask(Task):
    """Round-robin win rates of checkpoints on held-out prompts, and each one's minimum (exploitability).

    LoRA checkpoints are loaded onto the configured ``model`` (their base); full checkpoints
    load on their own. Every checkpoint samples with the same seed. With ``include_initial``
    the untrained model is sampled once more with the next seed and judged against itself: the
    control, a measured noise floor (docs/evaluation.md). Sampled responses are saved under
    ``responses/`` and reused when the same command is rerun.
    """

    resumable = True

    checkpoints: list[str] = param(
        default_factory=list, help="checkpoint dirs, run dirs (all their checkpoints) or glob patterns"
    )
    include_initial: bool = param(False, help="add the untrained model (model=...) as contestant 'initial'")
    max_prompts: int | None = param(
        None, ge=1, help="held-out prompts to use (data's eval set); default: all"
    )
    samples_per_prompt: int = param(
        1, ge=1, help="responses per prompt and checkpoint (all pairs are judged)"
    )
    temperature: float = param(0.7, ge=0.0, help="sampling temperature (0: greedy); COMAL's eval uses 0.7")
    top_p: float = param(0.95, gt=0.0, le=1.0, help="nucleus sampling")
    max_new_tokens: int = param(96, ge=1, help="response length limit")
    seed: int | None = param(None, help="sampling seed shared by all checkpoints; default: the run's seed")

    def check(self, cfg: DictConfig) -> None:
        self._contestants()
        self._prompts(cfg)
        instantiate(cfg.oracle)

    def run(self, cfg: DictConfig, run: RunContext) -> dict[str, Any]:
        from comalkit.evaluate import round_robin, win_rate_stats, write_results
        from comalkit.oracle_cache import CachedOracle

        contestants = self._contestants()
        prompts = self._prompts(cfg)
        oracle = CachedOracle(instantiate(cfg.oracle), Path(run.out_dir) / "oracle_cache.sqlite")
        model = instantiate(cfg.model)
        sampler = instantiate(cfg.sampler)
        seed = int(cfg.get("seed", 0)) if self.seed is None else self.seed
        responses = {}
        try:
            for step, (name, path) in enumerate(contestants.items()):
                responses[name] = self._responses(
                    model, sampler, name, path, prompts, seed, Path(run.out_dir)
                )
                lengths = [len(r) for rs in responses[name] for r in rs]
                run.log({"checkpoint": name, "response_chars": sum(lengths) / len(lengths)}, step)
            result = round_robin(oracle, prompts, responses)
            control = None
            if self.include_initial:  # the noise floor: the same untrained model, another seed
                redrawn = self._responses(model, sampler, CONTROL, None, prompts, seed + 1, Path(run.out_dir))
                control = win_rate_stats(oracle, prompts, redrawn, responses[INITIAL])
        finally:
            sampler.close()
            oracle.close()
        sources = {
            n: str(p) if p else f"model={current_choice('model')} (untrained)" for n, p in contestants.items()
        }
        label = f"{INITIAL} sampled with seed {seed + 1} against {INITIAL} with seed {seed}"
        extra = {"sources": sources, "seed": seed}
        paths = write_results(result, run.out_dir, extra=extra, control=control, control_label=label)
        log.info("round robin (row vs column):\n%s", result.to_csv())
        if control is not None:
            log.info("untrained control (%s): %s", label, control.describe())
        summary = {
            **{k: v for k, v in result.to_dict().items() if k not in MATRICES},
            "win_rates_json": str(paths["json"]),
            "win_rates_md": str(paths["markdown"]),
            "heatmap": str(paths["heatmap"]),
        }
        if control is not None:
            summary["control"] = {"label": label, **control.to_dict()}
        summary["oracle"] = oracle.diagnostics()
        return summary

    # -- inputs ---------------------------------------------------------------------------------
    def _contestants(self) -> dict[str, Path | None]:
        paths = resolve_checkpoints(self.checkpoints)
        names = short_names(paths)
        contestants: dict[str, Path | None] = dict(zip(names, paths))
        if self.include_initial:
            for name in (INITIAL, CONTROL):
                if name in contestants:
                    raise ConfigError(
                        f"a checkpoint is named '{name}'; rename it or set task.include_initial=false"
                    )
            contestants = {INITIAL: None, **contestants}
        if len(contestants) < 2:
            raise ConfigError(
                f"evaluation needs at least two contestants, got {list(contestants) or 'none'}: give "
                "task.checkpoints=[dir1,dir2,...] (checkpoint or run directories), or add task.include_initial=true"
            )
        return contestants

    def _prompts(self, cfg: DictConfig) -> list[str]:
        source = instantiate(cfg.data)
        if not hasattr(source, "eval_prompts"):
            raise ConfigError(
                f"data={current_choice('data')} gives no held-out prompts; use data=bundled or data=prompts"
            )
        prompts = source.eval_prompts()
        if not prompts:
            raise ConfigError(
                f"data={current_choice('data')} has no held-out prompts: set data.eval_path=<file> or data.eval_size=<n>"
            )
        return prompts[: self.max_prompts] if self.max_prompts else prompts

    # -- sampling -------------------------------------------------------------------------------
    def _responses(
        self,
        model: Any,
        sampler: Any,
        name: str,
        path: Path | None,
        prompts: list[str],
        seed: int,
        out_dir: Path,
    ) -> list[list[str]]:
        """Sampled responses of one contestant, read back when a rerun asks for the same ones."""
        settings = {
            "source": [str(path), _modified(path)] if path else f"{INITIAL}: {model!r}",
            "n": self.samples_per_prompt,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
            "seed": seed,
            "prompts": prompts,
            "sampler": type(sampler).__name__,
        }
        file = out_dir / "responses" / f"{name.replace('/', '__')}.json"
        if file.is_file():
            saved = json.loads(file.read_text())
            if saved.get("settings") == settings:
                log.info("%s: reusing %s", name, file)
                return saved["responses"]
        log.info("%s: sampling %d x %d responses", name, len(prompts), self.samples_per_prompt)
        policy = load_policy(model, path)
        responses = sampler.sample(
            policy,
            prompts,
            self.samples_per_prompt,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
            progress=name,
        )
        del policy
        gc.collect()
        write_json(file, {"settings": settings, "responses": responses})
        return responses


def load_policy(model: Any, path: Path | None) -> Any:
    """The policy of a contestant: the configured model (``path=None``) or a checkpoint on its base."""
    from comalkit.lm.policy import LMPolicy

    if path is None:
        return model.build()
    base = None
    if (path / "adapter_config.json").is_file():  # a LoRA adapter: load it onto a fresh, bare base model
        bare = without_lora(model).build()
        base = (bare.model, bare.tokenizer)
    return LMPolicy.from_checkpoint(
        path,
        base=base,
        max_length=model.max_length,
        max_prompt_length=model.max_prompt_length,
        truncation=model.truncation,
        device=model.device,
        autocast=model.autocast,
    )


def without_lora(model: Any) -> Any:
    """A copy of a ``model`` plugin whose ``build()`` gives the plain base model (no adapter)."""
    lora = model.lora
    off = (
        dataclasses.replace(lora, enabled=False)
        if dataclasses.is_dataclass(lora)
        else {**lora, "enabled": False}
    )
    return dataclasses.replace(model, lora=off)


def _modified(path: Path) -> float:
    """The latest modification time of a checkpoint's files (a retrained checkpoint is sampled again)."""
    return max((f.stat().st_mtime for f in path.iterdir() if f.is_file()), default=0.0)
