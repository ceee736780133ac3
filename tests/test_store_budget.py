"""Issue 18 item 3: the store bounded by bytes. Its default capacity comes from the free space, the controller
admits samples by bytes (pool + engines' batches + sets taken), the dry run prints the bytes, and the driver's
data state stays small (ranges of epoch positions, not every id)."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
import torch

from test_pipeline_controller import FakeEngine, _drive, _flat
from torchspec.config.schema import Config
from torchspec.data.sample import Sample
from torchspec.pipeline.controller import Controller, epoch_order
from torchspec.pipeline.launcher_local import InlineEngines
from torchspec.transfer import capacity
from torchspec.transfer.capacity import record_bytes, store_budget
from torchspec.transfer.local import LocalStore

GB = 1 << 30


# -- the default capacity -------------------------------------------------------------------------------------
def test_default_capacity_is_half_the_free_shared_memory(monkeypatch, tmp_path):
    seen = []

    def usage(path):
        seen.append(str(path))
        return shutil._ntuple_diskusage(40 * GB, 30 * GB, 10 * GB)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr("torchspec.transfer.local.store_base", lambda: str(tmp_path))
    b = store_budget(Config(), "local")
    assert b.capacity == 5 * GB and seen == [str(tmp_path)]      # where the local store makes its directory
    assert b.source == f"inference.store_capacity=null: 50% of the 10240.0 MB free in {tmp_path} = 5120.0 MB"
    cfg = Config()
    cfg.inference.store_capacity = 123456                       # given: used as is, nothing measured
    assert store_budget(cfg, "local").capacity == 123456 and len(seen) == 1
    assert store_budget(Config(), "mooncake").capacity is None  # its segment bounds it


def test_default_capacity_of_the_memory_store_is_a_quarter_of_the_ram(monkeypatch):
    monkeypatch.setattr(capacity, "_available_ram", lambda: 16 * GB)
    b = store_budget(Config(), "memory", "cpu")
    assert b.capacity == 4 * GB and "25% of the 16384.0 MB available RAM" in b.source


def test_the_built_store_gets_the_default(monkeypatch, tmp_path):
    from torchspec.transfer.factory import build_store

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(4 * GB, 0, 2 * GB))
    store = build_store(Config())
    try:
        assert store.capacity_bytes == GB
    finally:
        store.close()


# -- admission by bytes ---------------------------------------------------------------------------------------
H, AUX = 4, 3     # FakeEngine's records: aux [T, 12] and final [T, 4] float32


def _bytes(n: int) -> int:
    return record_bytes(n, H, AUX, torch.float32)


class _Watch(FakeEngine):
    """Records the store's bytes after every put."""

    def __init__(self, store):
        super().__init__(store)
        self.peak = 0

    def generate(self, samples):
        out = []
        for s in samples:
            out += super().generate([s])
            self.peak = max(self.peak, self.store.bytes_used())
        return out


def _varlen(n: int) -> list[Sample]:
    lengths = [3, 40, 7, 64, 1, 25, 64, 9, 33, 2]
    return [Sample(f"v{i:03d}", torch.arange(lengths[i % 10]), torch.ones(lengths[i % 10], dtype=torch.uint8))
            for i in range(n)]


@pytest.mark.parametrize("depth", [0, 2])
def test_the_pool_never_passes_the_byte_budget(tmp_path, depth):
    """Variable lengths, a pool of 30 samples allowed by count but a budget of about 4 of the longest records, sets
    taken ahead (`depth`) before the oldest is trained: the store never holds more than the budget, and every
    sample is trained once."""
    data = _varlen(40)
    budget = 4 * _bytes(64)
    store = LocalStore(root=tmp_path / "s")      # unbounded itself: only the controller keeps it under budget
    engine = _Watch(store)
    ctrl = Controller(data, InlineEngines(engine), store, micro_batch_size=2, max_sample_pool_size=30,
                      inference_batch_size=3, inference_buffer_threshold=6, store_capacity=budget,
                      record_bytes=_bytes)
    seen, ahead = [], []
    while True:
        while len(ahead) < depth + 1 and (b := ctrl.next_micro_batches(wait=not ahead)) is not None:
            ahead.append(b)
        if not ahead:
            break
        assert store.bytes_used() <= ctrl.store_bytes() <= budget
        b = ahead.pop(0)
        seen += [s.sample_id for mb in b for s in mb]
        ctrl.mark_trained(b)
    assert sorted(seen) == sorted(s.sample_id for s in data)
    assert 0 < engine.peak <= budget and ctrl.pool_stats.peak_bytes <= budget
    assert engine.peak > _bytes(64)              # more than one record at a time: the budget was used
    ctrl.shutdown()
    assert store.bytes_used() == 0 and ctrl.store_bytes() == 0


def test_without_a_budget_the_sets_taken_pile_up_in_the_store(tmp_path):
    """What the budget prevents (so the checks above can fail): by counts alone, sets taken and not yet trained
    (a deep read-ahead) hold any number of bytes; with the budget the controller refuses (next test)."""
    store = LocalStore(root=tmp_path / "s")
    ctrl = Controller(_varlen(40), InlineEngines(FakeEngine(store)), store, micro_batch_size=2,
                      max_sample_pool_size=30, inference_batch_size=3, inference_buffer_threshold=6)
    held = [ctrl.next_micro_batches() for _ in range(10)]
    assert all(held) and store.bytes_used() > 4 * _bytes(64)
    ctrl.shutdown()


def test_sets_held_past_the_budget_raise_instead_of_hanging(tmp_path):
    store = LocalStore(root=tmp_path / "s")
    ctrl = Controller(_varlen(20), InlineEngines(FakeEngine(store)), store, micro_batch_size=2,
                      max_sample_pool_size=10, inference_batch_size=2, inference_buffer_threshold=2,
                      store_capacity=2 * _bytes(64), record_bytes=_bytes)
    held = [ctrl.next_micro_batches() for _ in range(3)]
    with pytest.raises(RuntimeError, match=r"byte budget .* is full .* set\(s\) taken are not trained"):
        for _ in range(20):
            held.append(ctrl.next_micro_batches())
    ctrl.shutdown()


# -- the dry run ---------------------------------------------------------------------------------------------
def test_dry_run_prints_the_bytes_per_record_and_the_peak(tmp_path, tiny_target_dir, capsys):
    from pipeline_helpers import config_file, tiny_run_config
    from torchspec.train_entry import main

    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    config = config_file(cfg, tmp_path / "config")
    assert main(["--config", str(config), "--dry-run", "inference.store_capacity=1MB",
                 "inference.max_sample_pool_size=16", "training.prefetch_depth=2"]) == 0
    out = capsys.readouterr().out
    one = record_bytes(128, 64, 3, torch.float32)    # the tiny target: H=64, 3 aux layers, fp32 on CPU
    assert (f"  bytes per record: one record of training.max_seq_length=128 tokens is {one / 2**20:.1f} MB (target "
            "hidden size 64, 3 aux layers + the final one, float32)") in out
    records = 16 + (2 + 1) * 2                       # pool + (read-ahead + the set training) x micro-batch 2
    assert (f"  peak store bytes by sample counts: {records * one / 2**20:.1f} MB = {records} records "
            "(inference.max_sample_pool_size=16 + (training.prefetch_depth=2 + 1) x 2 per step)") in out
    assert ("  peak store bytes: 1.0 MB (the budget: inference.store_capacity=1.0 MB; the controller pauses the "
            "engines at it)") in out
    assert main(["--config", str(config), "--dry-run", "inference.store_capacity=200000"]) == 2
    assert "holds 1 record(s) but a step needs 2" in capsys.readouterr().out


# -- the data state ----------------------------------------------------------------------------------------
class _Ids:
    """A dataset of n ids that only names its samples (as a lazily tokenized one does)."""

    def __init__(self, n):
        self.sample_ids = [f"conv-{i:07d}" for i in range(n)]

    def __len__(self):
        return len(self.sample_ids)


_NoEngines = namedtuple("_NoEngines", "num_workers")


def test_data_state_of_a_million_ids_is_small_and_exact():
    data = _Ids(1_000_000)
    kw = dict(micro_batch_size=4, max_sample_pool_size=8, inference_batch_size=1, inference_buffer_threshold=1,
              seed=3)
    order = epoch_order(data.sample_ids, 3, 0)
    # 600k trained, out of order at the front: the old format lists them all (about 10 MB of JSON)
    trained = order[:599_990] + order[600_000:600_010:2] + order[599_995:599_998]
    old = {"epoch": 0, "trained_ids": trained}
    ctrl = Controller(data, _NoEngines(1), None, data_state=old, **kw)
    state = ctrl.data_state()
    text = json.dumps(state)
    assert len(json.dumps(old)) > 9_000_000 and len(text) < 400, len(text)
    assert state["trained"] == [[0, 599_990], [599_995, 599_998], [600_000, 600_001], [600_002, 600_003],
                                [600_004, 600_005], [600_006, 600_007], [600_008, 600_009]]
    # round trip: the new state resumes exactly where the old one did
    again = Controller(data, _NoEngines(1), None, data_state=json.loads(text), **kw)
    assert list(again.prompts) == list(ctrl.prompts) and len(again.prompts) == 1_000_000 - len(trained)
    assert again.data_state() == state and set(again.trained_ids()) == set(trained)
    # a state of another dataset is refused, not misread
    with pytest.raises(ValueError, match="dataset of 1000000 samples, not this one"):
        Controller(_Ids(999_999), _NoEngines(1), None, data_state=state, **kw)


def test_data_state_round_trips_through_training(tmp_path):
    data = _varlen(23)
    kw = dict(micro_batch_size=3, num_epochs=2, max_sample_pool_size=6, inference_batch_size=2,
              inference_buffer_threshold=2, seed=1)
    store = LocalStore(root=tmp_path / "s")
    a = Controller(data, InlineEngines(FakeEngine(store)), store, **kw)
    first = _flat(_drive(a, store, steps=10))
    state = json.loads(json.dumps(a.data_state()))
    a.shutdown()
    b = Controller(data, InlineEngines(FakeEngine(store)), store, data_state=state, **kw)
    rest = _flat(_drive(b, store))
    assert sorted(first[23:] + rest) == sorted(s.sample_id for s in data)   # epoch 2: each sample once
    assert len(first) == 29 and not set(first[23:]) & set(rest)
    b.shutdown()


# -- the driver's lists ---------------------------------------------------------------------------------------
def test_run_result_lists_stay_bounded(tmp_path, tiny_target_dir, monkeypatch):
    """RunResult.trained and .losses keep the most recent entries, not the whole run (24 samples, 12 steps: with a
    bound of 5 at most 10 stay, the newest last); the pool's history is a window, its peak is kept."""
    from pipeline_helpers import tiny_run_config
    from torchspec.pipeline import runner

    monkeypatch.setattr(runner, "TRAINED_KEPT", 5)
    r = runner.run_training(tiny_run_config(tmp_path, tiny_target_dir), progress=False)
    assert r.global_step == 12
    assert 5 <= len(r.trained) <= 10 and r.trained[-1][0] == 12
    assert 5 <= len(r.losses) <= 10 and [s for s, _ in r.losses] == list(range(13 - len(r.losses), 13))
    assert r.pool_peak == max(r.pool_sizes) and 0 < r.store_peak_bytes
