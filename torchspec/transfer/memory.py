"""The `memory` store: hidden-state records kept as they are, in this process, on the engine's device.

For colocated runs (`inference.colocate: true`), where the engine and the trainer share one process and
one device: a record never leaves the device (no copy to shared memory and back, no host round trip).
`inference.store: auto` picks it for colocated runs. Capacity is accounted in bytes like the other
stores; a put that does not fit fails at once (nothing else in the process could free room meanwhile).
"""

from __future__ import annotations

import torch

from torchspec.transfer.base import StoreFull, over_capacity


class MemoryStore:
    def __init__(self, capacity_bytes: int | None = None):
        self.capacity_bytes = capacity_bytes
        self._records: dict[str, dict[str, torch.Tensor]] = {}
        self._sizes: dict[str, int] = {}
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
        self._used += nbytes
        self._put_bytes += nbytes

    def get(self, key: str) -> dict[str, torch.Tensor]:
        try:   # copies (device to device): a reader's writes never reach the stored record
            return {k: v.clone() for k, v in self._records[key].items()}
        except KeyError:
            raise KeyError(f"memory store: no key {key!r}") from None

    def delete(self, key: str) -> None:
        try:
            del self._records[key]
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
        self._used = 0

    def close(self) -> None:
        self.clear()

    def __getstate__(self):
        raise TypeError("the memory store lives in one process (inference.colocate); it cannot be sent to another")
