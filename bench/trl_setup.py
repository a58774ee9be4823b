"""The set-up the comalkit-vs-TRL training benchmarks share (bench_dpo_vs_trl.py, bench_gpu_train.py).

Both compare one DPO step of comalkit's Lightning module with TRL's ``DPOTrainer`` on the same
pairs: AdamW, constant learning rate, gradient clipping at 1.0, bf16 autocast, LoRA on
q/k/v/o, one process per variant. What they share lives here, so the two sides are configured
the same way in both: the TRL dataset and ``DPOConfig``, the LoRA config, comalkit's trainer
config, the per-step timers and tokens, and the child process that runs one variant.
Imported as ``trl_setup`` by the scripts next to it (``python bench/<script>.py``).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from typing import Any

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: Tells the parent the child's result: one line, this prefix and a JSON object.
RESULT = "RESULT "


def trl_rows(pairs: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """Pairs in TRL's conversational format: the prompt a user turn, each response an assistant turn."""
    return [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in pairs
    ]


def dpo_config(
    out: str, *, batch_size: int, max_length: int, lr: float, beta: float, steps: int, cpu: bool, **extra: Any
) -> Any:
    """TRL's ``DPOConfig`` for the benchmark: bf16 autocast, constant LR, clipping at 1.0, one log per step."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=out,
        per_device_train_batch_size=batch_size,
        max_length=max_length,
        bf16=True,
        use_cpu=cpu,
        learning_rate=lr,
        lr_scheduler_type="constant",
        beta=beta,
        max_steps=steps,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        **extra,
    )


def lora_config(rank: int, alpha: int) -> Any:
    """peft's LoRA on :data:`TARGETS` without dropout, the adapter comalkit's side trains too."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )


def comalkit_trainer(
    accelerator: str, steps: int, batch_size: int, lr: float, **extra: Any
) -> dict[str, Any]:
    """comalkit's trainer config matching :func:`dpo_config`: bf16-mixed, constant LR, clipping at 1.0."""
    return {
        "accelerator": accelerator,
        "precision": "bf16-mixed",
        "max_steps": steps,
        "max_epochs": 1,
        "batch_size": batch_size,
        "shuffle": False,
        "lr": lr,
        "scheduler": {"name": "constant", "warmup_ratio": 0.0},
        "gradient_clip_val": 1.0,
        "enable_progress_bar": False,
        **extra,
    }


class StepTimer:
    """Wall and process CPU time of each optimizer step; on CUDA both ends are synchronised."""

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = device.startswith("cuda")
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.tokens: list[int] = []

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def begin(self) -> None:
        self.sync()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def end(self) -> None:
        self.sync()
        self.times.append(time.perf_counter() - self.start)
        self.cpu.append(time.process_time() - self.cpu_start)

    def lightning(self) -> Any:
        """A Lightning callback timing each training batch and counting its non-padding tokens."""
        import lightning as L

        timer = self

        class Timing(L.Callback):
            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
                timer.begin()
                timer.tokens.append(int(batch["attention_mask"].sum()))

            def on_train_batch_end(
                self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
            ) -> None:
                timer.end()

        return Timing()

    def trl(self) -> Any:
        """A transformers callback timing each optimizer step (tokens come from :func:`trl_tokens`)."""
        from transformers import TrainerCallback

        timer = self

        class Timing(TrainerCallback):
            def on_step_begin(self, *a: Any, **k: Any) -> None:
                timer.begin()

            def on_step_end(self, *a: Any, **k: Any) -> None:
                timer.end()

        return Timing()


def trl_tokens(trainer: Any) -> tuple[list[int], float | None]:
    """Tokens of each logged step (TRL logs a running ``num_tokens``) and the last logged loss."""
    logs = [h for h in trainer.state.log_history if "num_tokens" in h]
    totals = [int(h["num_tokens"]) for h in logs]
    return [b - a for a, b in zip([0, *totals[:-1]], totals)], (logs[-1]["loss"] if logs else None)


def run_child(cmd: Sequence[str], env: dict[str, str]) -> tuple[dict[str, Any] | None, int, str]:
    """Run one variant in its own process (so its peak memory is its own).

    Returns its result (None when it failed or printed none), its exit status and its stderr.
    """
    proc = subprocess.run(list(cmd), env=env, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith(RESULT)), None)
    result = None if proc.returncode or line is None else json.loads(line[len(RESULT) :])
    return result, proc.returncode, proc.stderr


def print_result(result: dict[str, Any]) -> None:
    """The child's side of :func:`run_child`."""
    print(RESULT + json.dumps(result), flush=True)
