import os
import threading
import time

import pytest
import torch
import torch.multiprocessing as mp

from torchspec.transfer.base import Store, StoreFull, record_nbytes
from torchspec.transfer.local import LocalStore


def _record(seed: int, T: int = 7, H: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (T,), generator=g),
        "loss_mask": (torch.rand(T, generator=g) > 0.5).to(torch.uint8),
        "aux_hidden_states": torch.randn(T, 3 * H, generator=g).to(dtype),
        "final_hidden_states": torch.randn(T, H, generator=g).to(dtype),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_bitwise_and_accounting(tmp_path, dtype):
    store = LocalStore(root=tmp_path / "s")
    assert isinstance(store, Store)
    rec = _record(0, dtype=dtype)
    store.put("a/b c", rec)                 # keys with characters unsafe in file names
    used = store.bytes_used()
    assert used >= record_nbytes(rec)
    assert store.keys() == ["a/b c"]
    got = store.get("a/b c")
    assert set(got) == set(rec)
    for k in rec:
        assert got[k].dtype == rec[k].dtype and got[k].shape == rec[k].shape
        assert torch.equal(got[k], rec[k])
    got["aux_hidden_states"].zero_()        # a reader's writes never reach the stored record
    assert torch.equal(store.get("a/b c")["aux_hidden_states"], rec["aux_hidden_states"])
    with pytest.raises(KeyError):
        store.put("a/b c", rec)
    store.delete("a/b c")
    assert store.bytes_used() == 0 and store.keys() == []
    with pytest.raises(KeyError):
        store.get("a/b c")
    with pytest.raises(KeyError):
        store.delete("a/b c")


def test_capacity_blocks_until_delete_then_times_out(tmp_path):
    rec = _record(1)
    probe = LocalStore(root=tmp_path / "p")
    probe.put("x", rec)
    one = probe.bytes_used()
    store = LocalStore(capacity_bytes=2 * one, root=tmp_path / "s", put_timeout_s=5.0)
    store.put("k0", rec)
    store.put("k1", rec)
    assert store.bytes_used() == 2 * one
    # A third put waits for room; a delete from another thread frees it.
    threading.Timer(0.3, store.delete, args=("k0",)).start()
    t0 = time.monotonic()
    store.put("k2", rec)
    assert time.monotonic() - t0 >= 0.25
    assert store.bytes_used() == 2 * one and sorted(store.keys()) == ["k1", "k2"]
    store.put_timeout_s = 0.2
    with pytest.raises(StoreFull, match="max_sample_pool_size"):
        store.put("k3", rec)
    assert store.bytes_used() == 2 * one    # the failed put reserved nothing
    store.clear()
    assert store.bytes_used() == 0


def _child_put(store, n):
    for i in range(n):
        store.put(f"child-{i}", _record(100 + i))
    store.delete("parent-0")


def test_processes_share_records_and_accounting(tmp_path):
    store = LocalStore(root=tmp_path / "s")
    store.put("parent-0", _record(7))
    parent_bytes = store.bytes_used()
    p = mp.get_context("spawn").Process(target=_child_put, args=(store, 3))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert store.keys() == ["child-0", "child-1", "child-2"]
    for i in range(3):
        want = _record(100 + i)
        got = store.get(f"child-{i}")
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert store.bytes_used() > 0
    put_bytes, put_s = store.put_stats()       # bandwidth counters are summed over processes
    assert put_bytes == parent_bytes + store.bytes_used() and put_s > 0
    for i in range(3):
        store.delete(f"child-{i}")
    assert store.bytes_used() == 0


def test_close_removes_directory():
    store = LocalStore()
    store.put("k", _record(3))
    root = store.root
    assert root.is_dir()
    store.close()
    assert not os.path.exists(root)
    assert store.bytes_used() == 0
