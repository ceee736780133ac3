"""Data parallelism applied TO the draft model (the model file never mentions ranks).

`parallelize_draft` wraps the draft in DDP or shards it with FSDP2 (`fully_shard`) when the
world has more than one rank; with one rank the model is returned unchanged. The helpers below
hide the wrapper differences from the trainer: gradient-sync control during accumulation, the
unwrapped module, and full (unsharded) state dicts for checkpoints.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from torchspec.config.schema import PARALLEL_MODES


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the trainer's data-parallel world."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        """Read RANK / WORLD_SIZE / LOCAL_RANK as torchrun and our launchers set them."""
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size_of(dist) -> int:
    return 1 if dist is None else int(dist.world_size)


def parallelize_draft(draft: torch.nn.Module, dist, mode: str, device: torch.device) -> torch.nn.Module:
    """Return the draft ready for data-parallel training (the process group must be initialised).

    mode "ddp": DistributedDataParallel (replicated weights; the draft is one layer, so this is
    usually fastest). mode "fsdp": FSDP2 `fully_shard` on the root (one unit).
    """
    if world_size_of(dist) <= 1:
        return draft
    if mode not in PARALLEL_MODES:
        raise ValueError(f"training.parallel_mode: unknown mode {mode!r}; expected one of {PARALLEL_MODES}")
    if not tdist.is_initialized():
        raise RuntimeError("world_size > 1 but torch.distributed is not initialised; the launcher must "
                           "call init_process_group before building the Trainer")
    if mode == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return _ddp_class()(draft, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # One FSDP unit for the whole draft: the TTT loop calls the decoder layer's pieces (qkv, finish)
    # directly, not through the layer's forward, so per-layer units would never be unsharded. The
    # draft has one layer, so a single unit costs no extra memory.
    # The mesh names the trainer's device type: FSDP2's default mesh is CUDA whenever a GPU exists, which
    # would move a CPU (gloo) trainer's weights onto the GPU.
    fully_shard(draft, mesh=init_device_mesh(device.type, (world_size_of(dist),)))
    return draft


def _ddp_class():
    """DDP whose unknown attributes resolve on the wrapped draft (the loss reads `draft.d2t` etc.)."""
    from torch.nn.parallel import DistributedDataParallel

    class DraftDDP(DistributedDataParallel):
        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    return DraftDDP


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module under a DDP wrapper (FSDP2 shards in place, so it is already the module)."""
    return model.module if is_ddp(model) else model


def is_fsdp(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def is_ddp(model: torch.nn.Module) -> bool:
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def grad_sync(model: torch.nn.Module, enabled: bool):
    """Context for one micro-batch's backward during accumulation.

    DDP: gradients are all-reduced only when `enabled` (the window's last micro-batch); before that
    they accumulate locally in `.grad` (so a partial window can be reduced by hand, see
    `all_reduce_grads`). FSDP2 reduce-scatters every micro-batch: its sharded `.grad` is then always
    complete, which keeps partial windows correct; the draft is one layer, so this costs little.
    """
    if is_ddp(model) and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Average the locally accumulated DDP gradients over ranks (the no_sync part of a window)."""
    if not is_ddp(model):
        return
    for p in model.parameters():
        if p.grad is not None:
            tdist.all_reduce(p.grad, op=tdist.ReduceOp.AVG)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict with the draft's own parameter names (collective under FSDP)."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    unwrap(model).load_state_dict(state, strict=False)  # frozen params may be absent (checked by the caller)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)
