"""The COMAL meta-loop on a language model: sample, judge, pair, log-probs, train, move the reference.

Each iteration ``k`` runs six stages and saves what each produced under
``<run>/iterations/<k>/`` with atomic writes, so a killed run resumes where it stopped:

=========  =============================  =====================================================
stage      output file                    on resume
=========  =============================  =====================================================
sample     ``samples.json``               responses are read back, never sampled again
judge      ``wins.pt``                    win matrices are read back (the oracle cache too)
logps      ``pairs.pt``                   pairs with precomputed log-probs are read back
train      ``policy.safetensors``         the trained snapshot is loaded instead of retraining
evaluate   ``eval.json``                  held-out responses and win rates are read back
reference  ``reference.safetensors``      the updated reference is loaded
=========  =============================  =====================================================

Every stage is seeded from ``(seed, k, stage)``, so a resumed run ends with the same
checkpoint as an uninterrupted one (on the CPU). ``state.json`` records the last finished
iteration; ``checkpoints/iter_<k>`` holds Hugging Face checkpoints for evaluation.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from comalkit.interfaces import PreferenceOracle, ReferenceUpdater, RunContext, Snapshot, SubgameSolver
from comalkit.outputs import atomic_path, read_metrics, write_json
from comalkit.plots import plot_progress

log = logging.getLogger("comalkit.loop")


def stage_seed(seed: int, iteration: int, stage: str) -> int:
    """A seed per (run seed, iteration, stage): resumed stages draw the same numbers."""
    return (seed * 1_000_003 + iteration * 7919 + zlib.crc32(stage.encode())) % (2**31 - 1)


def save_snapshot(path: Path, snapshot: Snapshot) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in snapshot.items()}, str(tmp))


def load_snapshot(path: Path) -> Snapshot:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_tensor(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def same_snapshot(a: Snapshot, b: Snapshot) -> bool:
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


@dataclass
class LoopSettings:
    """What the online task passes to :class:`MetaLoop` besides the components."""

    iterations: int
    samples_per_prompt: int
    temperature: float
    top_p: float
    max_new_tokens: int
    sample_batch_size: int
    logp_batch_size: int
    eval_prompts: int
    seed: int = 0


@dataclass
class MetaLoop:
    """COMAL's outer loop around any solver, oracle, reference updater and pair builder.

    ``fit`` trains the policy on pair records (the Lightning solver module) and returns its
    metrics; ``precompute`` adds last-iterate and reference log-probs to the records;
    ``win_rate`` judges two lists of responses in both orders.
    """

    policy: Any
    solver: SubgameSolver
    oracle: PreferenceOracle
    reference_updater: ReferenceUpdater
    prompts: Any
    pair_builder: Any
    settings: LoopSettings
    fit: Callable[..., dict[str, Any]]
    precompute: Callable[..., list[dict[str, Any]]]
    win_rate: Callable[[PreferenceOracle, list[str], list[str], list[str]], float]
    run: RunContext
    stage_times: dict[str, float] = field(default_factory=dict)

    # -- paths ----------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.run.out_dir)

    def iter_dir(self, k: int) -> Path:
        d = self.root / "iterations" / f"{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def read_state(self) -> dict[str, Any]:
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"completed": -1}

    # -- the loop -------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        s = self.settings
        state = self.read_state()
        start = state["completed"] + 1
        initial = self._initial_snapshot()
        eval_prompts = self.prompts.eval_prompts()[: s.eval_prompts]
        initial_eval = self._initial_eval(eval_prompts)
        if start > 0:
            log.info("resuming after iteration %d of %d", start - 1, s.iterations)
            last_dir = self.iter_dir(start - 1)
            self.policy.load_snapshot(load_snapshot(last_dir / "policy.safetensors"))
            reference = load_snapshot(last_dir / "reference.safetensors")
            previous_eval = json.loads((last_dir / "eval.json").read_text())["responses"]
        else:
            reference, previous_eval = initial, initial_eval
        logged = {row.get("iteration") for row in read_metrics(self.run.out_dir / "metrics.jsonl")} if (
            self.root / "metrics.jsonl").exists() else set()  # fmt: skip
        metrics: dict[str, Any] = {}
        durations: list[float] = []
        for k in range(start, s.iterations):
            began = time.perf_counter()
            strength = self.reference_updater.strength(self.reference_updater.round_of(k))
            if strength is not None:
                self.solver.set_strength(strength)
            metrics, reference, previous_eval = self.iteration(
                k, reference, previous_eval, initial_eval, eval_prompts
            )
            metrics.update(iteration=k, round=self.reference_updater.round_of(k))
            if strength is not None:
                metrics["strength"] = strength
            write_json(self.iter_dir(k) / "metrics.json", metrics)
            if k not in logged:
                self.run.log(metrics, step=k)
            self.policy.save_checkpoint(self.root / "checkpoints" / f"iter_{k:03d}")
            write_json(self.root / "state.json", {"completed": k, "iterations": s.iterations})
            plot_progress([json.loads((self.iter_dir(j) / "metrics.json").read_text()) for j in range(k + 1)],
                          self.root / "progress.png")  # fmt: skip
            durations.append(time.perf_counter() - began)
            eta = (s.iterations - k - 1) * sum(durations) / len(durations)
            log.info("iteration %d/%d done in %.0fs; ETA %.0fs; %s", k + 1, s.iterations, durations[-1], eta,
                     _brief(metrics))  # fmt: skip
        if not metrics and s.iterations > 0:
            metrics = json.loads((self.iter_dir(s.iterations - 1) / "metrics.json").read_text())
        final = self.root / "checkpoints" / f"iter_{s.iterations - 1:03d}"
        return {**metrics, "final_checkpoint": str(final), "iterations": s.iterations}

    def iteration(
        self,
        k: int,
        reference: Snapshot,
        previous_eval: list[str],
        initial_eval: list[str],
        eval_prompts: list[str],
    ) -> tuple[dict[str, Any], Snapshot, list[str]]:
        """One inner iteration; every stage reuses its saved output if there is one."""
        d = self.iter_dir(k)
        last = self.policy.snapshot()

        prompts, responses = self._stage(d / "samples.json", "sample", k, lambda: self._sample(k))
        wins = self._stage(d / "wins.pt", "judge", k, lambda: self._judge(prompts, responses))
        pairs = self._stage(
            d / "pairs.pt", "logps", k, lambda: self._pairs(prompts, responses, wins, last, reference)
        )
        records = pairs["records"]
        if not records:
            raise RuntimeError(
                f"iteration {k}: the pair builder produced no pairs (all sampled responses tied); "
                "raise task.samples_per_prompt or task.temperature"
            )
        train_metrics = self._stage_train(d, k, records)
        evaluation = self._stage(d / "eval.json", "evaluate", k,
                                 lambda: self._evaluate(k, eval_prompts, previous_eval, initial_eval, reference))  # fmt: skip
        reference = self._stage_reference(d, k, reference)  # after evaluate: KL is to this iteration's μ
        lengths = [len(r) for rs in responses for r in rs]
        metrics = {
            **train_metrics.get("train", {}),
            "train_steps": train_metrics.get("steps"),
            **{k_: v for k_, v in evaluation.items() if k_ != "responses"},
            **pairs["stats"],
            "response_chars": sum(lengths) / max(len(lengths), 1),
            **{f"time/{name}": round(sec, 3) for name, sec in self.stage_times.items()},
        }
        self.stage_times.clear()
        return metrics, reference, evaluation["responses"]

    # -- stages ---------------------------------------------------------------------------------
    def _stage(self, path: Path, name: str, k: int, compute: Callable[[], Any]) -> Any:
        if path.exists():
            log.info("iteration %d: %s: reusing %s", k, name, path.name)
            return _read(path)
        log.info("iteration %d: %s ...", k, name)
        began = time.perf_counter()
        value = compute()
        self.stage_times[name] = time.perf_counter() - began
        _write(path, value)
        return value

    def _sample(self, k: int) -> tuple[list[str], list[list[str]]]:
        s = self.settings
        prompts = self.prompts.split(k)
        responses = self.policy.sample(
            prompts, s.samples_per_prompt, temperature=s.temperature, top_p=s.top_p,
            max_new_tokens=s.max_new_tokens, seed=stage_seed(s.seed, k, "sample"), batch_size=s.sample_batch_size,
            progress="sample",
        )  # fmt: skip
        return prompts, responses

    def _judge(self, prompts: list[str], responses: list[list[str]]) -> list[torch.Tensor]:
        pairs = tqdm(zip(prompts, responses), "judge", len(prompts), leave=False, unit="prompt", disable=None)
        return [self.oracle.win_matrix(p, rs) for p, rs in pairs]

    def _pairs(self, prompts, responses, wins, last: Snapshot, reference: Snapshot) -> dict[str, Any]:
        """Training pairs with their frozen log-probs, and the builder's counts (pairs, skipped prompts)."""
        built = self.pair_builder.build(prompts, responses, wins)
        if same_snapshot(last, reference):
            reference = last  # right after a prox step μ = π_t: one log-prob pass serves both
        records = self.precompute(self.policy, built, self.solver, last=last, reference=reference,
                                  batch_size=self.settings.logp_batch_size)  # fmt: skip
        return {"records": records, "stats": built.stats()}

    def _stage_train(self, d: Path, k: int, records: list[dict[str, Any]]) -> dict[str, Any]:
        path = d / "policy.safetensors"
        if path.exists():
            log.info("iteration %d: train: reusing %s", k, path.name)
            self.policy.load_snapshot(load_snapshot(path))
            return json.loads((d / "train.json").read_text())
        log.info("iteration %d: train on %d pairs ...", k, len(records))
        began = time.perf_counter()
        import lightning

        lightning.seed_everything(stage_seed(self.settings.seed, k, "train"), workers=True, verbose=False)
        metrics = self.fit(self.policy, self.solver, records, out_dir=d / "trainer")
        self.stage_times["train"] = time.perf_counter() - began
        write_json(d / "train.json", metrics)
        save_snapshot(path, self.policy.snapshot())
        return metrics

    def _stage_reference(self, d: Path, k: int, reference: Snapshot) -> Snapshot:
        path = d / "reference.safetensors"
        if path.exists():
            return load_snapshot(path)
        new = self.reference_updater.update(reference, self.policy.snapshot(), k)
        reference = reference if new is None else new
        save_snapshot(path, reference)
        return reference

    def _evaluate(self, k, prompts, previous_eval, initial_eval, reference: Snapshot) -> dict[str, Any]:
        """Held-out responses of the new policy; win rates vs the previous and initial policy.

        ``kl_to_reference`` estimates KL(π‖μ) as the mean of log π(y) − log μ(y) over y ~ π, with μ
        the reference this iteration was trained against."""
        s = self.settings
        if not prompts:
            return {"responses": []}
        responses = [r[0] for r in self.policy.sample(
            prompts, 1, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
            seed=stage_seed(s.seed, k, "evaluate"), batch_size=s.sample_batch_size, progress="evaluate")]  # fmt: skip
        logp_policy = self.policy.logps(prompts, responses, batch_size=s.logp_batch_size)
        logp_ref = self.policy.logps(prompts, responses, snapshot=reference, batch_size=s.logp_batch_size)
        return {
            "responses": responses,
            "win_rate/previous": self.win_rate(self.oracle, prompts, responses, previous_eval),
            "win_rate/initial": self.win_rate(self.oracle, prompts, responses, initial_eval),
            "kl_to_reference": float((logp_policy - logp_ref).mean()),
        }

    def _initial_snapshot(self) -> Snapshot:
        path = self.root / "iterations" / "initial.safetensors"
        if path.exists():
            self.policy.load_snapshot(load_snapshot(path))  # the exact initial weights of this run
        else:
            save_snapshot(path, self.policy.snapshot())
        return load_snapshot(path)

    def _initial_eval(self, prompts: list[str]) -> list[str]:
        s = self.settings
        path = self.root / "iterations" / "initial_eval.json"
        if path.exists():
            return json.loads(path.read_text())
        responses = [r[0] for r in self.policy.sample(
            prompts, 1, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
            seed=stage_seed(s.seed, -1, "evaluate"), batch_size=s.sample_batch_size)]  # fmt: skip
        write_json(path, responses)
        return responses


def _brief(metrics: dict[str, Any]) -> str:
    keys = ("loss", "rewards/accuracies", "win_rate/previous", "win_rate/initial", "kl_to_reference")
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), (int, float)))


def _read(path: Path) -> Any:
    if path.suffix == ".pt":
        return torch.load(path, weights_only=False)
    return json.loads(path.read_text())


def _write(path: Path, value: Any) -> None:
    if path.suffix == ".pt":
        save_tensor(path, value)
    else:
        write_json(path, value)
