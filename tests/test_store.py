import os

import pytest
import torch
from store_helpers import (check_capacity_wait, check_odd_dtypes_and_shapes, check_roundtrip,
                           check_shared_across_processes, record_bytes)
from store_helpers import make_record as _record

from torchspec.transfer.local import LocalStore


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_roundtrip_bitwise_and_accounting(tmp_path, dtype):
    check_roundtrip(LocalStore(root=tmp_path / "s"), dtype)


def test_every_dtype_and_odd_shapes_bit_exact(tmp_path):
    check_odd_dtypes_and_shapes(LocalStore(root=tmp_path / "s"))


def test_capacity_blocks_until_delete_then_times_out(tmp_path):
    rec = _record(1)
    check_capacity_wait(LocalStore(capacity_bytes=2 * record_bytes(rec), root=tmp_path / "s", put_timeout_s=5.0), rec)


def test_processes_share_records_and_accounting(tmp_path):
    check_shared_across_processes(LocalStore(root=tmp_path / "s"))


def test_close_removes_directory():
    store = LocalStore()
    store.put("k", _record(3))
    root = store.root
    assert root.is_dir()
    store.close()
    assert not os.path.exists(root)
    assert store.bytes_used() == 0


def test_clear_recounts_bytes_a_signal_left_off_unless_a_put_is_writing(tmp_path):
    store = LocalStore(root=tmp_path / "s")
    rec = {"input_ids": torch.arange(8), "final_hidden_states": torch.ones(8, 4)}
    store.put("a", rec)
    store.put("b", rec)
    store._release(1)          # a Ctrl-C between a delete's unlink and its count update ...
    store._reserve(4096)       # ... or between a put's reservation and its file
    store.clear()
    assert store.keys() == [] and store.bytes_used() == 0
    store.put("c", rec)
    writing = store.root / "%tmp123-d"   # a put still writing: its reservation stands, the count is kept
    writing.write_bytes(b"x" * 10)
    store._reserve(500)
    store.clear()
    assert store.bytes_used() == 500
    writing.unlink()
    store.close()
