"""The one LightningModule every language-model solver trains with.

It tokenises pairs, runs chosen and rejected responses through the policy in one concatenated
forward pass, hands the summed log-probs to ``solver.loss`` and logs TRL's metric names
(``loss``, ``rewards/chosen``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ...),
so runs compare with TRL's DPOTrainer (docs/training.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from comalkit.distributed import GlobalBatchSampler, ScaledRecords
from comalkit.interfaces import PairLogps, SubgameSolver, require_language_model_solver
from comalkit.preference_data import PreferenceRecord
from comalkit.training.config import TrainerConfig, trainer_config
from comalkit.training.optim import build_optimizer, lr_lambda
from comalkit.training.precompute import required_keys


class NonFiniteError(RuntimeError):
    """Training produced a nan or inf loss, gradient or weight; the message names the step."""


class PreferenceModule(L.LightningModule):
    """One training step for every solver: policy log-probs of a pair batch -> ``solver.loss``.

    Chosen and rejected responses are concatenated into one batch of 2B sequences, so each
    step is a single forward and backward pass. Frozen log-probs and win probabilities
    come with the records (see :func:`comalkit.training.precompute.precompute_logps`). Checkpoints hold only the
    trainable parameters (for LoRA: the adapter), not the frozen base model.
    """

    def __init__(
        self, policy: Any, solver: SubgameSolver, cfg: TrainerConfig | Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        require_language_model_solver(solver)
        self.policy = policy
        self.model = policy.model  # registered, so Lightning moves, casts and trains it
        self.solver = solver
        self.cfg = trainer_config(cfg)
        self.strict_loading = False  # checkpoints carry only the trainable weights
        self._tokens_seen = 0
        self.skipped_batches = 0  # non-finite batches skipped (trainer.on_nonfinite=skip)
        #: (rank, world) when several processes train: batches are slices of global batches
        self.shard: tuple[int, int] | None = None
        self._global = (0, 0)  # the last sharded batch: (pairs, tokens) over all ranks
        self._last_loss = float("nan")

    # -- data -------------------------------------------------------------------------------------
    def collate(self, records: Sequence[PreferenceRecord]) -> dict[str, Tensor]:
        """Records -> one padded batch of ``[chosen..., rejected...]`` plus the frozen per-pair inputs."""
        prompts = [r["prompt"] for r in records]
        batch = dict(
            self.policy.encode(
                prompts + prompts, [r["chosen"] for r in records] + [r["rejected"] for r in records]
            )
        )
        for key in required_keys(self.solver):
            batch[key] = torch.tensor([float(r[key]) for r in records], dtype=torch.float32)  # type: ignore[literal-required]
        return batch

    def dataloader(self, records: Sequence[PreferenceRecord], train: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.cfg.seed)
        if self.shard is not None:  # this rank's slices of the global batches one process would draw
            size = self.cfg.batch_size if train else self.cfg.eval_batch_size
            shuffle = train and self.cfg.shuffle
            sampler = GlobalBatchSampler(
                len(records), size, *self.shard, shuffle=shuffle, generator=generator
            )
            return DataLoader(
                ScaledRecords(records),
                batch_sampler=sampler,
                collate_fn=self.collate_scaled,
                generator=generator,
            )
        return DataLoader(
            list(records),
            batch_size=self.cfg.batch_size if train else self.cfg.eval_batch_size,
            shuffle=train and self.cfg.shuffle,
            collate_fn=self.collate,
            generator=generator,
        )

    def collate_scaled(self, items: Sequence[tuple[PreferenceRecord, float]]) -> dict[str, Tensor]:
        """:meth:`collate` plus each pair's loss scale (:class:`comalkit.distributed.GlobalBatchSampler`)."""
        batch = self.collate([record for record, _ in items])
        batch["pair_scale"] = torch.tensor([scale for _, scale in items], dtype=torch.float32)
        return batch

    # -- steps ------------------------------------------------------------------------------------
    def pair_logps(self, batch: Mapping[str, Tensor]) -> PairLogps:
        """Policy log-probs (with grad) of the batch, joined with its frozen inputs."""
        logps, counts = self.policy.sequence_logps(
            batch["input_ids"], batch["attention_mask"], batch["response_mask"], lean=self.cfg.lean_logps
        )
        logps, counts = logps.float(), counts.float()
        n = logps.shape[0] // 2
        return PairLogps(
            policy_chosen=logps[:n],
            policy_rejected=logps[n:],
            chosen_tokens=counts[:n],
            rejected_tokens=counts[n:],
            **{key: batch[key] for key in required_keys(self.solver)},
        )

    def loss_and_metrics(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The solver's loss on one collated batch and its TRL-named metrics (docs/training.md)."""
        pairs = self.pair_logps(batch)
        out = self.solver.loss(pairs)
        if "pair_scale" in batch:
            return self._global_step(batch, pairs, out)
        loss = out.mean(pairs.weight)
        chosen, rejected = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": pairs.policy_chosen.detach().mean(),
            "logps/rejected": pairs.policy_rejected.detach().mean(),
        }
        return loss, metrics

    def _global_step(
        self, batch: Mapping[str, Tensor], pairs: PairLogps, out: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One rank's share of a global batch: a loss whose DDP-averaged gradient is the global batch's
        mean loss, and the global batch's metrics (summed over ranks, so every rank logs the same)."""
        scale = batch["pair_scale"].to(out.losses.device)
        real = (scale > 0).float()
        chosen, rejected = out.chosen_rewards.detach().float(), out.rejected_rewards.detach().float()
        rows = torch.stack(
            [
                out.losses.detach().float(),
                chosen,
                rejected,
                (chosen > rejected).float(),
                chosen - rejected,
                pairs.policy_chosen.detach().float(),
                pairs.policy_rejected.detach().float(),
            ]
        )
        tokens = (batch["attention_mask"].sum(1).view(2, -1).sum(0).to(real.device) * real).sum()
        sums = torch.cat([(rows * real).sum(1), real.sum().view(1), tokens.float().view(1)])
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        means = sums[:7] / sums[7]
        self._global = (int(sums[7]), int(sums[8]))
        # a non-finite loss on any rank makes every rank's loss nan, so all ranks stop or skip together
        loss = (out.losses * scale).sum() + 0.0 * means[0]
        names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")
        names += ("logps/chosen", "logps/rejected")
        return loss, dict(zip(names, means, strict=True))

    def _pairs_in(self, batch: Mapping[str, Tensor]) -> int:
        return self._global[0] if "pair_scale" in batch else batch["input_ids"].shape[0] // 2

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        loss, metrics = self.loss_and_metrics(batch)
        if not torch.isfinite(loss):
            if self.cfg.on_nonfinite == "skip":
                self.skipped_batches += 1
                return None  # Lightning skips backward and the optimizer step
            raise NonFiniteError(f"{self._where()}: the loss is {float(loss)}{self._hint()}")
        self._last_loss = float(loss.detach())
        self._tokens_seen += self._global[1] if "pair_scale" in batch else int(batch["attention_mask"].sum())
        metrics["num_tokens"] = torch.tensor(float(self._tokens_seen))
        metrics["learning_rate"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=self._pairs_in(batch))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, metrics = self.loss_and_metrics(batch)
        metrics = {f"eval_{k}": v for k, v in metrics.items()}
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=self._pairs_in(batch), sync_dist=True)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            # under 16-mixed the grad scaler itself skips steps with inf gradients (it then lowers its scale)
            if not torch.isfinite(norm) and self.cfg.precision != "16-mixed":
                if self.cfg.on_nonfinite != "skip":
                    raise NonFiniteError(f"{self._where()}: the gradient norm is {float(norm)}{self._hint()}")
                self.skipped_batches += 1
                optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are not updated
                return
            self.log("grad_norm", norm, on_step=True, on_epoch=False)

    def _where(self) -> str:
        return f"training stopped at epoch {self.current_epoch}, step {self.global_step}"

    def _hint(self) -> str:
        fp32 = "" if self.cfg.precision in ("32-true", "32", "64-true") else ", use trainer.precision=32-true"
        return (
            f" (last finite loss {self._last_loss:.4g}, trainer.lr={self.cfg.lr}, trainer.precision="
            f"{self.cfg.precision}); lower trainer.lr{fp32}, or set trainer.on_nonfinite=skip to skip such "
            "batches. Nothing was saved."
        )

    # -- optimisation ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the policy has no trainable parameters (is every weight frozen?)")
        optimizer = build_optimizer(self.cfg, params)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = lr_lambda(self.cfg.scheduler, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


def check_finite_weights(model: torch.nn.Module, module: PreferenceModule | None = None) -> None:
    """Raise :class:`NonFiniteError` if a trainable weight is nan or inf, so it is never saved."""
    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p).all()):
            where = module._where() if module is not None else "training"
            hint = module._hint() if module is not None else ""
            raise NonFiniteError(f"{where}: the trained weight {name} holds nan or inf{hint}")
