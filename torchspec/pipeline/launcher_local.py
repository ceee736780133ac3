"""The local launcher: places inference engines and trainer ranks on this machine.

Placement (`plan_local`), from the config:
- colocated (`inference.colocate: true`): the target runs inside the trainer process, on the
  trainer's device: the single-process mode of the CPU quickstart, or one GPU shared by target and
  draft. Engine calls then run between training steps.
- otherwise one engine process per `inference.inference_num_gpus_per_engine` GPUs
  (`inference_num_gpus / per_engine` engines) on GPUs 0.., then one trainer rank per GPU of
  `training.training_num_gpus_per_node` on the following GPUs. On a machine without GPUs the same
  layout runs as CPU processes (gloo for the trainer's collectives).

Engine processes are spawned with torch.multiprocessing; they get prompts over a queue, put their
hidden states in the Store themselves and send back only keys and lengths.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue as queue_mod
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

from torchspec.config.errors import ConfigError
from torchspec.data.errors import DataError
from torchspec.inference.base import StoredSample
from torchspec.inference.engine_metrics import MetricsPoll, engine_metrics
from torchspec.pipeline.failures import WorkerFailure, exit_text
from torchspec.pipeline.wire import from_wire, to_wire
from torchspec.pipeline.ranks import RankWorker, TrainerRanks, leave_dist  # noqa: F401  (TrainerRanks re-exported)
from torchspec.utils.procs import inbox_jobs, stop_workers


@dataclass(frozen=True)
class Placement:
    colocate: bool
    engine_devices: tuple[str, ...]    # one per engine process (empty when colocated)
    trainer_devices: tuple[str, ...]   # one per trainer rank

    def describe(self) -> str:
        if self.colocate:
            return f"colocated: target and draft trainer in one process on {self.trainer_devices[0]}"
        return (f"{len(self.engine_devices)} engine process(es) on {', '.join(self.engine_devices)}; "
                f"{len(self.trainer_devices)} trainer rank(s) on {', '.join(self.trainer_devices)}")


class PlacementError(ConfigError):
    pass


def check_gpus_per_engine(cfg, per_engine: int) -> None:
    """The hf engine runs on one GPU; tensor parallelism needs an engine that has it."""
    if cfg.inference.inference_engine_type == "hf" and per_engine != 1:
        raise PlacementError(f"inference.inference_num_gpus_per_engine={per_engine}: the hf engine runs on one GPU "
                             "per engine; use more engines (inference.inference_num_gpus), or the vllm or sgl engine "
                             "for tensor parallelism")


def plan_local(cfg, num_gpus: int | None = None) -> Placement:
    inf, tr = cfg.inference, cfg.training
    num_gpus = torch.cuda.device_count() if num_gpus is None else num_gpus
    if tr.training_num_nodes > 1:
        raise PlacementError(f"training.training_num_nodes={tr.training_num_nodes}: the local launcher runs on one "
                             "machine; multi-node training needs the Ray launcher")
    world = tr.training_num_gpus_per_node
    trainer_devices = tuple(f"cuda:{i}" for i in range(world)) if num_gpus else ("cpu",) * world
    if inf.colocate:
        if world != 1:
            raise PlacementError(f"inference.colocate=true runs the target inside the one trainer process; "
                                 f"training.training_num_gpus_per_node={world} must be 1")
        return Placement(True, (), trainer_devices[:1])
    per = inf.inference_num_gpus_per_engine
    check_gpus_per_engine(cfg, per)
    n_engines = inf.inference_num_gpus // per
    if not num_gpus:
        return Placement(False, ("cpu",) * n_engines, trainer_devices)
    need = inf.inference_num_gpus + world
    if need > num_gpus:
        raise PlacementError(
            f"inference.inference_num_gpus={inf.inference_num_gpus} + training.training_num_gpus_per_node={world} "
            f"= {need} GPUs, but this machine has {num_gpus}; lower them, or set inference.colocate=true to share "
            "one GPU between target and trainer")
    engine_devices = tuple(f"cuda:{i * per}" for i in range(n_engines))
    trainer_devices = tuple(f"cuda:{inf.inference_num_gpus + i}" for i in range(world))
    return Placement(False, engine_devices, trainer_devices)


# -- engine groups (the controller's EngineGroup protocol) ------------------------------------------

# Colocated on CUDA, the engine's forwards run on a side stream of their own (see InlineEngines).
ENGINE_STREAM = True


class InlineEngines:
    """One engine in this process; `wait` runs the oldest submission (deterministic order).

    Given a CUDA `device` (colocated on a GPU), the engine's forwards run on a side stream and every submission
    is started by the next `wait`, also one that may not block (timeout 0): on the GPU a forward is only
    queued work, so the pool fills ahead of the trainer and the target's forward of later micro-batches
    runs on the GPU while this thread launches the draft's step, whose host syncs wait for the trainer's
    stream alone. The memory store orders the trainer's reads after the engine's writes (transfer/memory.py).
    Elsewhere (CPU, or ENGINE_STREAM off) a forward runs only when the controller has to wait for it.
    """

    num_workers = 1
    tokenizes = False   # True: takes deferred records (dataset.defer_tokenization) and tokenizes them itself

    def __init__(self, engine, device: str | torch.device | None = None):
        self.engine = engine
        self.pending: deque[list] = deque()
        self.busy_s = 0.0   # seconds spent generating, over all workers
        self.phase = contextlib.nullcontext   # the runner times each forward as a step phase (colocated)
        device = torch.device(device) if device is not None else None
        self.stream = torch.cuda.Stream(device) if ENGINE_STREAM and device is not None and device.type == "cuda" \
            else None
        self.runs_ahead = self.stream is not None   # a forward starts when submitted, not when waited for

    def metrics(self) -> dict[int, dict[str, float]]:
        """{engine: its metrics now} (engine_metrics.py)."""
        return {0: engine_metrics(self.engine)}

    def submit(self, worker: int, samples: list) -> None:
        self.pending.append(samples)

    def wait(self, timeout: float) -> list[tuple[int, list[StoredSample]]]:
        if not self.pending or (timeout <= 0 and not self.runs_ahead):   # nothing finishes unless we run it
            return []
        done = []
        for _ in range(len(self.pending) if self.runs_ahead else 1):   # ahead: every submission, at once
            t0 = time.monotonic()
            on_stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
            with self.phase(), on_stream:   # the phase ends on the trainer's stream: its time is the launch's
                done.append((0, self.engine.generate(self.pending.popleft())))
            self.busy_s += time.monotonic() - t0
        return done

    def close(self) -> None:
        self.pending.clear()
        self.engine.close()


CLOSE_GRACE_S = 30.0   # how long closing engine processes wait for them to end before terminating them
ALIVE_CHECK_S = 0.1   # how often the driver, while it waits for results, checks that the engines live


def _engine_worker(worker: int, engine_factory, store, device: str, inbox, outbox, num_threads: int) -> None:
    engine = None
    # Ctrl-C (SIGINT to the process group) closes the engine, also when the driver was started with SIGINT ignored
    # (a background job of a non-interactive shell), which a spawned process would otherwise inherit.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        else:
            torch.set_num_threads(num_threads)
        engine = engine_factory(store, device)
        poll = MetricsPoll(engine)
        outbox.put(("ready", worker, None))
        for items in inbox_jobs(inbox):
            t0 = time.monotonic()
            stored = engine.generate(from_wire(items))
            outbox.put(("done", worker, (stored, time.monotonic() - t0, poll.due())))
    except KeyboardInterrupt:
        pass
    except ConfigError as e:   # user-caused (e.g. model.target_model_path): one line, no traceback
        outbox.put(("config_error", worker, str(e)))
    except DataError as e:   # a deferred record the chat template refuses (dataset.on_bad_record: error)
        outbox.put(("data_error", worker, str(e)))
    except BaseException:
        outbox.put(("error", worker, traceback.format_exc()))
    finally:   # Ctrl-C or a failed generate too: the engine's own processes and files go with it
        if engine is not None:
            engine.close()


class ProcessEngines:
    """One spawned process per engine; results come back on one shared queue."""

    tokenizes = False   # as InlineEngines.tokenizes

    def __init__(self, engine_factory, store, devices, num_threads: int = 1, start_timeout: float = 600.0,
                 timeout_key: str = "",
                 daemon: bool = True):
        """daemon=False for engines that start child processes of their own (a daemonic process may not)."""
        ctx = mp.get_context("spawn")
        self.num_workers = len(devices)
        self.busy_s = 0.0   # seconds spent generating, over all workers
        self.latest_metrics: dict[int, dict[str, float]] = {}   # each engine's last metrics (engine_metrics.py)
        self._closed = False
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in devices]
        self.procs = [
            ctx.Process(target=_engine_worker, args=(w, engine_factory, store, d, self.inboxes[w], self.outbox,
                                                      num_threads), daemon=daemon, name=f"torchspec-engine-{w}")
            for w, d in enumerate(devices)
        ]
        try:   # on any failure (Ctrl-C too) stop what started: a non-daemonic one would block the driver's exit
            for p in self.procs:
                p.start()
            # Poll, so a worker that dies while loading its model is reported at once, not at the timeout.
            deadline, ready = time.monotonic() + start_timeout, 0
            while ready < self.num_workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"inference engines were not ready within {start_timeout:.0f} s"
                                       + (f" ({timeout_key})" if timeout_key else ""))
                ready += sum(1 for _ in self._drain(1.0, expect="ready"))
        except BaseException:
            self.close()
            raise

    def _drain(self, timeout: float, expect: str):
        """Yield payloads of `expect` messages: wait up to timeout for one, then take what is queued.
        While waiting, the engines' processes are checked every ALIVE_CHECK_S, so a dead one is reported
        within that time even while another engine keeps delivering."""
        deadline = time.monotonic() + timeout
        block = timeout > 0
        while True:
            try:
                step = max(min(ALIVE_CHECK_S, deadline - time.monotonic()), 0.001)
                kind, worker, payload = self.outbox.get(block=block, timeout=step if block else None)
            except queue_mod.Empty:
                if not block:
                    return
                self._check_alive()
                if time.monotonic() >= deadline:
                    return
                continue
            if kind in ("error", "config_error", "data_error"):
                self.close()
                if kind == "config_error":
                    raise ConfigError(payload)
                if kind == "data_error":
                    raise DataError(payload)
                raise RuntimeError(f"inference engine {worker} failed:\n{payload}")
            if kind != expect:
                raise RuntimeError(f"inference engine {worker}: unexpected message {kind!r}")
            yield worker, payload
            block = False

    def metrics(self) -> dict[int, dict[str, float]]:
        """{engine: its metrics as last sent with a result (read at most every METRICS_INTERVAL_S)}."""
        return dict(self.latest_metrics)

    def _check_alive(self) -> None:
        dead = [(w, p) for w, p in enumerate(self.procs) if not p.is_alive()]
        if dead:
            what = "; ".join(f"inference engine {w} (process {p.pid}) {exit_text(p.exitcode)}" for w, p in dead)
            self.close()
            raise WorkerFailure(what)

    def submit(self, worker: int, samples: list) -> None:
        self._check_alive()   # never queue work for a dead engine: its queue would never be read
        self.inboxes[worker].put(to_wire(samples))

    def wait(self, timeout: float) -> list[tuple[int, list[StoredSample]]]:
        self._check_alive()   # every call, so a death is seen even while results keep coming from the others
        out = []
        for worker, (stored, seconds, metrics) in self._drain(timeout, expect="done"):
            self.busy_s += seconds
            if metrics is not None:
                self.latest_metrics[worker] = metrics
            out.append((worker, stored))
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stop_workers(self.procs, self.inboxes, CLOSE_GRACE_S, drop_jobs=True)   # results are no longer read


def start_engines(cfg, store, placement: Placement, engine_factory=None, trainer_device: str | None = None,
                  record_tokenizer=None):
    """The EngineGroup for `placement`. engine_factory(store, device) -> Engine; default: the config's.
    record_tokenizer (data.deferred.RecordTokenizer, dataset.defer_tokenization): the engines are given records
    and tokenize them in their own process (in this one when colocated)."""
    from torchspec.inference.deferred import tokenizing_factory
    from torchspec.inference.factory import build_engine, engine_start_timeout, engine_starts_processes

    factory = tokenizing_factory(engine_factory or functools.partial(build_engine, cfg), record_tokenizer)
    if placement.colocate:
        device = trainer_device or placement.trainer_devices[0]
        group = InlineEngines(factory(store, device), device)
    else:
        timeout, key = engine_start_timeout(cfg)
        group = ProcessEngines(factory, store, placement.engine_devices, start_timeout=timeout, timeout_key=key,
                               daemon=engine_factory is not None or not engine_starts_processes(cfg))
    group.tokenizes = record_tokenizer is not None
    return group


# -- trainer ranks: ranks 1.. as spawned processes -----------------------------------------------

def _trainer_rank_worker(rank: int, world: int, cfg, spec, store, device: str, init_method: str, inbox, outbox):
    import signal

    # Ctrl-C reaches the whole process group; rank 0 decides when to stop and tells the others.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = None
    try:
        worker = RankWorker(rank, world, cfg, spec, store, device, init_method)
        outbox.put(("ok", rank, None))
        while True:
            msg = inbox.get()
            if msg[0] == "stop":
                break
            worker.handle(*msg)
            outbox.put(("ok", rank, None))
    except KeyboardInterrupt:
        pass
    except BaseException:
        outbox.put(("error", rank, traceback.format_exc()))
    finally:
        leave_dist()


class ProcessPeers:
    """Trainer ranks 1.. as spawned processes of this machine (the `Peers` of `ranks.TrainerRanks`)."""

    def __init__(self, cfg, spec, store, devices, init_method: str):
        ctx = mp.get_context("spawn")
        world = len(devices) + 1
        self.outbox = ctx.Queue()
        self.held = deque()   # answers `watch` took off the outbox before `acks` asked for them
        self.procs, self.inboxes = [], []
        for rank, device in enumerate(devices, start=1):
            inbox = ctx.Queue()
            p = ctx.Process(target=_trainer_rank_worker, daemon=True, name=f"torchspec-trainer-{rank}",
                            args=(rank, world, cfg, spec, store, device, init_method, inbox, self.outbox))
            p.start()
            self.procs.append(p)
            self.inboxes.append(inbox)

    def send(self, messages: list[tuple]) -> None:
        for q, msg in zip(self.inboxes, messages):
            q.put(msg)

    def _take(self) -> tuple | None:
        """The next answer (waiting up to a second), or None."""
        if self.held:
            return self.held.popleft()
        try:
            return self.outbox.get(timeout=1.0)
        except queue_mod.Empty:
            return None

    def watch(self) -> None:
        """Raise at once if a rank reported an error or its process has ended."""
        while True:
            try:
                self.held.append(self.outbox.get_nowait())
            except queue_mod.Empty:
                break
        for kind, rank, payload in self.held:
            if kind == "error":
                raise WorkerFailure(f"trainer rank {rank} failed:\n{payload}")
        for rank, p in enumerate(self.procs, start=1):
            if not p.is_alive():
                raise WorkerFailure(f"trainer rank {rank} (process {p.pid}) {exit_text(p.exitcode)}")

    def acks(self) -> None:
        for _ in self.procs:
            while (msg := self._take()) is None:
                self.watch()
            kind, rank, payload = msg
            if kind == "error":
                raise WorkerFailure(f"trainer rank {rank} failed:\n{payload}")

    def close(self) -> None:
        for q, p in zip(self.inboxes, self.procs):
            if p.is_alive():
                q.put(("stop",))
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        self.procs, self.inboxes = [], []


def start_trainer_ranks(cfg, spec, store, devices, workdir) -> TrainerRanks:
    """Rank 0 in this process on devices[0], ranks 1.. spawned here; rendezvous through a file in workdir."""
    init_method = peers = None
    if len(devices) > 1:
        init_method = f"file://{Path(workdir) / f'dist-init-{os.getpid()}-{time.time_ns()}'}"
        peers = ProcessPeers(cfg, spec, store, devices[1:], init_method)
    return TrainerRanks(cfg, spec, store, devices[0], len(devices), peers, init_method)
