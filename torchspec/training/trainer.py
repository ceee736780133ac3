"""The draft trainer: one micro-batch in, at most one optimizer step out.

`Trainer.train_step` runs the Eagle3 TTT forward + loss on one micro-batch, accumulates gradients
over `training.draft_accumulation_steps` micro-batches, then clips (`max_grad_norm`), steps AdamW
and the lr schedule. On CUDA the forward runs under bf16 autocast with fp32 master weights.
Parallelism is applied to the draft by `torchspec.training.parallel`; this file is rank-agnostic
apart from passing `dist` there.
"""

from __future__ import annotations

import random
from typing import Callable

import torch

from torchspec.training import parallel
from torchspec.training.optim import build_lr_scheduler, build_optimizer
from torchspec.training.phases import PhaseClock

BATCH_KEYS = ("input_ids", "loss_mask", "attention_mask", "aux_hidden_states", "final_hidden_states")


def seed_everything(seed: int) -> None:
    """Seed python, numpy (when installed) and torch (CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return
    np.random.seed(seed % 2**32)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _default_loss_fn():
    from torchspec.models.eagle3 import eagle3_loss

    return eagle3_loss


class Trainer:
    """Owns the (parallelised) draft, AdamW, the lr schedule and the step counters.

    cfg: the run config (reads `cfg.training`). total_steps: optimizer steps the lr schedule spans
    when `training.lr_total_steps` is unset (the runner passes `plan_steps(...).lr_total_steps`).
    loss_fn(draft, target_head, batch, ttt_length, attention_backend) -> object with `.loss` and
    `.accs`; defaults to `torchspec.models.eagle3.eagle3_loss`.
    """

    def __init__(self, cfg, draft: torch.nn.Module, target_head: torch.nn.Module | None, device,
                 dist=None, *, total_steps: int | None = None, loss_fn: Callable | None = None):
        self.training = training = cfg.training
        self.device = torch.device(device)
        self.dist = dist
        self.accumulation_steps = int(training.draft_accumulation_steps)
        if self.accumulation_steps < 1:
            raise ValueError(f"training.draft_accumulation_steps must be >= 1, got {self.accumulation_steps}")
        self.max_grad_norm = training.max_grad_norm
        self.ttt_length = int(training.ttt_length)
        self.attention_backend = str(training.attention_backend)
        self.loss_fn = loss_fn or _default_loss_fn()
        seed_everything(int(training.seed))

        draft = draft.to(self.device)
        self.model = parallel.parallelize_draft(draft, dist, training.parallel_mode, self.device)
        self.target_head = target_head.to(self.device).eval() if target_head is not None else None
        if self.target_head is not None:
            self.target_head.requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, training)
        lr_steps = training.lr_total_steps if training.lr_total_steps is not None else total_steps
        if lr_steps is None:
            raise ValueError("the lr schedule length is unknown: set training.lr_total_steps or pass "
                             "total_steps (see torchspec.training.optim.plan_steps)")
        self.lr_steps = int(lr_steps)
        self.scheduler = build_lr_scheduler(self.optimizer, training, self.lr_steps)
        self.global_step = 0      # optimizer steps taken
        self.micro_step = 0       # micro-batches accumulated towards the next optimizer step
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        self.clock = PhaseClock(self.device)   # per-phase step times (torchspec.training.phases)

    # -- forward ---------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _forward(self, batch: dict):
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            return self.loss_fn(self.model, self.target_head, batch, self.ttt_length, self.attention_backend,
                                loss_mask_alignment=self.training.loss_mask_alignment,
                                gradient_checkpointing=bool(self.training.gradient_checkpointing),
                                checkpoint_steps=self.training.gradient_checkpointing_steps)

    @staticmethod
    def _metrics(out, counts: bool = False) -> dict:
        """loss, loss_k, acc_k; with counts, also "counts": {"num_valid": [...], "correct": [...], "loss_sum":
        [...]} (per TTT step, numbers) for exact pooling over batches. One host sync for all of them."""
        scalars = {"loss": [out.loss], "acc": list(out.accs), "loss_k": list(getattr(out, "losses", None) or [])}
        if counts:
            scalars.update(correct=list(getattr(out, "correct", None) or []),
                           loss_sum=list(getattr(out, "loss_sums", None) or []))
        device = out.loss.device
        flat = [torch.as_tensor(v).detach().float().reshape(()).to(device) for vals in scalars.values() for v in vals]
        it = iter(torch.stack(flat).tolist())
        got = {name: [next(it) for _ in vals] for name, vals in scalars.items()}
        m = {"loss": got["loss"][0]}
        m.update({f"acc_{k}": v for k, v in enumerate(got["acc"])})
        m.update({f"loss_{k}": v for k, v in enumerate(got["loss_k"])})
        if counts:
            m["counts"] = {"num_valid": [float(n) for n in getattr(out, "num_valid", None) or []],
                           "correct": got["correct"], "loss_sum": got["loss_sum"]}
        return m

    # -- training ----------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """Forward + backward of one micro-batch; steps the optimizer every accumulation_steps calls.

        Returns the micro-batch's loss / acc_k (/ loss_k) and `stepped`; when it stepped, also
        `step` (global_step after the step), `lr` (the rate that step used) and `grad_norm`
        (before clipping). Each micro-batch's loss is divided by accumulation_steps, so N
        accumulated micro-batches give the mean of their losses' gradients.
        """
        self.model.train()
        clock = self.clock
        with clock.phase("h2d"):
            batch = self._to_device(batch)
        last = self.micro_step + 1 == self.accumulation_steps
        with parallel.grad_sync(self.model, last):
            with clock.phase("forward"):
                out = self._forward(batch)
            with clock.phase("backward"):
                (out.loss / self.accumulation_steps).backward()
        self.micro_step += 1
        with clock.phase("metrics"):
            metrics = self._metrics(out)
        metrics["stepped"] = last
        if last:
            metrics.update(self._optimizer_step())
        return metrics

    def finish_accumulation(self) -> dict | None:
        """Step on a partial accumulation window (end of data): grads rescaled to the window's mean.

        With several ranks, every rank must call it (the DDP gradients are all-reduced here)."""
        if self.micro_step == 0:
            return None
        scale = self.accumulation_steps / self.micro_step
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        parallel.all_reduce_grads(self.model)  # DDP skipped the sync of this window's backward calls
        return self._optimizer_step()

    def _optimizer_step(self) -> dict:
        max_norm = float(self.max_grad_norm) if self.max_grad_norm and self.max_grad_norm > 0 else float("inf")
        with self.clock.phase("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            grad_norm = float(grad_norm)
        self.global_step += 1
        self.micro_step = 0
        return {"step": self.global_step, "lr": lr, "grad_norm": grad_norm}

    @torch.no_grad()
    def eval_step(self, batch: dict) -> dict:
        """Metrics of one batch, plus their "counts" (num_valid, correct, loss_sum per TTT step) to pool batches."""
        self.model.eval()
        return self._metrics(self._forward(self._to_device(batch)), counts=True)

    # -- state -------------------------------------------------------------------------------------
    @property
    def draft(self) -> torch.nn.Module:
        """The draft module itself (under any DDP wrapper)."""
        return parallel.unwrap(self.model)

    def _frozen_names(self) -> set[str]:
        return {n for n, p in self.draft.named_parameters() if not p.requires_grad}

    def state_dict(self) -> dict:
        """Full (unsharded, CPU) state; a collective under FSDP, so call it on every rank.

        "model" holds the draft's trained parameters and its buffers; frozen parameters (the
        target's embeddings) are left out: they come from the target at load time.
        """
        if self.micro_step:
            raise RuntimeError("state_dict() in the middle of an accumulation window: save after a step")
        frozen = self._frozen_names()
        return {
            "model": {k: v for k, v in parallel.full_model_state(self.model).items() if k not in frozen},
            "optimizer": parallel.full_optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "global_step": self.global_step,
        }

    def load_state_dict(self, state: dict, weights_only: bool = False) -> None:
        """Restore a `state_dict()`; weights_only (continual training) loads the model alone."""
        own = set(self.draft.state_dict())
        missing, unknown = own - set(state["model"]) - self._frozen_names(), set(state["model"]) - own
        if missing or unknown:
            raise ValueError(f"checkpoint weights do not match the draft: missing {sorted(missing)}, "
                             f"unknown {sorted(unknown)}")
        parallel.load_full_model_state(self.model, state["model"])
        if weights_only:
            return
        decay = [g["weight_decay"] for g in self.optimizer.param_groups]   # this config's
        parallel.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        for group, wd in zip(self.optimizer.param_groups, decay):
            group["weight_decay"] = wd
        set_rng_state(state["rng"])
        self.global_step = int(state["global_step"])
        self.micro_step = 0
        # The lr schedule is the one this config describes, at the resumed step: the saved scheduler's when
        # nothing changed (same numbers), the new one when num_train_steps / learning_rate / min_lr / ... did.
        self.scheduler = build_lr_scheduler(self.optimizer, self.training, self.lr_steps, start_step=self.global_step)
