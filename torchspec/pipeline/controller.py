"""The controller: feeds prompts to inference engines, holds the sample pool, hands micro-batches to
trainer ranks, and deletes what the trainer has consumed.

It is plain Python with no knowledge of how engines run: it talks to them through an `EngineGroup`
(local processes, an in-process engine, or Ray actors later) and to the hidden states only through
a `Store`. Flow, per epoch:

  prompt buffer (epoch order: deterministic shuffle of sample ids from (seed, epoch))
    -> prompts are taken from it `inference_fetch_batch` at a time into a staging queue; from a deferred
       dataset (dataset.defer_tokenization) as record bytes when the engines tokenize (`engines.tokenizes`),
       else tokenized here together
    -> an engine is given `inference_batch_size` prompts whenever its queue holds fewer than
       `inference_buffer_threshold` samples and the pool has room
    -> finished samples enter the pool (FIFO); samples being generated count against the pool's
       bound, so the pool never exceeds `max_sample_pool_size` (engines pause: backpressure)
    -> with a byte budget (`store_capacity`, `record_bytes`), a prompt is also given to an engine only when
       the records of the pool, of the engines' batches and of the sets taken (read ahead or training) stay
       within it with the new record's bytes added: the store never holds more than the budget, whatever
       the lengths. A record not yet tokenized is counted at training.max_seq_length tokens (its most) until
       its engine reports its length
    -> `next_micro_batches()` takes `micro_batch_size` samples per trainer rank (a "set"); sets may be
       taken ahead of training (the trainer's read-ahead, training.prefetch_depth)
    -> `mark_trained()` deletes a set's keys from the store and records their ids (sets in the order
       they were taken). A deferred sample its engine found without a supervised token has no record: it
       counts as trained at once (the up-front dataset drops such samples before the run).

An epoch ends once all its samples are trained; the last micro-batches of an epoch may be short.
`data_state()` (training/data_state.py: the epoch and ranges of trained positions in its order) resumes
with no sample skipped or repeated. The driver's state is bounded: the trained positions are a prefix and
the few trained ahead of it; pool statistics keep a window (`POOL_HISTORY`) and the peaks.
"""

from __future__ import annotations

import functools
import random
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from torchspec.config.errors import ConfigError
from torchspec.data.deferred import RawRecord
from torchspec.data.sample import sample_ids_of
from torchspec.inference.base import StoredSample
from torchspec.training import data_state as ds
from torchspec.transfer.base import StoreUnavailable


class EngineGroup(Protocol):
    """Inference workers as the controller sees them (local processes, inline, Ray actors...)."""

    num_workers: int

    def submit(self, worker: int, samples: list) -> None:
        """Queue `samples` on `worker`; returns at once."""
        ...

    def wait(self, timeout: float) -> list[tuple[int, list[StoredSample]]]:
        """Finished submissions as (worker, stored samples), waiting up to `timeout` s for the first
        (timeout 0: only what has already finished)."""
        ...

    def close(self) -> None: ...


def epoch_order(sample_ids: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The epoch's sample order: a shuffle determined by (seed, epoch) alone."""
    ids = sorted(sample_ids)
    random.Random(f"{seed}:{epoch}").shuffle(ids)
    return ids


POOL_HISTORY = 4096   # pool sizes kept (the most recent), so a long run's driver does not grow


@dataclass
class PoolStats:
    times: deque = field(default_factory=lambda: deque(maxlen=POOL_HISTORY))
    sizes: deque = field(default_factory=lambda: deque(maxlen=POOL_HISTORY))
    peak_size: int = 0      # over the whole run
    peak_bytes: int = 0     # records of pool + engines' batches + sets taken (with a byte budget)


class Controller:
    def __init__(self, samples: Sequence, engines: EngineGroup, store, *, micro_batch_size: int,
                 num_ranks: int = 1, num_epochs: int = 1, max_sample_pool_size: int,
                 inference_batch_size: int, inference_buffer_threshold: int, inference_fetch_batch: int = 1,
                 seed: int = 0, data_state: dict | None = None, store_capacity: int | None = None,
                 record_bytes: Callable[[int], int] | None = None):
        if max_sample_pool_size < micro_batch_size * num_ranks:
            raise ConfigError(
                f"inference.max_sample_pool_size={max_sample_pool_size} must hold at least one micro-batch per "
                f"trainer rank (training.micro_batch_size={micro_batch_size} x {num_ranks} ranks)")
        # Samples are read by position when they are handed to an engine, so a lazily tokenized
        # dataset (dataset.defer_tokenization) is read then, not here; its `sample_ids` name them. Engines that
        # tokenize get its records' bytes (`raw`), others its samples tokenized here (`take`).
        self.samples = samples
        self.raw = getattr(samples, "raw", None) if getattr(engines, "tokenizes", False) else None
        self.raw_tokens = samples.record_tokenizer.max_length if self.raw is not None else 0
        ids = sample_ids_of(samples)
        self.index = {sid: i for i, sid in enumerate(ids)}
        if len(self.index) != len(ids):
            raise ValueError("duplicate sample ids in the dataset")
        if not self.index:
            raise ValueError("the dataset has no samples")
        self.engines = engines
        self.store = store
        self.micro_batch_size = micro_batch_size
        self.num_ranks = num_ranks
        self.num_epochs = num_epochs
        self.max_pool = max_sample_pool_size
        self.batch_size = inference_batch_size
        self.threshold = inference_buffer_threshold
        self.fetch_batch = max(1, int(inference_fetch_batch))
        self.seed = seed
        # the byte budget: record_bytes(n) = the store's bytes for a record of n tokens
        self.capacity = store_capacity if record_bytes is not None else None
        self._bytes = functools.lru_cache(maxsize=8192)(record_bytes) if record_bytes is not None else None
        self.pool_bytes = self.in_flight_bytes = self.taken_bytes = 0
        self.reserved: dict[str, int] = {}   # sample id -> bytes counted for it while its engine has it
        self.skipped_empty = 0   # deferred samples without a supervised token (no record; counted as trained)
        self.epoch_ended = False   # an epoch completed by skipped samples, reported by the next mark_trained

        self.pool: deque[StoredSample] = deque()
        self.in_flight = [0] * engines.num_workers     # samples queued on each worker
        self.in_flight_ids: set[str] = set()
        self.dispatched: dict[str, StoredSample] = {}   # handed to trainers, not yet marked trained
        self.outstanding: deque[list[list[StoredSample]]] = deque()   # those sets, oldest first
        self.pool_stats = PoolStats()
        self.data_wait_s = 0.0
        self._closed = False
        self.samples_generated = 0
        self.tokens_generated = 0

        self.digest = ds.ids_digest(self.index)
        self.pos_of = array("q", bytes(8 * len(self.index)))   # dataset index -> position in the epoch order
        state = data_state or {"epoch": 0}
        self.epoch = int(state["epoch"])
        self._start_epoch(state)

    # -- state ------------------------------------------------------------------------------------
    def _start_epoch(self, state: dict | None = None) -> None:
        order = epoch_order(list(self.index), self.seed, self.epoch) if self.epoch < self.num_epochs else []
        self.trained = ds.trained_positions(state, order, self.digest) if state and order else ds.TrainedPositions()
        for p, sid in enumerate(order):
            self.pos_of[self.index[sid]] = p
        self.prompts: deque[str] = deque(sid for p, sid in enumerate(order) if p not in self.trained)
        self.staged: deque = deque()   # samples taken from `prompts`, not yet given to an engine
        self.remaining = len(self.prompts)   # samples of this epoch not yet trained

    def data_state(self) -> dict:
        return ds.encode(self.epoch, len(self.index), self.digest, self.trained)

    def trained_ids(self) -> list[str]:
        """The ids trained in the current epoch, in its order (for tests and tools; O(epoch) to build)."""
        order = epoch_order(list(self.index), self.seed, self.epoch) if self.epoch < self.num_epochs else []
        return [sid for p, sid in enumerate(order) if p in self.trained]

    def store_bytes(self) -> int:
        """Bytes of the records this controller has asked for and not yet deleted (with a byte budget)."""
        return self.pool_bytes + self.in_flight_bytes + self.taken_bytes

    def _nbytes(self, samples) -> int:
        if self._bytes is None:
            return 0
        return sum(self._bytes(s.length if isinstance(s, StoredSample) else
                               self.raw_tokens if isinstance(s, RawRecord) else len(s)) for s in samples)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.num_epochs

    def pool_size(self) -> int:
        return len(self.pool)

    def _record_pool(self) -> None:
        st = self.pool_stats
        st.times.append(time.monotonic())
        st.sizes.append(len(self.pool))
        st.peak_size = max(st.peak_size, len(self.pool))
        st.peak_bytes = max(st.peak_bytes, self.store_bytes())

    # -- inference side ---------------------------------------------------------------------------
    def _undelivered(self) -> int:
        return len(self.prompts) + len(self.staged) + sum(self.in_flight)

    def _stage(self, n: int) -> None:
        """At least n samples staged (fewer at the epoch's end), taken `inference_fetch_batch` at a time."""
        while len(self.staged) < n and self.prompts:
            ids = [self.prompts.popleft() for _ in range(min(self.fetch_batch, len(self.prompts)))]
            many = self.raw or getattr(self.samples, "take", None)   # a deferred fetch is read together
            idx = [self.index[i] for i in ids]
            self.staged.extend(many(idx) if many is not None else (self.samples[i] for i in idx))

    def _fitting(self, n: int) -> int:
        """How many of the next n staged samples fit in the byte budget together (n without one)."""
        if self.capacity is None:
            return n
        room, k = self.capacity - self.store_bytes(), 0
        while k < n:
            room -= self._nbytes((self.staged[k],))
            if room < 0:
                break
            k += 1
        return k

    def _feed(self) -> None:
        """Give work to every engine whose queue is below the threshold, while the pool has room (in samples,
        and in bytes with a budget)."""
        for w in range(self.engines.num_workers):
            while (self.prompts or self.staged) and self.in_flight[w] < self.threshold:
                room = self.max_pool - len(self.pool) - sum(self.in_flight)
                n = min(self.batch_size, len(self.prompts) + len(self.staged), room)
                if n <= 0:
                    return
                self._stage(n)
                n = self._fitting(min(n, len(self.staged)))
                if n <= 0:
                    return
                batch = [self.staged.popleft() for _ in range(n)]
                self.engines.submit(w, batch)
                self.in_flight[w] += n
                for s in batch:
                    self.reserved[s.sample_id] = b = self._nbytes((s,))
                    self.in_flight_bytes += b
                self.in_flight_ids.update(s.sample_id for s in batch)

    def _collect(self, timeout: float) -> None:
        for w, stored in self.engines.wait(timeout):
            self.in_flight[w] -= len(stored)
            self.in_flight_ids.difference_update(s.sample_id for s in stored)
            self.in_flight_bytes -= sum(self.reserved.pop(s.sample_id) for s in stored)
            for s in stored:
                if s.skipped:
                    self.skipped_empty += 1
                    self._done(s.sample_id)
            stored = [s for s in stored if not s.skipped]
            self.pool.extend(stored)
            self.pool_bytes += self._nbytes(stored)
            self.samples_generated += len(stored)
            self.tokens_generated += sum(s.length for s in stored)
            self._record_pool()
            if self.remaining == 0:   # the epoch's last samples were skipped ones
                self._next_epoch()

    def _done(self, sample_id: str) -> None:
        """A sample of this epoch is done: trained, or skipped (no supervised token, deferred)."""
        self.trained.add(self.pos_of[self.index[sample_id]])
        self.remaining -= 1

    def _next_epoch(self) -> None:
        self.epoch += 1
        self._start_epoch()
        self.epoch_ended = True

    # -- trainer side -----------------------------------------------------------------------------
    def next_micro_batches(self, wait: bool = True) -> list[list[StoredSample]] | None:
        """One micro-batch per trainer rank (a set), or None: when done, when every sample of the epoch is
        already taken (the next epoch starts once the sets taken are trained), or, with wait=False, when
        the pool does not hold a set now. With wait=True the engines are waited for as needed.

        Returns short micro-batches at the end of an epoch (some may be empty when fewer samples
        than ranks are left). Sets may be taken ahead; `mark_trained` takes them back in that order.
        """
        if self.finished:
            return None
        want = self.micro_batch_size * self.num_ranks
        t0 = time.monotonic()
        while True:
            self._collect(timeout=0.0)   # take in whatever has finished, without waiting
            if self.finished:   # the last epoch ended with skipped samples
                return None
            self._feed()
            undelivered = self._undelivered()
            if len(self.pool) >= want or (undelivered == 0 and self.pool):
                break
            if undelivered == 0:   # every sample of this epoch is taken
                if self.outstanding:
                    return None
                raise RuntimeError("controller: epoch has no samples left but was not advanced")
            if not wait:
                return None
            if self.capacity is not None and not any(self.in_flight):   # the budget keeps the next prompt out
                raise RuntimeError(
                    f"controller: the store's byte budget ({self.capacity} bytes) is full ({self.store_bytes()} "
                    f"bytes: the pool holds {len(self.pool)} of the {want} samples of a set, {len(self.outstanding)} "
                    "set(s) taken are not trained), so no set can come: train the sets taken (mark_trained), or "
                    "give a budget that holds a set of the longest records (transfer.capacity.check_store_capacity)")
            self._collect(timeout=1.0)
            if self.finished:
                return None
        if wait:
            self.data_wait_s += time.monotonic() - t0
        take = [self.pool.popleft() for _ in range(min(want, len(self.pool)))]
        nbytes = self._nbytes(take)
        self.pool_bytes -= nbytes
        self.taken_bytes += nbytes
        self._record_pool()
        self._feed()   # refill now, so the engines work while the trainer trains
        # Deal micro-batches out rank by rank: rank r gets take[r*mbs:(r+1)*mbs]; a short tail is
        # spread evenly so no rank is empty unless fewer samples than ranks remain.
        per = [len(take) // self.num_ranks + (r < len(take) % self.num_ranks) for r in range(self.num_ranks)]
        out, i = [], 0
        for n in per:
            out.append(take[i:i + n])
            i += n
        self.dispatched.update((s.key, s) for s in take)
        self.outstanding.append(out)
        return out

    def mark_trained(self, batches: list[list[StoredSample]]) -> bool:
        """Delete the trained set's records (the oldest set taken); True when this completed an epoch."""
        if not self.outstanding or self.outstanding[0] is not batches:
            raise RuntimeError("mark_trained: not the oldest set taken by next_micro_batches()")
        self.outstanding.popleft()
        for mb in batches:
            for s in mb:
                self.store.delete(s.key)
                self.dispatched.pop(s.key)
                self._done(s.sample_id)
            self.taken_bytes -= self._nbytes(mb)
        if self.remaining == 0:
            self._next_epoch()
        ended, self.epoch_ended = self.epoch_ended, False
        return ended

    # -- shutdown ---------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the engines and delete every record this run left in the store (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.prompts.clear()
        self.staged.clear()
        self.engines.close()   # after this no engine writes to the store any more
        keys = [s.key for s in self.pool] + list(self.dispatched) + sorted(self.in_flight_ids)
        for key in keys:
            try:
                self.store.delete(key)
            except KeyError:   # an in-flight sample the engine never finished
                pass
            except StoreUnavailable:   # the store's service is gone, and its records with it
                break
        self.in_flight_ids.clear()
        self.reserved.clear()
        self.pool.clear()
        self.dispatched.clear()
        self.outstanding.clear()
        self.in_flight = [0] * self.engines.num_workers
        self.pool_bytes = self.in_flight_bytes = self.taken_bytes = 0
        self._record_pool()
