"""The Store contract both stores (local, mooncake) must keep: shared by tests/test_store.py and
tests/test_store_mooncake.py, so each store runs the same checks."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from torchspec.transfer.base import Store, StoreFull, record_nbytes
from torchspec.transfer.record import layout


def mooncake_missing() -> str | None:
    """Why the mooncake tests cannot run (the skip reason with the install hint), or None; with
    TORCHSPEC_REQUIRE_MOONCAKE=1 a missing mooncake is an error instead."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:
        if os.environ.get("TORCHSPEC_REQUIRE_MOONCAKE") == "1":
            raise
        return f"mooncake is not installed ({e}); install it with: pip install -e '.[mooncake]'"
    return None


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def make_record(seed: int, T: int = 7, H: int = 8, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 100, (T,), generator=g),
        "loss_mask": (torch.rand(T, generator=g) > 0.5).to(torch.uint8),
        "aux_hidden_states": torch.randn(T, 3 * H, generator=g).to(dtype),
        "final_hidden_states": torch.randn(T, H, generator=g).to(dtype),
    }


def record_bytes(rec: dict[str, torch.Tensor]) -> int:
    """Bytes a store accounts for one record (header + aligned payload)."""
    return layout(rec)[2]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(_bits(got[k]), _bits(want[k])), k     # bit-exact (NaN payloads, -0.0 included)


def check_roundtrip(store, dtype, accounted=None) -> None:
    """put/get/delete of one record: bit-exact, accounted, isolated from readers' writes, KeyErrors."""
    assert isinstance(store, Store)
    rec = make_record(0, dtype=dtype)
    rec["aux_hidden_states"][0, :3] = torch.tensor([float("nan"), -0.0, float("inf")]).to(dtype)
    store.put("a/b c", rec)                 # keys with characters unsafe in file / Mooncake / regex names
    assert store.keys() == ["a/b c"]
    assert store.bytes_used() == (accounted or record_bytes)(rec) >= record_nbytes(rec)
    got = store.get("a/b c")
    assert_same(got, rec)
    got["aux_hidden_states"].zero_()        # a reader's writes never reach the stored record
    assert_same(store.get("a/b c"), rec)
    with pytest.raises(KeyError):
        store.put("a/b c", rec)
    store.delete("a/b c")
    assert store.bytes_used() == 0 and store.keys() == []
    for key in ("x.tmp1", "%counters", "%tmp1-x"):   # names like the stores' own files are keys like any
        store.put(key, rec)
    assert store.keys() == sorted(["x.tmp1", "%counters", "%tmp1-x"])
    store.clear()
    assert store.bytes_used() == 0 and store.keys() == []
    with pytest.raises(KeyError):
        store.get("a/b c")
    with pytest.raises(KeyError):
        store.delete("a/b c")


def check_odd_dtypes_and_shapes(store, accounted=None) -> None:
    g = torch.Generator().manual_seed(5)
    rec = {
        "f64": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "bf16_3d": torch.randn(2, 3, 5, generator=g).bfloat16(),
        "i32": torch.randint(-2**31, 2**31 - 1, (11,), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 127, (13,), generator=g, dtype=torch.int8),
        "bool": torch.rand(9, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "strided": torch.randn(6, 4, generator=g).t(),   # non-contiguous input
    }
    store.put("k", rec)
    assert store.bytes_used() == (accounted or record_bytes)(rec)
    assert_same(store.get("k"), rec)
    store.clear()
    assert store.keys() == [] and store.bytes_used() == 0


def check_capacity_wait(store, rec) -> None:
    """`store` has capacity_bytes == 2 records of `rec`'s size and put_timeout_s of a few seconds: a third
    put waits for a delete; with no delete it raises StoreFull and reserves nothing."""
    one = record_bytes(rec)
    assert store.capacity_bytes == 2 * one
    store.put("k0", rec)
    store.put("k1", rec)
    assert store.bytes_used() == 2 * one
    t0 = time.monotonic()                    # before the timer starts: the delete comes >= 0.3 s after t0
    threading.Timer(0.3, store.delete, args=("k0",)).start()
    store.put("k2", rec)                     # waits for the delete
    assert time.monotonic() - t0 >= 0.25
    assert store.bytes_used() == 2 * one and store.keys() == ["k1", "k2"]
    store.put_timeout_s = 0.2
    with pytest.raises(StoreFull, match=r"no room for a record of \d+ bytes within the put's timeout .*nothing was "
                                        r"freed.*raise inference.store_capacity$"):
        store.put("k3", rec)
    assert store.keys() == ["k1", "k2"] and store.bytes_used() == 2 * one    # the failed put reserved nothing
    store.clear()
    assert store.bytes_used() == 0


def _child_put(store, n):
    for i in range(n):
        store.put(f"child-{i}", make_record(100 + i, dtype=torch.bfloat16))
    assert_same(store.get("parent-0"), make_record(7))
    store.delete("parent-0")
    store.close()                       # a receiving process's close() leaves the records in place


def check_shared_across_processes(store) -> None:
    """A spawned process holding the pickled store reads and deletes what this one put and puts records
    this one reads; accounting and put statistics cover both processes."""
    import torch.multiprocessing as mp

    bytes_before, _ = store.put_stats()
    store.put("parent-0", make_record(7))
    parent_bytes = store.bytes_used()
    p = mp.get_context("spawn").Process(target=_child_put, args=(store, 3))
    p.start()
    p.join(120)
    assert p.exitcode == 0
    assert store.keys() == ["child-0", "child-1", "child-2"]
    for i in range(3):
        assert_same(store.get(f"child-{i}"), make_record(100 + i, dtype=torch.bfloat16))
    used = store.bytes_used()
    assert used == sum(record_bytes(make_record(100 + i, dtype=torch.bfloat16)) for i in range(3))
    put_bytes, put_s = store.put_stats()       # summed over both processes
    assert put_bytes - bytes_before == parent_bytes + used and put_s > 0
    for i in range(3):
        store.delete(f"child-{i}")
    assert store.bytes_used() == 0


MC_SEGMENT = 16 << 20      # a test run's Mooncake segment (the default is 8 GiB)
MC_STAGING = 4 << 20       # each client's staging buffer in tests (the default is 2 GiB)


def small_mooncake(cfg, max_batch_size: int = 8):
    """A tiny-model run's `mooncake` section sized for tests: a 16 MB segment, 4 MB staging buffers holding
    `max_batch_size` records of the run's training.max_seq_length (the start's check_mooncake)."""
    cfg.mooncake.global_segment_size = MC_SEGMENT
    cfg.mooncake.local_buffer_size = MC_STAGING
    cfg.mooncake.max_seq_len = cfg.training.max_seq_length
    cfg.mooncake.max_batch_size = max_batch_size
    return cfg
