"""The COMAL meta-loop on a language model (Liu et al. 2025, COMAL, Algorithm 1).

Each iteration ``k`` runs seven named stages, each through the one stage primitive
(:func:`comalkit.stages.run_stage`), which commits a stage's outputs as one directory
``<run>/iterations/<k>/<stage>/``:

=========  ========================================  ==================================================
stage      files                                     what it holds
=========  ========================================  ==================================================
sample     ``samples.json``                          prompts of split k and the sampled responses
judge      ``wins.safetensors``                      one K×K win matrix per prompt
pair       ``pairs.json``                            the pair builder's records and counts
logps      ``logps.safetensors``                     frozen last-iterate / reference log-probs per pair
train      ``policy.safetensors``, ``train.json``    the trained snapshot and the trainer's metrics
evaluate   ``eval.json``                             held-out responses, win rates, KL estimate
reference  ``reference.safetensors``, ``.json``      μ for the next iteration, and whether it moved
=========  ========================================  ==================================================

A committed stage is read back on resume and never rewritten; an interrupted one is redone.
Every stage is seeded from ``(seed, k, stage)``, so a resumed run ends with the same
checkpoint as an uninterrupted one (on the CPU). After the stages, ``metrics.json``, the
``metrics.jsonl`` row, ``checkpoints/iter_<k>`` (Hugging Face format, for evaluation) and
``progress.png`` are written, and ``state.json`` last records the iteration as done.
Nothing is stored or read with pickle. See docs/online.md.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from comalkit.interfaces import (
    PairBuilder,
    PreferenceOracle,
    PromptSource,
    ReferenceUpdater,
    RunContext,
    Sampler,
    SamplingPolicy,
    Snapshot,
    SubgameSolver,
)
from comalkit.outputs import CorruptFileError, read_metrics, write_json
from comalkit.plots import plot_progress
from comalkit.schedule import RoundSchedule
from comalkit.stages import (
    Stage,
    StageFailure,
    StageReader,
    StageResult,
    StageWriter,
    check_finite_numbers,
    check_finite_snapshot,
    fault_point,
    remove_leftovers,
    remove_leftovers_below,
    run_stage,
)

log = logging.getLogger("comalkit.loop")


def stage_seed(seed: int, iteration: int, stage: str) -> int:
    """A seed per (run seed, iteration, stage): resumed stages draw the same numbers."""
    return (seed * 1_000_003 + iteration * 7919 + zlib.crc32(stage.encode())) % (2**31 - 1)


def save_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Write a snapshot as safetensors, atomically."""
    from safetensors.torch import save_file

    from comalkit.outputs import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in snapshot.items()}, str(tmp))


def load_snapshot(path: Path) -> Snapshot:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_snapshot(a: Snapshot, b: Snapshot) -> bool:
    return a is b or (a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a))


# ---------------------------------------------------------------------------------------------
# The stages' files: how each value is written and read back
# ---------------------------------------------------------------------------------------------
Samples = dict[str, Any]  # {"prompts": [...], "responses": [[...], ...]}


def _save_wins(wins: list[torch.Tensor], w: StageWriter) -> None:
    w.tensors("wins.safetensors", {str(i): m.to(torch.float64) for i, m in enumerate(wins)})


def _load_wins(r: StageReader) -> list[torch.Tensor]:
    tensors = r.tensors("wins.safetensors")
    return [tensors[str(i)] for i in range(len(tensors))]


def _save_logps(logps: dict[str, torch.Tensor], w: StageWriter) -> None:
    w.tensors("logps.safetensors", logps)


def _save_snapshot_and(name: str, extra: str) -> Any:
    def save(value: tuple[Snapshot, dict[str, Any]], w: StageWriter) -> None:
        w.tensors(name, value[0])
        w.json(extra, value[1])

    return save


def _load_snapshot_and(name: str, extra: str) -> Any:
    return lambda r: (r.tensors(name), r.json(extra))


INITIAL: Stage[tuple[Snapshot, dict[str, Any]]] = Stage(
    "initial",
    _save_snapshot_and("policy.safetensors", "eval.json"),
    _load_snapshot_and("policy.safetensors", "eval.json"),
)
SAMPLE: Stage[Samples] = Stage(
    "sample", lambda v, w: w.json("samples.json", v), lambda r: r.json("samples.json")
)
JUDGE: Stage[list[torch.Tensor]] = Stage("judge", _save_wins, _load_wins)
PAIR: Stage[dict[str, Any]] = Stage(
    "pair", lambda v, w: w.json("pairs.json", v), lambda r: r.json("pairs.json")
)
LOGPS: Stage[dict[str, torch.Tensor]] = Stage("logps", _save_logps, lambda r: r.tensors("logps.safetensors"))
TRAIN: Stage[tuple[Snapshot, dict[str, Any]]] = Stage(
    "train",
    _save_snapshot_and("policy.safetensors", "train.json"),
    _load_snapshot_and("policy.safetensors", "train.json"),
)
EVALUATE: Stage[dict[str, Any]] = Stage(
    "evaluate", lambda v, w: w.json("eval.json", v), lambda r: r.json("eval.json")
)
REFERENCE: Stage[tuple[Snapshot, dict[str, Any]]] = Stage(
    "reference",
    _save_snapshot_and("reference.safetensors", "reference.json"),
    _load_snapshot_and("reference.safetensors", "reference.json"),
)
#: the stages of one iteration, in order
STAGES = (SAMPLE, JUDGE, PAIR, LOGPS, TRAIN, EVALUATE, REFERENCE)


def with_logps(records: list[dict[str, Any]], logps: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The pair records with their frozen log-probs (``last_chosen``, ``ref_rejected``, ...) added."""
    columns = {key: values.tolist() for key, values in logps.items()}
    return [{**record, **{key: col[i] for key, col in columns.items()}} for i, record in enumerate(records)]


@dataclass
class LoopSettings:
    """What the online task passes to :class:`MetaLoop` besides the components."""

    iterations: int
    samples_per_prompt: int
    temperature: float
    top_p: float
    max_new_tokens: int
    logps_batch_size: int
    eval_prompts: int
    seed: int = 0


@dataclass
class Initial:
    """The run's start (stage ``iterations/initial/``): π_init and two draws of its held-out responses.

    ``responses`` are drawn with the held-out seed every iteration's policy shares (common
    random numbers); ``control`` a second time with another seed. Scored against
    ``responses``, the control is ``win_rate/control``: the win rate of a policy that did not
    change, the measured noise floor of every win rate (docs/evaluation.md). ``None`` for a run
    started before the control existed.
    """

    snapshot: Snapshot
    responses: list[str]
    control: list[str] | None


@dataclass
class Carry:
    """What one iteration hands the next: μ and the held-out responses of the last policy."""

    reference: Snapshot
    previous_eval: list[str]


@dataclass
class MetaLoop:
    """COMAL's outer loop around any solver, oracle, reference updater and pair builder.

    ``trainer`` is the :class:`comalkit.training.TrainerConfig` the train stage fits with.
    """

    policy: SamplingPolicy
    sampler: Sampler
    solver: SubgameSolver
    oracle: PreferenceOracle
    reference_updater: ReferenceUpdater
    prompts: PromptSource
    pair_builder: PairBuilder
    settings: LoopSettings
    trainer: Any
    run: RunContext

    def __post_init__(self) -> None:
        self.schedule = RoundSchedule(self.reference_updater, self.solver)

    @property
    def root(self) -> Path:
        return Path(self.run.out_dir)

    def iter_dir(self, k: int) -> Path:
        return self.root / "iterations" / f"{k:03d}"

    def read_state(self) -> dict[str, Any]:
        path = self.root / "state.json"
        if not path.exists():
            return {"completed": -1}
        try:
            state = json.loads(path.read_text())
            int(state["completed"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(
                f"{path}: not a comalkit run state ({exc}); delete the run directory to start fresh"
            ) from None
        return state

    # -- the loop -------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        s = self.settings
        removed = remove_leftovers(self.root) + remove_leftovers_below(
            self.root, ("iterations", "checkpoints")
        )
        if removed:
            log.info("removed %d temporary file(s) of an interrupted run", len(removed))
        start = self.read_state()["completed"] + 1
        eval_prompts = self.prompts.eval_prompts()[: s.eval_prompts]
        initial = self._initial(eval_prompts)
        if start > 0:
            log.info("resuming after iteration %d of %d", start, s.iterations)
            carry = self._carry_after(start - 1)
        else:
            carry = Carry(initial.snapshot, initial.responses)
        metrics_file = self.root / "metrics.jsonl"
        logged = (
            {row.get("iteration") for row in read_metrics(metrics_file)} if metrics_file.exists() else set()
        )
        metrics: dict[str, Any] = {}
        durations: list[float] = []
        for k in range(start, s.iterations):
            began = time.perf_counter()
            metrics, carry = self.iteration(k, carry, initial, eval_prompts)
            self._finish_iteration(k, metrics, logged)
            durations.append(time.perf_counter() - began)
            eta = (s.iterations - k - 1) * sum(durations) / len(durations)
            log.info(
                "iteration %d/%d done in %.0fs; ETA %.0fs; %s",
                k + 1,
                s.iterations,
                durations[-1],
                eta,
                _brief(metrics),
            )
        if not metrics and s.iterations > 0:
            metrics = json.loads((self.iter_dir(s.iterations - 1) / "metrics.json").read_text())
        final = self.root / "checkpoints" / f"iter_{s.iterations - 1:03d}"
        rounds = self.schedule.rounds(s.iterations)
        summary = {**metrics, **self._run_cycle_rate(s.iterations)}
        return {**summary, "final_checkpoint": str(final), "iterations": s.iterations, "rounds": rounds}

    def iteration(
        self, k: int, carry: Carry, initial: Initial, eval_prompts: list[str]
    ) -> tuple[dict[str, Any], Carry]:
        """One inner iteration of round ``round_of(k)``, as its seven stages."""
        d = self.iter_dir(k)
        round_index = self.schedule.round_of(k)
        strength = self._start_round(k, round_index)
        last = self.policy.snapshot()

        samples = self._stage(d, SAMPLE, k, lambda _: self._sample(k))
        prompts, responses = samples.value["prompts"], samples.value["responses"]
        wins = self._stage(d, JUDGE, k, lambda _: self._judge(k, prompts, responses))
        pairs = self._stage(d, PAIR, k, lambda _: self._pair(k, prompts, responses, wins.value))
        logps = self._stage(d, LOGPS, k, lambda _: self._logps(pairs.value["records"], last, carry.reference))
        records = with_logps(pairs.value["records"], logps.value)
        train = self._stage(d, TRAIN, k, lambda scratch: self._train(k, records, scratch))
        self.policy.load_snapshot(train.value[0])
        evaluation = self._stage(
            d,
            EVALUATE,
            k,
            lambda _: self._evaluate(k, eval_prompts, carry.previous_eval, initial, carry.reference),
        )  # before the reference stage: the KL is to the μ this iteration was trained against
        reference = self._stage(d, REFERENCE, k, lambda _: self._reference(k, carry.reference))
        moved = bool(reference.value[1]["moved"])
        if moved:
            log.info("iteration %d: μ moves to the current policy (round %d ends)", k + 1, round_index + 1)

        lengths = [len(r) for rs in responses for r in rs]
        train_metrics = train.value[1]
        metrics: dict[str, Any] = {
            **train_metrics.get("train", {}),
            "train_steps": train_metrics.get("steps"),
            **{key: v for key, v in evaluation.value.items() if key != "responses"},
            **cycle_metrics(wins.value),
            **pairs.value["stats"],
            "response_chars": sum(lengths) / max(len(lengths), 1),
            **{
                f"time/{r.path.name}": round(r.seconds, 3)
                for r in (samples, wins, pairs, logps, train, evaluation)
            },
            "iteration": k,
            "round": round_index,
            "reference_moved": moved,
        }
        if strength is not None:
            metrics["strength"] = strength
        return metrics, Carry(reference.value[0], evaluation.value["responses"])

    # -- stages ---------------------------------------------------------------------------------
    def _stage(self, d: Path, stage: Stage, k: int, compute: Any) -> StageResult:
        if (d / stage.name).is_dir():
            log.info("iteration %d: %s: reusing %s/", k + 1, stage.name, stage.name)
        else:
            log.info("iteration %d: %s ...", k + 1, stage.name)
        return run_stage(d, stage, compute, iteration=k)

    def _generate(self, prompts: list[str], n: int, seed: int, progress: str | None) -> list[list[str]]:
        """The one call to the policy's sampler (sampling and evaluation), so a sampler can be swapped."""
        s = self.settings
        return self.sampler.sample(
            self.policy,
            prompts,
            n,
            temperature=s.temperature,
            top_p=s.top_p,
            max_new_tokens=s.max_new_tokens,
            seed=seed,
            progress=progress,
        )

    def _sample(self, k: int) -> Samples:
        prompts = self.prompts.split(k)
        responses = self._generate(
            prompts, self.settings.samples_per_prompt, stage_seed(self.settings.seed, k, "sample"), "sample"
        )
        return {"prompts": prompts, "responses": responses}

    def _judge(self, k: int, prompts: list[str], responses: list[list[str]]) -> list[torch.Tensor]:
        before = self._failed_judgments()
        pairs = tqdm(zip(prompts, responses), "judge", len(prompts), leave=False, unit="prompt", disable=None)
        wins = [self.oracle.win_matrix(p, rs) for p, rs in pairs]
        self._check_judgments(k, "judge", before)
        return wins

    def _pair(
        self, k: int, prompts: list[str], responses: list[list[str]], wins: list[torch.Tensor]
    ) -> dict[str, Any]:
        built = self.pair_builder.build(prompts, responses, wins)
        if not built:
            raise RuntimeError(
                f"iteration {k + 1}: the pair builder produced no pairs (all sampled responses tied); "
                "raise task.samples_per_prompt or task.temperature"
            )
        return {"records": list(built), "stats": built.stats()}

    def _logps(
        self, records: list[dict[str, Any]], last: Snapshot, reference: Snapshot
    ) -> dict[str, torch.Tensor]:
        """The frozen log-probs the solver reads, under π_t and μ (one pass when they are equal)."""
        from comalkit.training import precompute_logps

        if same_snapshot(last, reference):
            reference = last  # right after a prox step μ = π_t: one log-prob pass serves both
        out = precompute_logps(
            self.policy,
            records,
            self.solver,
            last=last,
            reference=reference,
            batch_size=self.settings.logps_batch_size,
            precision=self.trainer.precision,
        )
        keys = [key for key in out[0] if key.startswith(("last_", "ref_"))]
        return {key: torch.tensor([r[key] for r in out], dtype=torch.float32) for key in keys}

    def _train(self, k: int, records: list[dict[str, Any]], scratch: Path) -> tuple[Snapshot, dict[str, Any]]:
        import lightning

        from comalkit.training import fit

        log.info("iteration %d: train on %d pairs ...", k + 1, len(records))
        self.sampler.sleep()  # vLLM's sleep mode frees the device for training; the next sample wakes it
        lightning.seed_everything(stage_seed(self.settings.seed, k, "train"), workers=True, verbose=False)
        metrics = fit(self.policy, self.solver, records, self.trainer, scratch / "trainer")
        metrics.pop("seconds", None)  # the stage's manifest keeps its time; its files stay reproducible
        snapshot = self.policy.snapshot()
        check_finite_numbers(metrics.get("train", {}), f"iteration {k + 1}: training")
        check_finite_snapshot(snapshot, f"iteration {k + 1}: the trained policy")
        return snapshot, metrics

    def _eval_seed(self) -> int:
        """The one seed of every held-out draw: common random numbers (docs/evaluation.md).

        The initial policy and every iteration's policy sample the held-out prompts with the
        same seed, so each prompt's response differs only where the policy does, and an
        unchanged policy scores exactly ½ against the initial one."""
        return stage_seed(self.settings.seed, -1, "evaluate")

    def _evaluate(self, k, prompts, previous_eval, initial: Initial, reference: Snapshot) -> dict[str, Any]:
        """Held-out responses of the new policy; win rates vs the previous and initial policy.

        The responses are drawn with :meth:`_eval_seed`, as the initial ones were. Beside them
        the untrained control's win rate (see :class:`Initial`), judged here rather than in the
        initial stage so that stage asks the oracle nothing; its judgments repeat every
        iteration and come from the oracle cache. Each win rate is logged soft and hard with
        bootstrap intervals (:meth:`comalkit.evaluate.WinRate.metrics`).
        ``kl_to_reference`` estimates KL(π‖μ) as the mean of log π(y) − log μ(y) over y ~ π, with μ
        the reference this iteration was trained against."""
        from comalkit.evaluate import win_rate_stats

        s = self.settings
        if not prompts:
            return {"responses": []}
        before = self._failed_judgments()
        responses = [r[0] for r in self._generate(prompts, 1, self._eval_seed(), "evaluate")]
        logp_policy = self.policy.logps(prompts, responses, batch_size=s.logps_batch_size)
        logp_ref = self.policy.logps(prompts, responses, snapshot=reference, batch_size=s.logps_batch_size)
        result = {
            "responses": responses,
            **win_rate_stats(self.oracle, prompts, responses, previous_eval).metrics("win_rate/previous"),
            **win_rate_stats(self.oracle, prompts, responses, initial.responses).metrics("win_rate/initial"),
            "kl_to_reference": float((logp_policy - logp_ref).mean()),
        }
        if initial.control is not None:
            control = win_rate_stats(self.oracle, prompts, initial.control, initial.responses)
            result |= control.metrics("win_rate/control")
        self._check_judgments(k, "evaluate", before)
        check_finite_numbers(result, f"iteration {k + 1}: evaluation")
        return result

    def _reference(self, k: int, reference: Snapshot) -> tuple[Snapshot, dict[str, Any]]:
        new = self.reference_updater.update(reference, self.policy.snapshot(), k)
        if new is not None:
            check_finite_snapshot(new, f"iteration {k + 1}: the new reference")
        return (reference if new is None else new), {"moved": new is not None}

    def _initial(self, eval_prompts: list[str]) -> Initial:
        """The run's exact initial weights and two draws of their held-out responses (see :class:`Initial`).

        One stage (``iterations/initial/``), so a resumed run redraws neither."""

        def compute(_: Path) -> tuple[Snapshot, dict[str, Any]]:
            responses = [r[0] for r in self._generate(eval_prompts, 1, self._eval_seed(), None)]
            seed = stage_seed(self.settings.seed, -1, "control")
            control = [r[0] for r in self._generate(eval_prompts, 1, seed, None)] if eval_prompts else []
            return self.policy.snapshot(), {"responses": responses, "control": control}

        result = run_stage(self.root / "iterations", INITIAL, compute, iteration="initial")
        snapshot, evaluation = result.value
        self.policy.load_snapshot(snapshot)
        return Initial(snapshot, evaluation["responses"], evaluation.get("control"))

    def _run_cycle_rate(self, iterations: int) -> dict[str, Any]:
        """The oracle's cycle rate pooled over every iteration's sampled triples (absent if none)."""
        rows = [json.loads((self.iter_dir(k) / "metrics.json").read_text()) for k in range(iterations)]
        cycles = sum(row.get("oracle/cyclic_triples", 0) for row in rows)
        triples = sum(row.get("oracle/triples", 0) for row in rows)
        if not triples:
            return {}
        log.info(
            "oracle cycle rate over the run: %.3f (%d of %d sampled response triples form a preference cycle)",
            cycles / triples,
            cycles,
            triples,
        )
        return {"oracle/cycle_rate_run": cycles / triples}

    def _carry_after(self, k: int) -> Carry:
        """The policy, μ and held-out responses after committed iteration ``k``."""
        d = self.iter_dir(k)
        self.policy.load_snapshot(TRAIN.load(StageReader(d / TRAIN.name))[0])
        reference = REFERENCE.load(StageReader(d / REFERENCE.name))[0]
        return Carry(reference, EVALUATE.load(StageReader(d / EVALUATE.name))["responses"])

    # -- rounds, failures and the end of an iteration -------------------------------------------
    def _start_round(self, k: int, round_index: int) -> float | None:
        """Set the round's strength (every iteration, so a resumed run sets it too); say when a round starts."""
        strength = self.schedule.apply(round_index)
        if self.schedule.starts_round(k):
            shown = f", strength {strength:g}" if strength is not None else ""
            log.info("round %d starts at iteration %d%s", round_index + 1, k + 1, shown)
        return strength

    def _failed_judgments(self) -> int:
        return int(self.oracle.diagnostics().get("failed", 0) or 0)

    def _check_judgments(self, k: int, stage: str, before: int) -> None:
        failed = self._failed_judgments() - before
        if failed:
            raise StageFailure(
                f"iteration {k + 1}: {failed} judgment(s) of the {stage} stage failed (the oracle gave no answer); "
                f"the {stage} stage was not saved. Rerun the same command to retry them: failed judgments are "
                "never cached, successful ones are."
            )

    def _finish_iteration(self, k: int, metrics: dict[str, Any], logged: set[Any]) -> None:
        """metrics.json, the metrics.jsonl row, the checkpoint and the plot, then state.json (the commit)."""
        d = self.iter_dir(k)
        if not (d / "metrics.json").exists():
            write_json(d / "metrics.json", metrics)
        fault_point("iteration", "after-write:metrics.json", k)
        if k not in logged:
            self.run.log(metrics, step=k)
        fault_point("iteration", "after-write:metrics.jsonl", k)
        checkpoint = self.root / "checkpoints" / f"iter_{k:03d}"
        if not checkpoint.is_dir():  # written to a temporary directory and renamed: present means complete
            self.policy.save_checkpoint(checkpoint)
        fault_point("iteration", "after-write:checkpoint", k)
        rows = [json.loads((self.iter_dir(j) / "metrics.json").read_text()) for j in range(k + 1)]
        plot_progress(rows, self.root / "progress.png")
        fault_point("iteration", "after-write:progress.png", k)
        fault_point("iteration", "before-commit", k)
        write_json(self.root / "state.json", {"completed": k, "iterations": self.settings.iterations})
        fault_point("iteration", "after-commit", k)


def cycle_metrics(wins: list[torch.Tensor]) -> dict[str, Any]:
    """``oracle/cycle_rate`` of one judge stage's K×K matrices, with its counts (none when K < 3)."""
    from comalkit.diagnostics import pooled_cycle_counts

    cycles, triples = pooled_cycle_counts(wins)
    if not triples:
        return {}
    return {"oracle/cycle_rate": cycles / triples, "oracle/cyclic_triples": cycles, "oracle/triples": triples}


def _brief(metrics: dict[str, Any]) -> str:
    keys = (
        "loss",
        "rewards/accuracies",
        "win_rate/previous",
        "win_rate/initial",
        "win_rate/control",
        "oracle/cycle_rate",
        "kl_to_reference",
    )
    return ", ".join(f"{k}={metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), (int, float)))
