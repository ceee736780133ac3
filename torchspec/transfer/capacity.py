"""The store's byte budget: `inference.store_capacity` (or its default, a share of the free space), the bytes of
one record, and whether the budget can hold what a run must keep in the store at once (checked at start).

The controller admits samples by bytes: it gives an engine a prompt only when the records of the pool, of the
engines' batches in progress and of the sets taken by the trainer (read ahead or training) stay within the
budget, so no put has to wait for room. What the budget must then hold is one step: `micro_batch_size` x
trainer ranks records of `training.max_seq_length` tokens (`record_bytes`: the exact bytes the stores account,
header included). With less, the pool could never hold a step and the run would wait for good.

The Mooncake store has a second bound, per process: each client's staging buffer (`mooncake.local_buffer_size`)
through which every put and get passes. `mooncake_buffer_bytes` sizes what it must hold, `mooncake.max_batch_size`
records of `mooncake.max_seq_len` tokens at `mooncake.hidden_dim` (the store lets no more records than that
through one client at once), and `check_mooncake` refuses a config where that does not fit, where training makes
longer records than `max_seq_len`, or where `hidden_dim` is not the target's hidden size.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch

from torchspec.config.errors import ConfigError
from torchspec.transfer import record


@dataclass(frozen=True)
class StoreBudget:
    """The bytes the store may hold (None: no bound) and where that number comes from, for messages."""
    capacity: int | None
    source: str   # "inference.store_capacity=12.0 GB" or "inference.store_capacity=null: 50% of ..."


def _available_ram() -> int:
    """Bytes of RAM the kernel says can be had without swapping (MemAvailable), else the free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _free_bytes(kind: str, device) -> tuple[int, str]:
    """(free bytes where a `kind` store keeps its records, what was measured) for the default capacity."""
    if kind == "local":
        from torchspec.transfer.local import store_base

        base = store_base()
        return shutil.disk_usage(base).free, f"free in {base}"
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0], f"free memory of {device}"
    return _available_ram(), "available RAM"


def store_budget(cfg, kind: str, device=None) -> StoreBudget:
    """inference.store_capacity when set; else, for the local and memory stores, STORE_CAPACITY_SHARE of the
    free space where they keep records (/dev/shm; the engine's device memory, or RAM on CPU), measured now.
    `kind` is the store type (`factory.store_type`), `device` the memory store's device."""
    from torchspec.config.schema import STORE_CAPACITY_SHARE

    capacity = cfg.inference.store_capacity
    if capacity is not None:
        return StoreBudget(int(capacity), f"inference.store_capacity={_mb(capacity)}")
    share = STORE_CAPACITY_SHARE.get(kind)
    if share is None:   # mooncake: its segment bounds it
        return StoreBudget(None, "inference.store_capacity=null (bounded by the Mooncake segment)")
    free, where = _free_bytes(kind, device)
    capacity = int(free * share)
    return StoreBudget(capacity, f"inference.store_capacity=null: {share:.0%} of the {_mb(free)} {where} = "
                                 f"{_mb(capacity)}")


def record_bytes(num_tokens: int, hidden_size: int, num_aux_layers: int, dtype: torch.dtype) -> int:
    """Bytes of one hidden-state record of `num_tokens` tokens as the stores account them (header included)."""
    meta = {
        "input_ids": torch.empty(num_tokens, dtype=torch.long, device="meta"),
        "loss_mask": torch.empty(num_tokens, dtype=torch.uint8, device="meta"),
        "aux_hidden_states": torch.empty(num_tokens, num_aux_layers * hidden_size, dtype=dtype, device="meta"),
        "final_hidden_states": torch.empty(num_tokens, hidden_size, dtype=dtype, device="meta"),
    }
    return record.layout(meta)[2]


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _given(cfg) -> StoreBudget:
    capacity = cfg.inference.store_capacity
    return StoreBudget(capacity, f"inference.store_capacity={_mb(capacity) if capacity is not None else 'null'}")


def _one_record(cfg, hidden_size: int, num_aux_layers: int, dtype: torch.dtype) -> tuple[int, str]:
    n = cfg.training.max_seq_length
    one = record_bytes(n, hidden_size, num_aux_layers, dtype)
    return one, (f"one record of training.max_seq_length={n} tokens is {_mb(one)} (target hidden size "
                 f"{hidden_size}, {num_aux_layers} aux layers + the final one, {str(dtype).removeprefix('torch.')})")


def check_store_capacity(cfg, hidden_size: int, num_aux_layers: int, dtype: torch.dtype, num_ranks: int,
                         budget: StoreBudget | None = None) -> None:
    """ConfigError naming the keys when the store's budget (`store_budget`; default: inference.store_capacity
    as given) cannot hold one step's records of the longest length."""
    budget = budget or _given(cfg)
    capacity = budget.capacity
    if capacity is None:
        return
    one, what = _one_record(cfg, hidden_size, num_aux_layers, dtype)
    if one > capacity:
        raise ConfigError(f"{budget.source} is smaller than one record: {what}; raise inference.store_capacity "
                          f"to at least {_mb(one)} or lower training.max_seq_length")
    mbs = cfg.training.micro_batch_size
    need = mbs * num_ranks
    if need * one > capacity:
        raise ConfigError(
            f"{budget.source} holds {capacity // one} record(s) but a step needs {need}: "
            f"training.micro_batch_size={mbs} x {num_ranks} rank(s) ({what}); raise inference.store_capacity to at "
            f"least {_mb(need * one)}, or lower training.micro_batch_size or training.max_seq_length")


def check_hidden_dim(cfg, hidden_size: int) -> None:
    """mooncake.hidden_dim, when set, must be the target's hidden size (the H of every record)."""
    hd = cfg.mooncake.hidden_dim
    if hd is not None and hd != hidden_size:
        raise ConfigError(f"mooncake.hidden_dim={hd} but the target's hidden size is {hidden_size} "
                          f"(model.target_model_path={cfg.model.target_model_path}); set mooncake.hidden_dim="
                          f"{hidden_size} or null (null = the target's)")


def mooncake_buffer_bytes(mc, hidden_size: int, num_aux_layers: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of one record of mooncake.max_seq_len tokens, bytes of mooncake.max_batch_size of them): what one
    Mooncake client's staging buffer must hold. H is mooncake.hidden_dim, else `hidden_size` (the target's)."""
    one = record_bytes(mc.max_seq_len, mc.hidden_dim or hidden_size, num_aux_layers, dtype)
    return one, mc.max_batch_size * one


def check_mooncake(cfg, hidden_size: int, num_aux_layers: int, dtype: torch.dtype) -> None:
    """ConfigError naming the keys when mooncake.hidden_dim is not the target's hidden size, when
    training.max_seq_length exceeds mooncake.max_seq_len, or when mooncake.max_batch_size records of max_seq_len
    tokens do not fit mooncake.local_buffer_size (each client's staging buffer)."""
    check_hidden_dim(cfg, hidden_size)
    mc, n = cfg.mooncake, cfg.training.max_seq_length
    if n > mc.max_seq_len:
        raise ConfigError(f"training.max_seq_length={n} is longer than mooncake.max_seq_len={mc.max_seq_len}, the "
                          f"longest record the Mooncake clients' buffers are sized for; raise mooncake.max_seq_len "
                          f"to at least {n} or lower training.max_seq_length")
    one, need = mooncake_buffer_bytes(mc, hidden_size, num_aux_layers, dtype)
    if need > mc.local_buffer_size:
        fit = mc.local_buffer_size // one
        lower = (f"mooncake.max_batch_size (to {fit} it fits) or mooncake.max_seq_len" if fit
                 else "mooncake.max_seq_len")
        raise ConfigError(
            f"mooncake.local_buffer_size={_mb(mc.local_buffer_size)} cannot hold mooncake.max_batch_size="
            f"{mc.max_batch_size} records of mooncake.max_seq_len={mc.max_seq_len} tokens ({_mb(one)} each: hidden "
            f"size {mc.hidden_dim or hidden_size}, {num_aux_layers} aux layers + the final one, "
            f"{str(dtype).removeprefix('torch.')}) = {_mb(need)}; raise mooncake.local_buffer_size to at least "
            f"{_mb(need)}, or lower {lower}")


def store_plan(cfg, hidden_size: int, num_aux_layers: int, dtype: torch.dtype, num_ranks: int,
               budget: StoreBudget) -> list[str]:
    """What the dry run prints about the store: the bytes of a record at the configured lengths and the most the
    store holds at once (by the sample counts, and by the byte budget)."""
    tr, inf = cfg.training, cfg.inference
    one, what = _one_record(cfg, hidden_size, num_aux_layers, dtype)
    step = tr.micro_batch_size * num_ranks
    # pool + engines' batches (max_sample_pool_size) + the sets taken: read ahead, and the one training
    records = inf.max_sample_pool_size + (int(tr.prefetch_depth) + 1) * step
    by_count = records * one
    lines = [f"bytes per record: {what}; a record of n tokens is about n/{tr.max_seq_length} of it",
             f"peak store bytes by sample counts: {_mb(by_count)} = {records} records (inference.max_sample_pool_size="
             f"{inf.max_sample_pool_size} + (training.prefetch_depth={tr.prefetch_depth} + 1) x {step} per step)"]
    if budget.capacity is None:
        lines.append(f"peak store bytes: {_mb(by_count)} ({budget.source})")
    else:
        lines.append(f"peak store bytes: {_mb(min(by_count, budget.capacity))} (the budget: {budget.source}"
                     + ("; the controller pauses the engines at it)" if by_count > budget.capacity else ")"))
    return lines
