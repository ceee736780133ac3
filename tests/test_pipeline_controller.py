"""Controller + local launcher with a fake engine (no target model): scheduling only."""

import collections
import functools
import time

import pytest
import torch

from torchspec.data.sample import Sample
from torchspec.inference.base import StoredSample
from torchspec.pipeline.controller import Controller, epoch_order
from torchspec.pipeline.launcher_local import InlineEngines, ProcessEngines
from torchspec.transfer.local import LocalStore


class FakeEngine:
    """Puts a record whose hidden states encode the sample (so the trainer side can check them)."""

    def __init__(self, store, device="cpu", delay: float = 0.0):
        self.store, self.delay = store, delay

    def generate(self, samples):
        time.sleep(self.delay)
        out = []
        for s in samples:
            n = len(s)
            h = s.input_ids.float()[:, None].expand(n, 4)
            self.store.put(s.sample_id, {"input_ids": s.input_ids, "loss_mask": s.loss_mask,
                                         "aux_hidden_states": h.repeat(1, 3), "final_hidden_states": h})
            out.append(StoredSample(s.sample_id, s.sample_id, n))
        return out

    def close(self):
        pass


def fake_factory(store, device, delay=0.0):
    return FakeEngine(store, device, delay)


def _dataset(n=23):
    return [Sample(f"id{i:03d}", torch.arange(i % 5 + 2) + i, torch.ones(i % 5 + 2, dtype=torch.uint8))
            for i in range(n)]


def _drive(ctrl, store, steps=None, check=None):
    """Consume like a trainer: returns the micro-batches (lists of sample ids) per step."""
    seen = []
    while (batches := ctrl.next_micro_batches()) is not None:
        for mb in batches:
            for s in mb:
                rec = store.get(s.key)
                assert rec["input_ids"].numel() == s.length
                if check:
                    check(s, rec)
        seen.append([[s.sample_id for s in mb] for mb in batches])
        ctrl.mark_trained(batches)
        if steps is not None and len(seen) == steps:
            break
    return seen


def _flat(seen):
    return [i for step in seen for mb in step for i in mb]


def test_epoch_order_is_deterministic_and_differs_per_epoch():
    ids = [f"x{i}" for i in range(50)]
    assert epoch_order(ids, 3, 0) == epoch_order(list(reversed(ids)), 3, 0)
    assert sorted(epoch_order(ids, 3, 0)) == sorted(ids)
    assert epoch_order(ids, 3, 0) != epoch_order(ids, 3, 1)
    assert epoch_order(ids, 3, 0) != epoch_order(ids, 4, 0)


@pytest.mark.parametrize("num_ranks", [1, 3])
def test_inline_exactly_once_per_epoch_bounded_pool_empty_store(tmp_path, num_ranks):
    data = _dataset(23)
    store = LocalStore(root=tmp_path / "s")
    ctrl = Controller(data, InlineEngines(FakeEngine(store)), store, micro_batch_size=2, num_ranks=num_ranks,
                      num_epochs=3, max_sample_pool_size=7, inference_batch_size=3, inference_buffer_threshold=4,
                      seed=11)
    seen = _drive(ctrl, store, check=lambda s, rec: torch.equal(rec["final_hidden_states"][:, 0],
                                                                   rec["input_ids"].float()))
    ids = _flat(seen)
    assert len(ids) == 3 * 23
    for e in range(3):
        epoch_ids = ids[e * 23:(e + 1) * 23]
        assert sorted(epoch_ids) == sorted(s.sample_id for s in data)
    assert ids[:23] != ids[23:46]      # reshuffled each epoch
    assert all(len(step) == num_ranks for step in seen)
    assert all(len(mb) <= 2 for step in seen for mb in step)
    assert max(ctrl.pool_stats.sizes) <= 7 and max(ctrl.pool_stats.sizes) >= 2 * num_ranks
    assert ctrl.finished and ctrl.next_micro_batches() is None
    ctrl.shutdown()
    assert store.bytes_used() == 0 and store.keys() == []


def test_an_inline_engine_that_runs_ahead_fills_the_pool_and_hands_out_the_same_sets(tmp_path):
    """On a GPU the colocated engine starts each forward when it is submitted (InlineEngines.runs_ahead): the pool
    fills to its bound ahead of the trainer, and the sets handed out are those of the engine that runs only when
    waited for, in the same order."""
    kw = dict(micro_batch_size=2, num_epochs=2, max_sample_pool_size=8, inference_batch_size=2,
              inference_buffer_threshold=4, seed=5)
    peaks, seen = {}, {}
    for ahead in (False, True):
        store = LocalStore(root=tmp_path / f"s{ahead}")
        engines = InlineEngines(FakeEngine(store))
        assert engines.stream is None and not engines.runs_ahead   # no CUDA device given
        engines.runs_ahead = ahead
        ctrl = Controller(_dataset(23), engines, store, **kw)
        seen[ahead] = _drive(ctrl, store)
        peaks[ahead] = ctrl.pool_stats.peak_size
        ctrl.shutdown()
        assert store.bytes_used() == 0
    assert seen[True] == seen[False] and len(_flat(seen[True])) == 2 * 23
    assert peaks[False] == 2       # one set at a time: made when the trainer asks for it
    assert peaks[True] == 8        # made ahead, up to max_sample_pool_size


def test_two_engine_processes_backpressure(tmp_path):
    """Slow trainer, fast engines: the pool fills to its bound and never beyond it."""
    data = _dataset(30)
    store = LocalStore(root=tmp_path / "s")
    engines = ProcessEngines(functools.partial(fake_factory, delay=0.0), store, ["cpu", "cpu"])
    ctrl = Controller(data, engines, store, micro_batch_size=2, num_ranks=1, num_epochs=2,
                      max_sample_pool_size=6, inference_batch_size=2, inference_buffer_threshold=3, seed=0)
    workers = collections.Counter()
    original = engines.wait

    def counting_wait(timeout):
        got = original(timeout)
        workers.update(w for w, _ in got)
        return got

    engines.wait = counting_wait

    def slow(s, rec):
        if not ctrl.pool_stats.sizes or max(ctrl.pool_stats.sizes) < 6:
            # the trainer stalls until the engines delivered all they were given (pool + in flight = the bound
            # once a set is taken): the pool reaches its bound whatever the machine's scheduling
            deadline = time.monotonic() + 30
            while any(ctrl.in_flight):
                assert time.monotonic() < deadline, ctrl.in_flight
                ctrl._collect(timeout=1.0)
        time.sleep(0.01)
        # while the trainer is slow, samples in the store = pool + in flight + this micro-batch
        assert len(store.keys()) <= 6 + 2

    seen = _drive(ctrl, store, check=slow)
    ids = _flat(seen)
    assert sorted(ids[:30]) == sorted(ids[30:]) == sorted(s.sample_id for s in data)
    assert set(workers) == {0, 1}            # both engine processes produced samples
    assert max(ctrl.pool_stats.sizes) == 6   # backpressure reached the bound ...
    assert all(n <= 6 for n in ctrl.pool_stats.sizes)   # ... and held it
    ctrl.shutdown()
    assert store.bytes_used() == 0
    assert all(not p.is_alive() for p in engines.procs)


def test_resume_from_data_state_skips_nothing_repeats_nothing(tmp_path):
    data = _dataset(17)
    kw = dict(micro_batch_size=3, num_ranks=1, num_epochs=2, max_sample_pool_size=6, inference_batch_size=2,
              inference_buffer_threshold=2, seed=5)
    store = LocalStore(root=tmp_path / "s")
    clean = _flat(_drive(Controller(data, InlineEngines(FakeEngine(store)), store, **kw), store))

    ctrl = Controller(data, InlineEngines(FakeEngine(store)), store, **kw)
    first = _flat(_drive(ctrl, store, steps=8))    # 24 samples: past the first epoch (17)
    state = ctrl.data_state()
    assert len(first) > 17    # the first epoch (its last micro-batch short) and some of the second
    assert state["epoch"] == 1 and sorted(ctrl.trained_ids()) == sorted(first[17:])
    ctrl.shutdown()
    assert store.bytes_used() == 0

    ctrl2 = Controller(data, InlineEngines(FakeEngine(store)), store, data_state=state, **kw)
    rest = _flat(_drive(ctrl2, store))
    assert not set(rest) & set(first[17:])
    assert sorted(first + rest) == sorted(clean)
    assert sorted(first[17:] + rest) == sorted(s.sample_id for s in data)
    ctrl2.shutdown()
    # a checkpoint of the format before (every trained id listed) resumes the same way
    old = {"epoch": 1, "trained_ids": first[17:]}
    ctrl3 = Controller(data, InlineEngines(FakeEngine(store)), store, data_state=old, **kw)
    assert _flat(_drive(ctrl3, store)) == rest and ctrl3.data_state()["epoch"] == 2
    ctrl3.shutdown()


def test_engine_failure_and_bad_pool_size(tmp_path):
    store = LocalStore(root=tmp_path / "s")
    with pytest.raises(ValueError, match="inference.max_sample_pool_size=3 must hold"):
        Controller(_dataset(5), InlineEngines(FakeEngine(store)), store, micro_batch_size=2, num_ranks=2,
                   max_sample_pool_size=3, inference_batch_size=1, inference_buffer_threshold=1)
    bad = [Sample("bad", torch.arange(3), torch.ones(2, dtype=torch.uint8))]   # put works, fine
    engines = ProcessEngines(functools.partial(fake_factory, delay="oops"), store, ["cpu"])
    ctrl = Controller(bad, engines, store, micro_batch_size=1, max_sample_pool_size=2, inference_batch_size=1,
                      inference_buffer_threshold=1)
    with pytest.raises(RuntimeError, match="inference engine 0 failed"):
        ctrl.next_micro_batches()


class CountingLazy:
    """A lazily materialised dataset (like defer_tokenization): ids known up front, samples on access."""

    def __init__(self, data):
        self.data, self.accessed = data, []

    @property
    def sample_ids(self):
        return [s.sample_id for s in self.data]

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.accessed.append(i)
        return self.data[i]

    def __iter__(self):
        raise AssertionError("the controller must not iterate (tokenize) the whole dataset")


def test_lazy_dataset_is_read_only_when_handed_to_engines(tmp_path):
    lazy = CountingLazy(_dataset(9))
    store = LocalStore(root=tmp_path / "s")
    ctrl = Controller(lazy, InlineEngines(FakeEngine(store)), store, micro_batch_size=2, num_epochs=1,
                      max_sample_pool_size=4, inference_batch_size=2, inference_buffer_threshold=2)
    assert lazy.accessed == []
    first = ctrl.next_micro_batches()
    assert 2 <= len(lazy.accessed) <= 4          # only what the engines were given so far
    ctrl.mark_trained(first)
    rest = _flat(_drive(ctrl, store))
    assert sorted(rest + [s.sample_id for s in first[0]]) == sorted(s.sample_id for s in lazy.data)
    assert sorted(lazy.accessed) == list(range(9))
    ctrl.shutdown()


def dying_factory(store, device):
    import os
    os._exit(3)   # the process dies while "loading its model", without a word


def test_engine_process_dying_at_start_is_reported_at_once(tmp_path):
    store = LocalStore(root=tmp_path / "s")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"^inference engine [01] \(process \d+\) exited with code 3"
                                           r"(; inference engine 1 \(process \d+\) exited with code 3)?$"):
        ProcessEngines(dying_factory, store, ["cpu", "cpu"], start_timeout=300)
    assert time.monotonic() - t0 < 60


DRIVER = """
import sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from pathlib import Path
from test_pipeline_controller import fake_factory
from torchspec.pipeline.launcher_local import ProcessEngines
from torchspec.transfer.local import LocalStore

if __name__ == "__main__":
    engines = ProcessEngines(fake_factory, LocalStore(root=Path({store!r})), ["cpu"], daemon=False)
    print(engines.procs[0].pid, flush=True)
    time.sleep(600)   # killed by the test, with no chance to stop its engine
"""


def test_non_daemonic_engine_stops_when_the_driver_is_gone(tmp_path):
    """Engines that start processes of their own (sgl, vllm tp > 1) run non-daemonic: if the driver dies
    without stopping them, they notice within PARENT_CHECK_S and exit instead of waiting forever."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from torchspec.utils.procs import PARENT_CHECK_S

    tests = Path(__file__).resolve().parent
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(tests), root=str(tests.parent), store=str(tmp_path / "s")))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    engine_pid = int(driver.stdout.readline())
    assert not _gone(engine_pid)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + PARENT_CHECK_S + 20
    while not _gone(engine_pid):
        assert time.monotonic() < deadline, f"engine process {engine_pid} outlived its driver"
        time.sleep(0.2)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: its parent is gone, so nobody reaps it at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_rank0_own_error_is_raised_at_once_a_peer_error_waits_for_the_launcher(monkeypatch):
    """After a failed collective rank 0 waits (up to DEATH_GRACE_S) for the launcher to name a dead rank, but
    only when the error can mean one; its own errors (a bug, out of memory) are raised at once."""
    import torch.distributed  # noqa: F401  (the error classes)

    from torchspec.pipeline import ranks

    class Peers:
        watched = 0

        def watch(self):
            Peers.watched += 1

    monkeypatch.setattr(ranks, "DEATH_GRACE_S", 0.3)
    group = ranks.TrainerRanks.__new__(ranks.TrainerRanks)   # only _collective is exercised
    group.others, group.peers = 1, Peers()

    def fail(exc):
        raise exc

    for own in (RuntimeError("The size of tensor a (3) must match"), torch.OutOfMemoryError("CUDA out of memory")):
        with pytest.raises(type(own)):
            group._collective(fail, own)
        assert Peers.watched == 0   # the grace loop's only wait is between watch() calls: none means no wait
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        group._collective(fail, RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert Peers.watched > 0 and time.monotonic() - t0 >= 0.3


def test_engine_start_interrupted_stops_the_engines(tmp_path, monkeypatch):
    """Ctrl-C (or any error) while waiting for the engines to be ready stops the started ones: a
    non-daemonic engine left running would block the driver's exit (multiprocessing joins it)."""
    started = []

    def interrupted(self, timeout, expect):
        started.extend(self.procs)
        raise KeyboardInterrupt

    monkeypatch.setattr(ProcessEngines, "_drain", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            ProcessEngines(fake_factory, LocalStore(root=tmp_path / "s"), ["cpu", "cpu"], daemon=False)
        assert len(started) == 2
        assert [p.is_alive() for p in started] == [False, False]
    finally:
        for p in started:   # (before the fix they were left running)
            if p.is_alive():
                p.terminate()
                p.join(5)


def test_engine_factory_that_cannot_be_sent_is_its_own_error(tmp_path):
    """A factory the spawned process cannot receive fails at start with pickle's error (the clean-up skips
    the processes that never started instead of failing on them)."""
    import pickle

    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ProcessEngines(lambda store, device: None, LocalStore(root=tmp_path / "s"), ["cpu"])


class MarkingEngine:
    """An engine whose close() leaves a file (as a real one removes its files and child processes)."""

    def __init__(self, marker):
        self.marker = marker

    def generate(self, samples):
        raise RuntimeError("generate failed")

    def close(self):
        self.marker.write_text("closed")


def marking_factory(marker, store, device):
    return MarkingEngine(marker)


@pytest.mark.parametrize("how", ["generate fails", "SIGINT"])
def test_engine_process_closes_its_engine_when_it_ends_abnormally(tmp_path, how):
    """The engine process closes its engine on a failed generate and on Ctrl-C (SIGINT reaches the whole
    process group), not only on a stop message."""
    import os
    import signal

    marker = tmp_path / "closed"
    engines = ProcessEngines(functools.partial(marking_factory, marker), LocalStore(root=tmp_path / "s"), ["cpu"])
    try:
        if how == "SIGINT":
            os.kill(engines.procs[0].pid, signal.SIGINT)
        else:
            engines.submit(0, _dataset(1))
        engines.procs[0].join(timeout=30)
        assert not engines.procs[0].is_alive()
        assert marker.exists(), f"engine not closed after: {how}"
    finally:
        engines.close()
