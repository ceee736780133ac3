"""Whether `inference.store_capacity` can hold what a run must keep in the store at once, checked at start.

The largest record is one sample of `training.max_seq_length` tokens (`record_bytes`: the exact bytes the
store accounts, header included). A run stalls for good unless the store can hold, in records of that size,

    micro_batch_size x trainer ranks  (the samples of one step, which must all be in the pool)
  + (inference_batch_size - 1) x engines  (each engine's batch in progress: its records count from its
                                          first put, and the controller sees them only once the batch ends)

With less, every engine can be waiting for room inside a batch while the pool holds less than a step:
nothing is freed and the puts fail after their timeout (10 minutes) instead of at once. A colocated run
(the engine inside the trainer's process) must hold the whole pool, `max_sample_pool_size` records: its
puts happen while the trainer waits for them, so nothing is freed during a put.
"""

from __future__ import annotations

import torch

from torchspec.config.errors import ConfigError
from torchspec.transfer import record


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


def check_store_capacity(cfg, hidden_size: int, num_aux_layers: int, dtype: torch.dtype, num_engines: int,
                         num_ranks: int) -> None:
    """ConfigError naming the keys when inference.store_capacity cannot hold what the run needs at once."""
    capacity = cfg.inference.store_capacity
    if capacity is None:
        return
    tr, inf = cfg.training, cfg.inference
    one = record_bytes(tr.max_seq_length, hidden_size, num_aux_layers, dtype)
    what = (f"one record of training.max_seq_length={tr.max_seq_length} tokens is {_mb(one)} (target hidden size "
            f"{hidden_size}, {num_aux_layers} aux layers + the final one, {str(dtype).removeprefix('torch.')})")
    if one > capacity:
        raise ConfigError(f"inference.store_capacity={_mb(capacity)} is smaller than one record: {what}; raise "
                          f"inference.store_capacity to at least {_mb(one)} or lower training.max_seq_length")
    if inf.colocate:   # the engine runs in the trainer's process: nothing frees room while a put waits
        need = inf.max_sample_pool_size
        why = (f"the pool's inference.max_sample_pool_size={need} samples (a colocated run's engine puts while the "
               "trainer, which frees records, waits for it)")
        fix = "inference.max_sample_pool_size"
    else:
        need = tr.micro_batch_size * num_ranks + (inf.inference_batch_size - 1) * num_engines
        why = (f"a step's training.micro_batch_size={tr.micro_batch_size} x {num_ranks} rank(s) plus "
               f"inference.inference_batch_size={inf.inference_batch_size} - 1 for each of {num_engines} engine(s)")
        fix = "inference.inference_batch_size, training.micro_batch_size"
    if need * one > capacity:
        raise ConfigError(
            f"inference.store_capacity={_mb(capacity)} holds {capacity // one} record(s) but the run may need {need} "
            f"at once: {why} ({what}); raise inference.store_capacity to at least {_mb(need * one)}, or lower "
            f"{fix} or training.max_seq_length")
