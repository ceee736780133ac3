"""Optimizer and learning-rate schedule builders for the draft trainer.

All step counts here are OPTIMIZER steps (one step = `draft_accumulation_steps` micro-batches on
every data-parallel rank), as `training.lr_total_steps` and `training.num_train_steps` count them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from torchspec.config.schema import LR_DECAY_STYLES


def build_optimizer(model: torch.nn.Module, training) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model`.

    Weight decay (`training.weight_decay`) applies to matrices only; norms' gains and biases
    (1-D parameters) are not decayed. Frozen parameters (e.g. the target's embeddings) are skipped.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the draft model has no trainable parameters")
    groups = [g for g in (
        {"params": decay, "weight_decay": float(training.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ) if g["params"]]
    return torch.optim.AdamW(groups, lr=float(training.learning_rate), betas=(0.9, 0.95), eps=1e-8)


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return int(warmup_ratio * total_steps)


def lr_at(step: int, *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          style: str) -> float:
    """The learning rate used by optimizer step number `step` (1-based).

    Linear warmup: step n <= warmup_steps uses peak_lr * n / warmup_steps. Then decay from peak_lr
    to min_lr over the remaining steps: at step total_steps (and after) the rate is min_lr, except
    for the `constant` style which stays at peak_lr.
    """
    if style not in LR_DECAY_STYLES:
        raise ValueError(f"training.lr_decay_style: unknown style {style!r}; expected one of {LR_DECAY_STYLES}")
    if warmup_steps > 0 and step <= warmup_steps:
        return peak_lr * step / warmup_steps
    if style == "constant":
        return peak_lr
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    coeff = 1.0 - progress if style == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (peak_lr - min_lr) * coeff


class _LRFactor:
    """Picklable multiplier for LambdaLR: lr_at(n) / peak, with n = scheduler epoch + 1."""

    def __init__(self, peak_lr, min_lr, warmup_steps, total_steps, style):
        self.kw = dict(peak_lr=peak_lr, min_lr=min_lr, warmup_steps=warmup_steps,
                       total_steps=total_steps, style=style)

    def __call__(self, epoch: int) -> float:
        return lr_at(epoch + 1, **self.kw) / self.kw["peak_lr"]


def build_lr_scheduler(optimizer: torch.optim.Optimizer, training, total_steps: int,
                       start_step: int = 0) -> LambdaLR:
    """Warmup (training.warmup_ratio of total_steps) + lr_decay_style decay to training.min_lr.

    After k calls of `scheduler.step()` the optimizer's lr is the one step start_step+k+1 uses
    (start_step > 0: the schedule of a resumed run, positioned after its start_step optimizer steps).
    """
    peak = float(training.learning_rate)
    if peak <= 0:
        raise ValueError(f"training.learning_rate must be > 0, got {peak}")
    if total_steps <= 0:
        raise ValueError(f"the lr schedule needs a positive number of optimizer steps, got {total_steps}")
    factor = _LRFactor(peak, float(training.min_lr), warmup_steps_for(total_steps, float(training.warmup_ratio)),
                       int(total_steps), str(training.lr_decay_style))
    factor(0)  # validate the style now, not at the first step
    for group in optimizer.param_groups:   # the peak every group's lr is a fraction of
        group["initial_lr"] = group["lr"] = peak
    return LambdaLR(optimizer, factor, last_epoch=int(start_step) - 1)


@dataclass(frozen=True)
class StepPlan:
    steps_per_epoch: int     # optimizer steps in one pass over the data
    num_train_steps: int     # optimizer steps of the whole run
    num_epochs: int
    lr_total_steps: int      # steps the lr schedule spans


def plan_steps(training, num_samples: int, dp_world: int = 1) -> StepPlan:
    """Resolve optimizer-step counts from the dataset size.

    One optimizer step consumes micro_batch_size * draft_accumulation_steps * dp_world samples;
    an epoch's last, partial step counts (every sample is trained once per epoch).
    `training.num_train_steps`, when set, wins and fixes the number of epochs; otherwise
    num_epochs passes. `training.lr_total_steps`, when set, is the schedule's length; otherwise
    the run's length.
    """
    if num_samples <= 0:
        raise ValueError("the training dataset has no samples")
    micro_batches = math.ceil(num_samples / (int(training.micro_batch_size) * int(dp_world)))
    steps_per_epoch = math.ceil(micro_batches / int(training.draft_accumulation_steps))
    if training.num_train_steps is not None:
        num_train_steps = int(training.num_train_steps)
        num_epochs = math.ceil(num_train_steps / steps_per_epoch)
    else:
        num_epochs = int(training.num_epochs)
        num_train_steps = num_epochs * steps_per_epoch
    lr_total = int(training.lr_total_steps) if training.lr_total_steps is not None else num_train_steps
    return StepPlan(steps_per_epoch, num_train_steps, num_epochs, lr_total)
