"""A trainer rank's read-ahead: micro-batches read from the store and put on the device in the background.

The runner decides what is submitted (`training.prefetch_depth` micro-batches ahead of the one being
trained); up to `training.max_concurrent_batches` of them are read at the same time (reader threads). A read is the
store's `get` of each record, packing/padding them into one batch (torchspec.transfer.batch) and, on CUDA,
the copy to the device on a side stream, so that all of it overlaps the step in flight. `take()` hands the
batches back in the order they were submitted; the wait for one (zero when the read-ahead keeps up) is the
step's `read` phase.

Off CUDA there is no device to overlap with: the step's own CPU kernels use every core, and a reader thread's
torch work starts a second OpenMP thread team whose spinning workers slow every phase of the step (measured on
the 2-core CPU quickstart: training 37 s -> 53 s). There the reads run in the training thread, in `take()`, in
the order submitted (THREADS_OFF_CUDA turns the threads on anyway, for tests of the threaded path).

A failed read raises in `take()` for that batch, with the reader's traceback chained.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

THREADS_OFF_CUDA = False   # read in background threads also when the device is not CUDA (see above)


class _Done:
    """A read run in the caller's thread when its batch is taken (the Future interface `take` uses)."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)

    def cancel(self):
        return True


class Prefetcher:
    def __init__(self, read: Callable[..., dict], device: torch.device | str, *, workers: int):
        if workers < 1:
            raise ValueError(f"prefetch: workers must be >= 1, got {workers}")
        self.read, self.device = read, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.threaded = self.cuda or THREADS_OFF_CUDA
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="torchspec-read") \
            if self.threaded else None
        self.pending: deque[Future | _Done] = deque()
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None   # the copies' side stream

    def __len__(self) -> int:
        return len(self.pending)

    def submit(self, *args) -> None:
        """Start reading read(*args) in the background (off CUDA: when taken); taken back in submission order."""
        self.pending.append(self.pool.submit(self._load, *args) if self.threaded else _Done(self._load, args))

    def _load(self, *args):
        batch = self.read(*args)
        if not self.cuda:
            return batch, None
        with torch.cuda.stream(self.stream):
            batch = {k: (v.pin_memory().to(self.device, non_blocking=True)
                         if torch.is_tensor(v) and v.device.type == "cpu" else v) for k, v in batch.items()}
            done = torch.cuda.Event()
            done.record(self.stream)
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
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
