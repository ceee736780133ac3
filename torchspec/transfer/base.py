"""The Store protocol: where engines put per-sample hidden-state records and trainers get them.

A record is a flat ``dict[str, Tensor]`` (see docs/interfaces.md, "Hidden-state record"). Stores
account capacity in bytes; ``bytes_used()`` returns to 0 once every key has been deleted.
Implementations: ``local`` (embedded, shared memory on one node, this package) and ``mooncake``.
"""

from __future__ import annotations

import logging
import time
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
    if nbytes > capacity:   # no wait can help: it is larger than the whole store
        return StoreFull(f"{store} store: a record of {nbytes} bytes is larger than inference.store_capacity "
                         f"({capacity} bytes); raise inference.store_capacity or lower training.max_seq_length")
    return StoreFull(f"{store} store: no room for a record of {nbytes} bytes within the put's timeout (capacity "
                     f"{capacity}, in use {used}): nothing was freed, so the trainer took no samples in that time; "
                     "look for what held it up (logged above), or raise inference.store_capacity")


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


FULL_LOG_AFTER_S = 1.0    # a put that has waited this long for room is logged ...
FULL_LOG_EVERY_S = 30.0   # ... and again this often while it keeps waiting

_log = logging.getLogger("torchspec.transfer")


class RoomWait:
    """One put waiting for room in a full store: logged after FULL_LOG_AFTER_S and every FULL_LOG_EVERY_S
    after, with what it waits for, so a stall is never silent until the StoreFull at the timeout."""

    def __init__(self, store: str, nbytes: int, capacity: int, timeout_s: float):
        self.store, self.nbytes, self.capacity, self.timeout_s = store, nbytes, capacity, timeout_s
        self.t0 = time.monotonic()
        self._next = self.t0 + FULL_LOG_AFTER_S

    def still_waiting(self, used: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + FULL_LOG_EVERY_S
        _log.warning("%s store full: a record of %d bytes has waited %.0f s for room (inference.store_capacity "
                     "%d bytes, %d in use); it waits for the trainer to take samples and free theirs, and fails "
                     "with StoreFull after %.0f s", self.store, self.nbytes, now - self.t0, self.capacity, used,
                     self.timeout_s)
