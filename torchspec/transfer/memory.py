"""The `memory` store: hidden-state records kept as they are, in this process, on the engine's device.

For colocated runs (`inference.colocate: true`), where the engine and the trainer share one process and
one device: a record never leaves the device (no copy to shared memory and back, no host round trip).
`inference.store: auto` picks it for colocated runs. Capacity is accounted in bytes like the other
stores; a put that does not fit fails at once (nothing else in the process could free room meanwhile).

Streams: on CUDA the engine may put from its own stream (the colocated engine's forwards run on a side
stream, ahead of the trainer: torchspec.pipeline.launcher_local.InlineEngines). A put therefore marks where
its record is complete on the putting stream (a CUDA event), and a `get` makes the reading stream wait for
that mark before copying and tells the caching allocator that the reading stream used the record, so its
memory is not reused by the putting stream before that copy has run.
"""

from __future__ import annotations

import torch

from torchspec.transfer.base import StoreFull, over_capacity


class MemoryStore:
    def __init__(self, capacity_bytes: int | None = None):
        self.capacity_bytes = capacity_bytes
        self._records: dict[str, dict[str, torch.Tensor]] = {}
        self._sizes: dict[str, int] = {}
        self._ready: dict[str, torch.cuda.Event | None] = {}   # where each record is complete (CUDA records)
        self._used = 0
        self._put_bytes = 0

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        if key in self._records:
            raise KeyError(f"memory store: key {key!r} is already present")
        # own, compact copies: a view into an engine's padded batch output would keep the whole batch alive
        record = {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
        nbytes = sum(v.numel() * v.element_size() for v in record.values())
        if self.capacity_bytes is not None and self._used + nbytes > self.capacity_bytes:
            if nbytes > self.capacity_bytes:
                raise over_capacity("memory", nbytes, self.capacity_bytes, self._used)
            raise StoreFull(f"memory store: a record of {nbytes} bytes does not fit (inference.store_capacity "
                            f"{self.capacity_bytes} bytes, in use {self._used}) and this store cannot wait: the "
                            "trainer that frees it runs in this process; raise inference.store_capacity or lower "
                            "inference.max_sample_pool_size")
        self._records[key], self._sizes[key] = record, nbytes
        self._ready[key] = _mark_ready(record)
        self._used += nbytes
        self._put_bytes += nbytes

    def get(self, key: str) -> dict[str, torch.Tensor]:
        try:
            record, ready = self._records[key], self._ready[key]
        except KeyError:
            raise KeyError(f"memory store: no key {key!r}") from None
        if ready is not None:   # put from another stream, maybe: wait for it, and keep the memory until read
            reading = torch.cuda.current_stream(_cuda_device(record))
            reading.wait_event(ready)
            for v in record.values():
                if v.is_cuda:
                    v.record_stream(reading)
        # copies (device to device): a reader's writes never reach the stored record
        return {k: v.clone() for k, v in record.items()}

    def delete(self, key: str) -> None:
        try:
            del self._records[key]
            del self._ready[key]
        except KeyError:
            raise KeyError(f"memory store: no key {key!r}") from None
        self._used -= self._sizes.pop(key)

    def keys(self) -> list[str]:
        return sorted(self._records)

    def bytes_used(self) -> int:
        return self._used

    def put_stats(self) -> tuple[int, float]:
        """(bytes put, seconds spent in put): puts here are device copies, not transfers; no time is kept."""
        return self._put_bytes, 0.0

    def clear(self) -> None:
        self._records.clear()
        self._sizes.clear()
        self._ready.clear()
        self._used = 0

    def close(self) -> None:
        self.clear()

    def __getstate__(self):
        raise TypeError("the memory store lives in one process (inference.colocate); it cannot be sent to another")


def _cuda_device(record: dict[str, torch.Tensor]) -> torch.device:
    """The CUDA device of a record's tensors."""
    return next(v.device for v in record.values() if v.is_cuda)


def _mark_ready(record: dict[str, torch.Tensor]) -> torch.cuda.Event | None:
    """An event recorded on the current stream after the record's copies (None: no CUDA tensor in it)."""
    if not any(v.is_cuda for v in record.values()):
        return None
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(_cuda_device(record)))
    return ready
