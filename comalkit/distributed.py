"""Training on several processes: the batch layout, comalkit's rank launcher and the strategy objects.

comalkit keeps one main process that samples, judges, computes the frozen log-probs and writes
every run file; only :func:`comalkit.training.fit` fans out. With ``trainer.devices`` > 1 on
one machine, :func:`spawn_fit` starts one worker process per device (``torch.multiprocessing``;
``fork`` for CPU ranks, ``spawn`` for CUDA ones) that runs the Lightning fit as one rank, with
``LOCAL_RANK`` set so that Lightning launches nothing itself. The workers never
re-run the command line, which is how the Hydra-multirun + DDP trap (Lightning issue 11300:
Lightning's default ``ddp`` launcher re-runs ``sys.argv``, and a multirun's children re-enter
the sweep) cannot happen. Rank 0 sends its logged rows to the main process as they come (the
main process writes ``metrics.jsonl``, once) and the trained weights at the end. Under an
external launcher (torchrun, SLURM with one task per device) every process is already a rank
and fits in place. See docs/scaling.md.

``trainer.batch_size`` is the global number of pairs per micro-batch: each of the W ranks
gets a contiguous slice of the same global batch that one process would train on
(:class:`GlobalBatchSampler`), so the effective batch (``batch_size`` ×
``accumulate_grad_batches`` pairs per optimizer step) does not depend on the layout.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib.util
import io
import os
import pickle
import random
import socket
import sys
import threading
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, RandomSampler, Sampler

from comalkit.registry import ConfigError

#: strategies that are the same DDP when comalkit launches the processes itself
DDP_NAMES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")
#: FSDP names; comalkit adds the auto-wrap policy over the model's decoder layers
FSDP_NAMES = ("fsdp", "fsdp_cpu_offload")
#: how the ranks start (``trainer.start_method``)
START_METHODS = ("auto", "spawn", "fork")


def device_count(accelerator: str, devices: Any) -> int:
    """How many processes per node ``trainer.devices`` means (Lightning's forms, already validated)."""
    if isinstance(devices, str):
        text = devices.strip()
        if text == "auto":
            devices = (
                -1
                if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
                else 1
            )
        elif "," in text:
            return len([p for p in text.split(",") if p.strip()])
        else:
            devices = int(text)
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices == -1:
        on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
        return max(1, torch.cuda.device_count()) if on_gpu else 1
    return int(devices)


def on_gpu(accelerator: str) -> bool:
    """Whether the ranks train on CUDA devices."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def start_method(cfg: Any) -> str:
    """``fork`` for CPU ranks (they inherit the imported modules and the model: no start-up cost),
    ``spawn`` for CUDA ranks (CUDA cannot be used in a forked process once the main process has)."""
    if cfg.start_method != "auto":
        return cfg.start_method
    fork = "fork" in torch.multiprocessing.get_all_start_methods()
    return "fork" if fork and not on_gpu(cfg.accelerator) and not torch.cuda.is_initialized() else "spawn"


def world_size(cfg: Any) -> int:
    """Processes that train together: devices per node × nodes."""
    return device_count(cfg.accelerator, cfg.devices) * int(cfg.num_nodes)


def check_layout(cfg: Any) -> list[tuple[bool, str]]:
    """The layout checks :func:`comalkit.training.trainer_config` raises as ``ConfigError``."""
    world = world_size(cfg)
    checks = []
    for key in ("batch_size", "eval_batch_size"):
        value = getattr(cfg, key)
        checks.append(
            (
                value % world == 0,
                f"trainer.{key}={value} is the global number of pairs per micro-batch and must divide evenly "
                f"over trainer.devices x trainer.num_nodes = {world} processes; use a multiple of {world}",
            )
        )
    if world > 1:
        checks.append(
            (
                cfg.on_nonfinite != "skip",
                f"trainer.on_nonfinite=skip: Lightning cannot skip a training step on {world} processes; "
                "use trainer.on_nonfinite=error (the default) or one device",
            )
        )
    if cfg.num_nodes > 1:
        checks.append(
            (
                launched_externally(),
                f"trainer.num_nodes={cfg.num_nodes}: several nodes need one process per device on every node, "
                "started by torchrun or SLURM (docs/scaling.md); comalkit starts ranks on one node only",
            )
        )
    launched = launcher_world()
    if launched > 1:
        checks.append(
            (
                world == launched,
                f"trainer.devices x trainer.num_nodes = {world} processes, but the launcher started {launched} "
                "(WORLD_SIZE or SLURM_NTASKS); set trainer.devices to the processes per node and "
                "trainer.num_nodes to the nodes (docs/scaling.md)",
            )
        )
    if cfg.strategy in FSDP_NAMES:
        checks.append(
            (
                on_gpu(cfg.accelerator),
                f"trainer.strategy={cfg.strategy} needs CUDA devices (Lightning's FSDP runs on GPUs only); "
                "on the CPU use trainer=ddp",
            )
        )
    if cfg.start_method == "fork" and on_gpu(cfg.accelerator):
        checks.append(
            (False, "trainer.start_method=fork: CUDA cannot be used in forked ranks; use auto or spawn")
        )
    if cfg.strategy.startswith("deepspeed"):
        checks.append(
            (
                importlib.util.find_spec("deepspeed") is not None,
                f"trainer.strategy={cfg.strategy} needs the deepspeed package, which is not installed "
                "(pip install deepspeed, on a CUDA machine); or use trainer=ddp or trainer=fsdp",
            )
        )
    return checks


def launcher_world() -> int:
    """How many processes torchrun or SLURM started for this job; 1 without such a launcher.

    comalkit's own workers (:func:`spawn_fit`) drop their launcher's variables, so they count 1.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if _slurm_tasks():
        return int(os.environ["SLURM_NTASKS"])
    return 1


def _slurm_tasks() -> bool:
    """One of several SLURM tasks of a batch job (``srun`` in an interactive shell is not a launch)."""
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


def is_writing_rank() -> bool:
    """Whether this process writes the run's files: the only process, or rank 0 of torchrun/SLURM.

    Under an external launcher every process runs ``python -m comalkit``; rank 0 runs the job
    and the others only train with it (:func:`follow_rank_zero`), so one process writes.
    """
    return launcher_world() == 1 or current_rank() == 0


def launched_externally() -> bool:
    """True when this process is one rank of several started by torchrun, SLURM or comalkit."""
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return True
    return _slurm_tasks()


def current_rank() -> int:
    """This process's global rank under the launcher that started it (0 without one)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")))
    return node * int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("COMALKIT_DEVICES", "1"))) + local


# ---------------------------------------------------------------------------------------------
# The same global batches on every layout
# ---------------------------------------------------------------------------------------------
class GlobalBatchSampler(Sampler[list[tuple[int, float]]]):
    """Rank ``rank``'s slice of each global batch of ``batch_size`` pairs, as one process would draw them.

    The order is the one a single process's ``DataLoader(shuffle=True, generator=g)`` draws (a
    ``RandomSampler`` on ``g``, shared with the DataLoader), so 1 and W processes train on
    the same global batches. Each index comes with its loss scale ``W / m`` (``m``: pairs in that
    global batch): DDP averages the ranks' gradients, so summing ``scale × loss`` over a rank's
    pairs gives the global batch's mean loss even when a ragged last batch splits unevenly. A rank
    left without a pair gets one with scale 0 (every rank must step together).
    """

    def __init__(
        self, n: int, batch_size: int, rank: int, world: int, shuffle: bool, generator: torch.Generator
    ) -> None:
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world
        self.shuffle = shuffle
        self.generator = generator  # the DataLoader's too: it draws a base seed from it before each epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        # torch's own RandomSampler run to its end draws from the generator exactly as one process does
        order = (
            list(RandomSampler(range(self.n), generator=self.generator)) if self.shuffle else range(self.n)
        )
        for start in range(0, self.n, self.batch_size):
            batch = order[start : start + self.batch_size]
            yield shard(batch, self.rank, self.world)


def shard(batch: Sequence[int], rank: int, world: int) -> list[tuple[int, float]]:
    """Rank ``rank``'s contiguous near-even slice of ``batch``, each index with its loss scale."""
    m = len(batch)
    size, extra = divmod(m, world)
    start = rank * size + min(rank, extra)
    mine = list(batch[start : start + size + (rank < extra)])
    if not mine:
        return [(batch[0], 0.0)]
    return [(i, world / m) for i in mine]


class ScaledRecords(Dataset):
    """Records indexed by ``(index, scale)`` pairs, as :class:`GlobalBatchSampler` yields them."""

    def __init__(self, records: Sequence[Any]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, float]) -> tuple[Any, float]:
        index, scale = item
        return self.records[index], scale


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------
def strategy_for(cfg: Any, model: torch.nn.Module | None, world: int) -> Any:
    """The ``strategy`` argument of ``lightning.Trainer`` for this layout.

    Several ranks: the spawn-style DDP names become plain ``ddp`` (comalkit launched the
    processes), FSDP wraps each decoder layer (:func:`decoder_layer_classes`) with the original
    parameters kept (LoRA freezes part of each layer), DeepSpeed names pass through to Lightning.
    """
    name = cfg.strategy
    if world > 1 and name in ("auto", *DDP_NAMES):
        return "ddp"
    if name in FSDP_NAMES:
        from lightning.pytorch.strategies import FSDPStrategy

        layers = decoder_layer_classes(model) if model is not None else set()
        if not layers:
            raise ConfigError(
                "trainer.strategy=fsdp: found no decoder layer class to wrap in the model "
                "(expected transformers' _no_split_modules or a class named *DecoderLayer)"
            )
        return FSDPStrategy(
            auto_wrap_policy=layers, use_orig_params=True, cpu_offload=name == "fsdp_cpu_offload"
        )
    return name


def decoder_layer_classes(model: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The model's transformer-layer classes (LlamaDecoderLayer, Qwen2DecoderLayer, ...), found from the model.

    transformers lists them in ``_no_split_modules`` (the units accelerate and TRL wrap for FSDP);
    classes named ``*DecoderLayer`` are the fallback.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    return found or {type(m) for m in model.modules() if type(m).__name__.endswith("DecoderLayer")}


# ---------------------------------------------------------------------------------------------
# comalkit's launcher: the main process keeps the loop, the workers train
# ---------------------------------------------------------------------------------------------
@dataclass
class FitJob:
    """Everything a worker needs (pickled to each process under ``spawn``, inherited under ``fork``)."""

    policy: Any
    solver: Any
    train_records: list[Any]
    val_records: list[Any] | None
    cfg: Any
    out_dir: str
    step_offset: int
    callbacks: list[Any]
    logs: bool
    devices: int
    port: int
    threads: int
    rng: tuple[Any, ...]


class _Relay:
    """Rank 0's stand-in for the run in a worker: logged rows go to the main process's queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.queue.put(("log", {k: float(v) for k, v in metrics.items()}, step))


def spawn_fit(
    policy: Any,
    solver: Any,
    train_records: Sequence[Any],
    cfg: Any,
    out_dir: str | Path,
    val_records: Sequence[Any] | None,
    run: Any,
    step_offset: int,
    callbacks: Sequence[Any],
) -> dict[str, Any]:
    """Fit on ``trainer.devices`` ranks started on this machine; load rank 0's trained weights into ``policy``.

    Returns what :func:`comalkit.training.fit` returns, measured on rank 0. Logged rows reach
    ``run`` through the main process while training runs. An error in a rank is raised here.
    """
    import torch.multiprocessing as mp

    devices = device_count(cfg.accelerator, cfg.devices)
    home = policy.device
    if home.type != "cpu":
        policy.model.to("cpu")  # each rank moves its copy to its own device; the main process holds none
    method = start_method(cfg)
    context = mp.get_context(method)
    queue = context.SimpleQueue()
    job = FitJob(
        policy=policy,
        solver=solver,
        train_records=list(train_records),
        val_records=list(val_records) if val_records else None,
        cfg=cfg,
        out_dir=str(out_dir),
        step_offset=step_offset,
        callbacks=list(callbacks),
        logs=run is not None,
        devices=devices,
        port=_free_port(),
        threads=max(1, torch.get_num_threads() // devices),
        rng=(torch.get_rng_state(), random.getstate()),
    )
    outcome: dict[str, Any] = {}
    reader = threading.Thread(target=_read, args=(queue, run, outcome), daemon=True)
    reader.start()
    try:
        processes = mp.start_processes(
            _worker, args=(job, queue), nprocs=devices, start_method=method, join=False
        )
        try:
            while not processes.join():
                pass
        except BaseException as exc:  # a failed rank, or an interrupt of the main process (SIGTERM)
            for process in processes.processes:
                if process.is_alive():
                    process.terminate()  # no rank outlives the main process's fit (or holds its files)
            for process in processes.processes:
                process.join()
            queue.put(("stop",))
            reader.join()
            if isinstance(exc, Exception) and "error" in outcome:
                raise outcome["error"] from None  # the rank's own exception (NonFiniteError, ...)
            raise
        queue.put(("stop",))
        reader.join()
    finally:
        if home.type != "cpu":
            policy.model.to(home)
    if "error" in outcome:
        raise outcome["error"]
    snapshot = torch.load(io.BytesIO(outcome["snapshot"]), weights_only=True)
    policy.load_snapshot(snapshot)
    return outcome["result"]


def _read(queue: Any, run: Any, outcome: dict[str, Any]) -> None:
    """The main process's side of the queue: write rank 0's rows in order, keep its result."""
    while True:
        message = queue.get()
        kind = message[0]
        if kind == "stop":
            return
        if kind == "log" and run is not None:
            run.log(message[1], message[2])
        elif kind == "done":
            outcome["result"], outcome["snapshot"] = message[1], message[2]
        elif kind == "error":
            outcome.setdefault("error", message[1])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(local_rank: int, job: FitJob, queue: Any) -> None:
    """One rank: a plain Lightning fit with ``LOCAL_RANK`` set, so that Lightning launches nothing."""
    os.environ.update(
        LOCAL_RANK=str(local_rank),
        NODE_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(job.port),
        COMALKIT_DEVICES=str(job.devices),
        OMP_NUM_THREADS=str(job.threads),
    )
    for key in ("RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"):
        os.environ.pop(key, None)  # the main process's own launcher (if any) is not this one
    torch.set_num_threads(job.threads)
    torch.set_rng_state(job.rng[0])
    random.setstate(job.rng[1])
    from lightning.pytorch.plugins.environments import LightningEnvironment

    from comalkit.training import fit_as_rank

    try:
        for tensor in [*job.policy.model.parameters(), *job.policy.model.buffers()]:
            if tensor.is_shared():  # spawn passes CPU tensors in shared memory: give each rank its own
                tensor.data = tensor.data.clone()
        result = fit_as_rank(
            job.policy,
            job.solver,
            job.train_records,
            job.cfg,
            job.out_dir,
            job.val_records,
            _Relay(queue) if job.logs and local_rank == 0 else None,
            job.step_offset,
            job.callbacks,
            rank=local_rank,
            world=job.devices,
            plugins=[LightningEnvironment()],
        )
        snapshot = result.pop("_snapshot")
        if local_rank == 0:
            buffer = io.BytesIO()
            torch.save(snapshot, buffer)
            queue.put(("done", result, buffer.getvalue()))
    except BaseException as exc:
        queue.put(("error", _picklable(exc, local_rank)))
        raise


def _picklable(exc: BaseException, rank: int) -> BaseException:
    """``exc`` itself if it crosses the process boundary, else a RuntimeError with its traceback."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return RuntimeError(f"training rank {rank} failed:\n{text}")


# ---------------------------------------------------------------------------------------------
# Under torchrun or SLURM: rank 0 runs the job, the other ranks follow it into each fit
# ---------------------------------------------------------------------------------------------
#: how long a follower waits for rank 0's next message (rank 0 samples and judges meanwhile)
CONTROL_TIMEOUT = datetime.timedelta(days=7)


class _Launch:
    """This process's place in a job that torchrun or SLURM started (set by :func:`join_launcher`)."""

    control: Any = None  # a gloo group for rank 0's messages, whatever the training backend
    leading = False  # rank 0 of a ``python -m comalkit`` job: tells the followers about each fit
    finished = False


def join_launcher(accelerator: str) -> None:
    """Join the launcher's process group (every rank, before any work) and open the message group.

    The address, port and ranks are those Lightning reads from the same launcher (its
    ``TorchElasticEnvironment`` or ``SLURMEnvironment``), so the Trainer later finds the group
    initialised and reuses it. A CUDA rank selects its own device first (``LOCAL_RANK``).
    """
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    cuda = on_gpu(accelerator) and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))))
    if not dist.is_initialized():
        env = TorchElasticEnvironment() if TorchElasticEnvironment.detect() else SLURMEnvironment()
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.main_address, str(env.main_port)
        dist.init_process_group(
            "nccl" if cuda else "gloo", rank=env.global_rank(), world_size=env.world_size()
        )
    _Launch.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _Launch.leading = is_writing_rank()
    if _Launch.leading:
        atexit.register(finish_ranks, 1)  # rank 0 ended some other way: the followers stop too


def _broadcast(message: Any) -> Any:
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0, group=_Launch.control)
    return box[0]


def lead_followers(
    policy: Any,
    solver: Any,
    train_records: Sequence[Any],
    cfg: Any,
    out_dir: str | Path,
    val_records: Sequence[Any] | None,
    step_offset: int,
) -> None:
    """On rank 0 of a comalkit job, send the other ranks what this fit trains on; else do nothing.

    They get the policy's trainable weights, the solver, the records (with their frozen
    log-probs) and the trainer config, so every rank starts the fit from the same state.
    Rank 0's callbacks and run logger stay on rank 0.
    """
    if not _Launch.leading or _Launch.finished:
        return
    job = {
        "snapshot": policy.snapshot(),
        "solver": solver,
        "train": list(train_records),
        "val": list(val_records) if val_records else None,
        "cfg": cfg,
        "out_dir": str(out_dir),
        "step_offset": step_offset,
    }
    # an in-memory message between the ranks of one job, never a file read back (docs/scaling.md)
    _broadcast(("fit", job))


def finish_ranks(code: int) -> None:
    """On rank 0, tell the other ranks the job's exit code (once); they exit with it."""
    if not _Launch.leading or _Launch.finished:
        return
    _Launch.finished = True
    import torch.distributed as dist

    try:
        _broadcast(("exit", int(code)))
        dist.barrier(group=_Launch.control)
    except Exception as exc:  # a follower died already (the launcher ends the job anyway)
        print(f"comalkit: could not tell the other ranks to stop ({exc})", file=sys.stderr, flush=True)


def follow_rank_zero(build_policy: Any) -> int:
    """A rank other than 0: train in each fit rank 0 announces; return rank 0's exit code.

    Such a rank takes no lock and writes no file: rank 0 alone samples, judges, evaluates and
    writes (docs/scaling.md). ``build_policy()`` makes this rank's copy of the policy at the
    first fit, after rank 0 has built its own.
    """
    import torch.distributed as dist

    from comalkit.training import fit_as_rank

    policy = None
    while True:
        kind, payload = _broadcast(None)
        if kind == "exit":
            with contextlib.suppress(Exception):
                dist.barrier(group=_Launch.control)
            return int(payload)
        job = payload
        policy = policy if policy is not None else build_policy()
        policy.load_snapshot(job["snapshot"])
        fit_as_rank(
            policy,
            job["solver"],
            job["train"],
            job["cfg"],
            job["out_dir"],
            job["val"],
            None,
            job["step_offset"],
            [],
            rank=current_rank(),
            world=launcher_world(),
        )
