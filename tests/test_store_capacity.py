"""inference.store_capacity against what a run must hold at once, checked before anything starts (a store
too small used to stall a run silently for 10 minutes, then fail with advice that could not help); a put
that waits for room says so in the log."""

import logging
import re
import time

import pytest
import torch

from store_helpers import make_record, record_bytes as layout_bytes
from torchspec.config.errors import ConfigError
from torchspec.config.schema import Config
from torchspec.inference.base import put_record
from torchspec.transfer import base
from torchspec.transfer.base import StoreFull
from torchspec.transfer.capacity import check_store_capacity, record_bytes
from torchspec.transfer.local import LocalStore


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_record_bytes_is_what_the_store_accounts_for_a_real_record(tmp_path, dtype):
    from torchspec.data.sample import Sample

    store = LocalStore(root=tmp_path / "s")
    T, H = 37, 24
    sample = Sample("a", torch.arange(T), torch.ones(T, dtype=torch.uint8))
    put_record(store, sample, torch.randn(T, 3 * H).to(dtype), torch.randn(T, H).to(dtype))
    assert store.bytes_used() == record_bytes(T, H, 3, dtype)
    store.close()


def _cfg(capacity, *, batch=8, mbs=2, seq=128, colocate=False, pool=64):
    cfg = Config()
    cfg.inference.store_capacity = capacity
    cfg.inference.inference_batch_size = batch
    cfg.inference.colocate = colocate
    cfg.inference.max_sample_pool_size = pool
    cfg.training.micro_batch_size = mbs
    cfg.training.max_seq_length = seq
    return cfg


def test_capacity_below_a_step_is_refused_naming_the_keys():
    """The controller admits by bytes (the engines' batches are counted before they are put), so what the store
    must hold is one step of the longest records, whatever the engines' batch or the pool's size."""
    one = record_bytes(128, 64, 3, torch.float32)
    need = 2 * 2                                    # micro-batch 2 x 2 ranks
    check_store_capacity(_cfg(need * one), 64, 3, torch.float32, num_ranks=2)   # exactly enough
    with pytest.raises(ConfigError) as e:
        check_store_capacity(_cfg(need * one - 1), 64, 3, torch.float32, num_ranks=2)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"inference.store_capacity={(need * one - 1) / 2**20:.1f} MB holds 3 record(s) but a "
                          "step needs 4: training.micro_batch_size=2 x 2 rank(s) (one record of "
                          "training.max_seq_length=128 tokens is 0.1 MB (target hidden size 64, 3 aux layers")
    assert re.search(r"raise inference.store_capacity to at least [\d.]+ MB, or lower training.micro_batch_size or "
                     r"training.max_seq_length$", msg)
    check_store_capacity(_cfg(None), 64, 3, torch.float32, num_ranks=2)   # null and not measured: no bound
    # a colocated run's pool of 11 no longer has to fit: the controller stops feeding at the budget
    check_store_capacity(_cfg(10 * one, colocate=True, pool=11), 64, 3, torch.float32, num_ranks=1)


def test_one_record_larger_than_the_store_is_refused():
    with pytest.raises(ConfigError, match=r"^inference.store_capacity=1.0 MB is smaller than one record: one record of "
                                          r"training.max_seq_length=4096 tokens is 8.0 MB \(target hidden size 256, "
                                          r"3 aux layers \+ the final one, bfloat16\); raise inference.store_capacity "
                                          r"to at least 8.0 MB or lower training.max_seq_length$"):
        check_store_capacity(_cfg(2**20, seq=4096), 256, 3, torch.bfloat16, num_ranks=1)


def test_the_issue_config_fails_at_start_in_one_line(tmp_path, tiny_target_dir, capsys):
    """A store that cannot hold one step (the tiny target: H=64, 3 aux layers, float32 on CPU; 128 tokens): before,
    no step and no log for 10 minutes, then a StoreFull traceback; now exit 2 at once."""
    from pipeline_helpers import config_file, tiny_run_config
    from torchspec.train_entry import main

    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=1)
    config = config_file(cfg, tmp_path / "config")
    assert main(["--config", str(config), "inference.store_capacity=200000", "inference.inference_batch_size=8",
                 "inference.max_sample_pool_size=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("config error: inference.store_capacity=0.2 MB holds 1 record(s) but a step needs 2: "
                              "training.micro_batch_size=2 x 1 rank(s)"), err[-1]
    assert not any("Traceback" in ln for ln in err)
    assert not list((tmp_path / "out").glob("checkpoints/*"))


class _FakeTime:
    """The `time` module for the store's wait: monotonic() is a clock that only sleep() advances, so the wait's
    log lines and its timeout do not depend on how the machine schedules this process."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_put_waiting_for_room_is_logged_then_fails_with_the_right_advice(tmp_path, monkeypatch, caplog):
    from torchspec.transfer import local

    clock = _FakeTime()
    monkeypatch.setattr(local, "time", clock)
    monkeypatch.setattr(base, "time", clock)
    monkeypatch.setattr(base, "FULL_LOG_AFTER_S", 0.05)
    monkeypatch.setattr(base, "FULL_LOG_EVERY_S", 0.2)
    rec = make_record(0)
    one = layout_bytes(rec)
    store = LocalStore(capacity_bytes=2 * one, root=tmp_path / "s", put_timeout_s=0.7)
    store.put("a", rec)
    store.put("b", rec)
    with caplog.at_level(logging.WARNING, logger="torchspec.transfer"):
        with pytest.raises(StoreFull, match=r"^local store: no room for a record of \d+ bytes within the put's timeout "
                                            r"\(capacity \d+, in use \d+\): nothing was freed"):
            store.put("c", rec)
    waits = [r.getMessage() for r in caplog.records if "store full" in r.getMessage()]
    assert len(waits) == 4             # the first after 0.05 s, then every 0.2 s until the 0.7 s timeout
    assert 0.7 <= clock.now - 1000.0 < 0.71   # it failed at its timeout
    assert re.match(rf"local store full: a record of {one} bytes has waited 0 s for room \(inference.store_capacity "
                    rf"{2 * one} bytes, {2 * one} in use\); it waits for the trainer to take samples and free theirs, "
                    r"and fails with StoreFull after 1 s$", waits[0]), waits[0]
    # a record larger than the whole store: no wait, and the advice is about the record's size
    big = make_record(1, T=200)
    with pytest.raises(StoreFull, match=r"^local store: a record of \d+ bytes is larger than inference.store_capacity "
                                        r"\(\d+ bytes\); raise inference.store_capacity or lower "
                                        r"training.max_seq_length$"):
        store.put("d", big)
    store.close()
