"""The trainer's read-ahead (training.prefetch_depth, training.max_concurrent_batches) and the controller's
prompt fetch granularity (inference.inference_fetch_batch): each key changes what happens, and the read-ahead
never changes what is trained."""

import threading
import time

import pytest
import torch

from pipeline_helpers import tiny_run_config
from test_pipeline_controller import CountingLazy, FakeEngine, _dataset, _flat
from torchspec.pipeline import ranks
from torchspec.pipeline.controller import Controller
from torchspec.pipeline.launcher_local import InlineEngines
from torchspec.pipeline.runner import run_training
from torchspec.training import prefetch
from torchspec.training.prefetch import Prefetcher
from torchspec.transfer.local import LocalStore


class ReadProbe:
    """Wraps ranks.rank_batch: counts reads and the most that ran at the same time."""

    def __init__(self, delay: float = 0.0):
        self.real, self.delay = ranks.rank_batch, delay
        self.lock = threading.Lock()
        self.reads = self.active = self.most = 0

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(self.delay)
            return self.real(*args, **kwargs)
        finally:
            with self.lock:
                self.active -= 1
                self.reads += 1


def _run(tmp_path, target, monkeypatch, probe, on_step=None, threads=True, **training):
    monkeypatch.setattr(ranks, "rank_batch", probe)
    monkeypatch.setattr(prefetch, "THREADS_OFF_CUDA", threads)   # the threaded path (CUDA's) on this CPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)     # these runs are the CPU path, also on a GPU box
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_run_config(tmp_path, target, n_conversations=12, num_epochs=1, **training)
    cfg.inference.inference_batch_size = 6   # the inline engine fills the pool beyond one micro-batch
    cfg.inference.max_sample_pool_size = 8
    return run_training(cfg, progress=False, on_step=on_step)


def test_read_ahead_reads_later_micro_batches_during_a_step_and_trains_the_same(tmp_path, tiny_target_dir,
                                                                               monkeypatch):
    seen = {}

    def on_step(step, record):
        if step == 1:   # the next two micro-batches were taken and are read while step 1 is logged
            deadline = time.monotonic() + 10
            while probe.reads < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            seen["reads_at_step_1"] = probe.reads

    probe = ReadProbe()
    ahead = _run(tmp_path / "ahead", tiny_target_dir, monkeypatch, probe, on_step, prefetch_depth=2)
    assert seen["reads_at_step_1"] == 3
    assert probe.reads == len(ahead.losses)                 # nothing read twice, nothing read for nothing
    plain = _run(tmp_path / "plain", tiny_target_dir, monkeypatch, ReadProbe(), prefetch_depth=0)
    assert [s for _, _, s in ahead.trained] == [s for _, _, s in plain.trained]
    assert ahead.losses == plain.losses                      # bitwise: the read-ahead changes no number


@pytest.mark.parametrize("workers", [1, 2])
def test_max_concurrent_batches_is_the_number_of_reads_at_once(tmp_path, tiny_target_dir, monkeypatch, workers):
    probe = ReadProbe(delay=0.3)
    _run(tmp_path, tiny_target_dir, monkeypatch, probe, prefetch_depth=3, max_concurrent_batches=workers)
    assert probe.most == workers


def test_prefetcher_returns_in_submission_order_and_raises_a_failed_read():
    def read(i):
        time.sleep(0.05 * (3 - i))   # later submissions finish first
        if i == 3:
            raise KeyError("gone")
        return {"x": torch.tensor([i])}

    prefetch.THREADS_OFF_CUDA = True
    try:
        p = Prefetcher(read, "cpu", workers=3)
    finally:
        prefetch.THREADS_OFF_CUDA = False
    for i in range(4):
        p.submit(i)
    assert [int(p.take()["x"]) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="gone"):
        p.take()
    with pytest.raises(RuntimeError, match="nothing submitted"):
        p.take()
    p.close()


def test_sets_taken_ahead_are_marked_in_order_and_the_epoch_waits_for_them(tmp_path):
    store = LocalStore(root=tmp_path / "s")
    ctrl = Controller(_dataset(7), InlineEngines(FakeEngine(store)), store, micro_batch_size=2, num_epochs=2,
                      max_sample_pool_size=8, inference_batch_size=8, inference_buffer_threshold=8)
    first = ctrl.next_micro_batches()
    ahead = [ctrl.next_micro_batches(wait=False) for _ in range(3)]   # 2 + 2 + 2 + 1 samples: the whole epoch
    assert [len(b[0]) for b in ahead] == [2, 2, 1]
    assert ctrl.next_micro_batches(wait=False) is None and ctrl.next_micro_batches() is None  # epoch 1 waits
    with pytest.raises(RuntimeError, match="oldest set"):
        ctrl.mark_trained(ahead[0])
    for b in [first] + ahead:
        ended = ctrl.mark_trained(b)
    assert ended and ctrl.epoch == 1
    epoch0 = _flat([[[s.sample_id for s in mb] for mb in b] for b in [first] + ahead])
    assert sorted(epoch0) == sorted(s.sample_id for s in _dataset(7))
    assert ctrl.next_micro_batches() is not None   # the next epoch starts
    ctrl.shutdown()
    assert store.bytes_used() == 0


class TakingLazy(CountingLazy):
    def __init__(self, data):
        super().__init__(data)
        self.takes = []

    def take(self, indices):
        self.takes.append(list(indices))
        return [self.data[i] for i in indices]


@pytest.mark.parametrize("fetch", [1, 4])
def test_inference_fetch_batch_is_how_many_prompts_are_taken_at_a_time(tmp_path, fetch):
    lazy = TakingLazy(_dataset(10))
    store = LocalStore(root=tmp_path / "s")
    ctrl = Controller(lazy, InlineEngines(FakeEngine(store)), store, micro_batch_size=1, num_epochs=1,
                      max_sample_pool_size=2, inference_batch_size=1, inference_buffer_threshold=1,
                      inference_fetch_batch=fetch)
    while (b := ctrl.next_micro_batches()) is not None:
        ctrl.mark_trained(b)
    assert [len(t) for t in lazy.takes] == ([4, 4, 2] if fetch == 4 else [1] * 10)
    assert sorted(i for t in lazy.takes for i in t) == list(range(10))
    ctrl.shutdown()


def test_off_cuda_reads_run_in_the_training_thread_when_taken(tmp_path, tiny_target_dir, monkeypatch):
    threads = set()
    real = ranks.rank_batch

    def probe(*a, **k):
        threads.add(threading.current_thread().name)
        return real(*a, **k)

    ahead = _run(tmp_path / "cpu", tiny_target_dir, monkeypatch, probe, threads=False, prefetch_depth=2)
    assert threads == {threading.main_thread().name}
    plain = _run(tmp_path / "t", tiny_target_dir, monkeypatch, ReadProbe(), threads=True, prefetch_depth=2)
    assert ahead.losses == plain.losses


@pytest.mark.gpu
def test_prefetcher_copies_to_the_device_on_a_side_stream():
    p = Prefetcher(lambda n: {"x": torch.arange(n, dtype=torch.float32), "n": n}, "cuda", workers=2)
    for n in (1000, 10, 1 << 20):
        p.submit(n)
    for n in (1000, 10, 1 << 20):
        b = p.take()
        assert b["x"].is_cuda and b["n"] == n
        assert float(b["x"].sum()) == float(torch.arange(n, dtype=torch.float64).sum())
    p.close()
