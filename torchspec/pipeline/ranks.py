"""Trainer ranks, whichever launcher runs them.

Rank 0 runs in the driver process (it owns the controller, logging and checkpoints); ranks 1.. run
elsewhere: spawned processes (`launcher_local`) or Ray actors (`launcher_ray`). All step in lockstep
on per-rank micro-batches of store keys. Rank 0 talks to the others through a `Peers` transport,
one message per rank at a time, each answered once:

  ("read", keys, ref_key)   start reading a micro-batch from the store in the background (answered at once;
                            training.prefetch_depth of them may be queued ahead of the step)
  ("train",)                Trainer.train_step on the oldest one read (a collective); once every rank has
                            answered, the controller may delete its records
  ("finish",)               Trainer.finish_accumulation (a collective)
  ("state",)                Trainer.state_dict (a collective under FSDP)

`RankWorker` is a rank's side of that protocol, `TrainerRanks` rank 0's; the launchers only carry
the messages.
"""

from __future__ import annotations

import datetime
from collections import deque
from typing import Protocol

import torch

from torchspec.inference.base import StoredSample


def rank_batch(store, keys: list[str], ref_key: str, pack: bool):
    """The rank's micro-batch (packed or padded: torchspec.transfer.batch); a rank left without samples (an
    epoch's short tail) trains on a copy of another rank's sample with its loss mask zeroed: it joins the
    collectives with zero gradient."""
    from torchspec.transfer.batch import collate

    if keys:
        return collate([store.get(k) for k in keys], pack=pack)
    batch = collate([store.get(ref_key)], pack=pack)
    batch["loss_mask"].zero_()
    return batch


def reader(cfg, store, device: str):
    """The rank's background reads of its micro-batches (torchspec.training.prefetch)."""
    import functools

    from torchspec.training.prefetch import Prefetcher

    read = functools.partial(rank_batch, store, pack=bool(cfg.training.pack_samples))
    return Prefetcher(read, device, workers=int(cfg.training.max_concurrent_batches))


def use_device(device: str, num_threads: int = 1) -> None:
    """Make `device` this process's current device (CPU: `num_threads` intra-op threads)."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    else:
        torch.set_num_threads(num_threads)


JOIN_POLL_S = 0.05     # how often rank 0 checks, while it waits for the others to join, that they live
DEATH_GRACE_S = 10.0   # after a failed collective: how long rank 0 waits for a launcher to report a dead rank


def _peer_failure(e: RuntimeError) -> bool:
    """Whether a collective's error can mean that another rank died (then the launcher's report of it is
    awaited). Rank 0's own failures (out of memory, a bug) are raised at once."""
    import torch
    import torch.distributed as tdist

    if isinstance(e, torch.OutOfMemoryError):
        return False
    text = str(e)
    return isinstance(e, tdist.DistError) or any(s in text for s in ("gloo", "Connection", "NCCL", "peer"))


def _joined_key(rank: int) -> str:
    return f"torchspec/joining/{rank}"


def rendezvous_store(init_method: str, rank: int, world: int, timeout: datetime.timedelta):
    """The ranks' key-value store: `file://<path>` (one machine) or `tcp://<rank 0's host>:<port>` (rank 0
    hosts it). Rank 0's TCP store does not wait for the others: `init_dist` waits, watching them."""
    import urllib.parse

    import torch.distributed as tdist

    url = urllib.parse.urlparse(init_method)
    if url.scheme == "file":
        return tdist.FileStore(url.path, world)
    if url.scheme == "tcp":
        return tdist.TCPStore(url.hostname, url.port, world, is_master=rank == 0, timeout=timeout,
                              wait_for_workers=False)
    raise ValueError(f"init_method {init_method!r}: expected file:// or tcp://")


def init_dist(rank: int, world: int, device: str, init_method: str, timeout_minutes: int, watch=None) -> None:
    """Join the trainer's process group: nccl on GPUs, gloo on CPU. `init_method` is `file://...`
    (one machine) or `tcp://<rank 0's host>:<port>` (any machines: rank 0 hosts the store).
    Ranks 1.. announce themselves in the store right before they join; rank 0 joins only once all have,
    calling `watch()` meanwhile (it raises when one of them died), so a rank that dies before the
    rendezvous stops the run at once rather than after `timeout_minutes`."""
    import time

    import torch.distributed as tdist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    store = rendezvous_store(init_method, rank, world, timeout)
    if rank:
        store.set(_joined_key(rank), "1")
    else:
        keys = [_joined_key(r) for r in range(1, world)]
        deadline = time.monotonic() + timeout.total_seconds()
        while not store.check(keys):
            if watch is not None:
                watch()
            if time.monotonic() > deadline:
                raise RuntimeError(f"trainer ranks did not join the process group within {timeout_minutes} "
                                   "minute(s) (training.distributed_timeout_minutes)")
            time.sleep(JOIN_POLL_S)
    tdist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)


def leave_dist() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


class RankWorker:
    """One trainer rank other than 0: joins the process group, builds its Trainer, then `handle`s
    rank 0's messages. The caller owns the transport (a queue loop, a Ray actor)."""

    def __init__(self, rank: int, world: int, cfg, spec, store, device: str, init_method: str,
                 local_rank: int | None = None):
        from torchspec.pipeline.build import build_trainer
        from torchspec.training.parallel import DistInfo

        use_device(device)
        init_dist(rank, world, device, init_method, cfg.training.distributed_timeout_minutes)
        self.rank = rank
        self.reads = reader(cfg, store, device)
        dist = DistInfo(rank, world, rank if local_rank is None else local_rank)
        self.trainer, _ = build_trainer(cfg, spec, device, dist)

    def handle(self, op: str, *args) -> None:
        if op == "read":
            self.reads.submit(*args)
        elif op == "train":
            self.trainer.train_step(self.reads.take())
        elif op == "finish":
            self.trainer.finish_accumulation()
        elif op == "state":
            self.trainer.state_dict()
        else:
            raise ValueError(f"trainer rank {self.rank}: unknown message {op!r}")

    def close(self) -> None:
        self.reads.close()
        leave_dist()


class Peers(Protocol):
    """How rank 0 reaches ranks 1..: `send` one message per rank (rank 1 first), returning at once;
    `acks` waits for one answer from every rank and raises if one failed or died; `watch` returns at
    once and raises `failures.WorkerFailure` (naming the rank and how it ended) if one has died."""

    def send(self, messages: list[tuple]) -> None: ...

    def acks(self) -> None: ...

    def watch(self) -> None: ...

    def close(self) -> None: ...


class TrainerRanks:
    """Rank 0's side: its Trainer in this process, the other `world - 1` ranks behind `peers`
    (already started and joining the process group through `init_method`)."""

    def __init__(self, cfg, spec, store, device: str, world: int, peers: Peers | None = None,
                 init_method: str | None = None):
        from torchspec.pipeline.build import build_trainer
        from torchspec.training.parallel import DistInfo

        self.world = world
        self.device = device
        self.peers = peers
        self.others = world - 1
        self.reads = reader(cfg, store, device)
        self.queued: deque[list] = deque()   # micro-batch sets whose reads were started, oldest first
        try:
            dist = None
            self._threads = torch.get_num_threads()   # restored by close()
            if world > 1:
                # as every other rank (CPU: one intra-op thread each), so ranks compute the same bits
                use_device(device)
                init_dist(0, world, device, init_method, cfg.training.distributed_timeout_minutes,
                          watch=peers.watch)
                dist = DistInfo(0, world, 0)
            self.trainer, self.checkpoint = self._collective(build_trainer, cfg, spec, device, dist)
            self._acks()   # every rank has built its Trainer
        except BaseException:
            self.close()
            raise

    def _collective(self, fn, *args):
        """fn(*args) on rank 0 while the other ranks do their part: when it fails (gloo reports a peer that
        closed its connections), the launcher's report of a dead rank, if one comes, is the error."""
        try:
            return fn(*args)
        except RuntimeError as e:   # user errors (ConfigError: a ValueError) pass at once
            if self.others and self.peers is not None and _peer_failure(e):
                import time

                deadline = time.monotonic() + DEATH_GRACE_S
                while time.monotonic() < deadline:
                    self.peers.watch()
                    time.sleep(JOIN_POLL_S)
            raise

    def _send(self, *msg) -> None:
        if self.others:
            self.peers.send([msg] * self.others)

    def _acks(self) -> None:
        if self.others:
            self.peers.acks()

    def prefetch(self, batches: list[list[StoredSample]]) -> None:
        """Start every rank's read of its micro-batch of `batches` (a set the controller handed out)."""
        ref = batches[0][0].key
        if self.others:
            self.peers.send([("read", [s.key for s in b], ref) for b in batches[1:]])
            self.peers.acks()
        self.reads.submit([s.key for s in batches[0]], ref)
        self.queued.append(batches)

    def train_step(self, batches: list[list[StoredSample]]) -> dict:
        """Train on `batches` (prefetched, or read now); sets are trained in the order they were prefetched."""
        if not self.queued:
            self.prefetch(batches)
        if self.queued[0] is not batches:
            raise RuntimeError("train_step: micro-batch sets must be trained in the order they were prefetched")
        self.queued.popleft()
        with self.trainer.clock.phase("read"):   # the wait for the read-ahead (all of the read when it lags)
            batch = self.reads.take()
        self._send("train")
        m = self._collective(self.trainer.train_step, batch)
        self._acks()
        return m

    def finish_accumulation(self) -> dict | None:
        if not self.trainer.micro_step:
            return None
        self._send("finish")
        m = self._collective(self.trainer.finish_accumulation)
        self._acks()
        return m

    def state_dict(self) -> dict:
        self._send("state")
        state = self._collective(self.trainer.state_dict)
        self._acks()
        return state

    def close(self) -> None:
        self.reads.close()
        self.queued.clear()
        if self.peers is not None:
            self.peers.close()
            self.peers = None
        if self.world > 1:
            leave_dist()
            torch.set_num_threads(self._threads)
