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
