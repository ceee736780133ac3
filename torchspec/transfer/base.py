"""The Store protocol: where engines put per-sample hidden-state records and trainers get them.

A record is a flat ``dict[str, Tensor]`` (see docs/interfaces.md, "Hidden-state record"). Stores
account capacity in bytes; ``bytes_used()`` returns to 0 once every key has been deleted.
Implementations: ``local`` (embedded, shared memory on one node, this package) and ``mooncake``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


# How long a put waits for room before raising StoreFull (configs/README.md: "after 10 minutes").
PUT_TIMEOUT_S = 600.0


class StoreFull(RuntimeError):
    """A put did not fit in the store's capacity before its timeout."""


class StoreUnavailable(RuntimeError):
    """The store's service is gone (the Mooncake master stopped answering): the run cannot go on. The text is
    one line naming the service's address and the operation that failed; the runner adds the checkpoint to
    resume from."""


def over_capacity(store: str, nbytes: int, capacity: int, used: int) -> StoreFull:
    """The StoreFull of a put that `capacity_bytes` (inference.store_capacity) kept out."""
    return StoreFull(f"{store} store: a record of {nbytes} bytes does not fit (capacity {capacity}, in use {used}); "
                     "raise the store capacity or lower inference.max_sample_pool_size")


@runtime_checkable
class Store(Protocol):
    capacity_bytes: int | None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None: ...

    def get(self, key: str) -> dict[str, torch.Tensor]: ...

    def delete(self, key: str) -> None: ...

    def bytes_used(self) -> int: ...

    def keys(self) -> list[str]: ...

    def close(self) -> None: ...


def record_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Payload bytes of a record (what the capacity accounting counts)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
