"""A trainer rank's read-ahead: micro-batches read from the store and put on the device in the background.

`training.prefetch_depth` micro-batches may be queued ahead of the one being trained; up to
`training.max_concurrent_batches` of them are read at the same time (reader threads). A read is the
store's `get` of each record, packing/padding them into one batch (torchspec.transfer.batch) and, on CUDA,
the copy to the device on a side stream, so that all of it overlaps the step in flight. `take()` hands the
batches back in the order they were submitted; the wait for one (zero when the read-ahead keeps up) is the
step's `read` phase.

A failed read raises in `take()` for that batch, with the reader's traceback chained.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch


class Prefetcher:
    def __init__(self, read: Callable[..., dict], device: torch.device | str, *, depth: int, workers: int):
        if depth < 1 or workers < 1:
            raise ValueError(f"prefetch depth and workers must be >= 1, got {depth} and {workers}")
        self.read, self.device, self.depth = read, torch.device(device), depth
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchspec-read")
        self.pending: deque[Future] = deque()
        self.cuda = self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.pending)

    @property
    def full(self) -> bool:
        """True when `depth` batches beyond the next one to be taken are already queued."""
        return len(self.pending) > self.depth

    def submit(self, *args) -> None:
        """Start reading read(*args) in the background; taken back in submission order."""
        self.pending.append(self.pool.submit(self._load, *args))

    def _load(self, *args):
        batch = self.read(*args)
        if not self.cuda:
            return batch, None
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            batch = {k: (v.pin_memory().to(self.device, non_blocking=True)
                         if torch.is_tensor(v) and v.device.type == "cpu" else v) for k, v in batch.items()}
            done = torch.cuda.Event()
            done.record(stream)
        return batch, done

    def take(self) -> dict:
        """The oldest submitted batch (waiting for its read), ready to use on the current stream."""
        if not self.pending:
            raise RuntimeError("prefetch: take() with nothing submitted")
        batch, done = self.pending.popleft().result()
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            for v in batch.values():   # the side stream's memory must not be reused before this stream is done
                if torch.is_tensor(v) and v.is_cuda:
                    v.record_stream(current)
        return batch

    def close(self) -> None:
        for f in self.pending:
            f.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)
