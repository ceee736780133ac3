"""The `memory` store of colocated runs: the Store contract in one process, picked by `inference.store: auto`
when the engine runs in the trainer process, and a colocated run through it trains exactly as through the
shared-memory store."""

import pytest
import torch
from store_helpers import check_odd_dtypes_and_shapes, check_roundtrip, make_record, record_nbytes

from pipeline_helpers import tiny_run_config
from torchspec.config.errors import ConfigError
from torchspec.config.schema import Config
from torchspec.pipeline.runner import run_training
from torchspec.transfer.base import StoreFull
from torchspec.transfer.factory import build_store, store_type
from torchspec.transfer.memory import MemoryStore


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_bitwise_and_accounting(dtype):
    check_roundtrip(MemoryStore(), dtype, accounted=record_nbytes)


def test_every_dtype_and_odd_shapes_bit_exact():
    check_odd_dtypes_and_shapes(MemoryStore(), accounted=record_nbytes)


def test_capacity_refuses_at_once_and_puts_own_copies():
    rec = make_record(1)
    store = MemoryStore(capacity_bytes=record_nbytes(rec))
    store.put("a", rec)
    with pytest.raises(StoreFull, match="memory store"):
        store.put("b", rec)
    rec["aux_hidden_states"].zero_()          # the engine reusing its buffer changes nothing stored
    assert store.get("a")["aux_hidden_states"].abs().sum() > 0
    store.delete("a")
    store.put("b", rec)
    assert store.keys() == ["b"]


def test_auto_picks_memory_only_when_colocated():
    cfg = Config()
    cfg.inference.colocate = True
    assert store_type(cfg) == "memory" and isinstance(build_store(cfg), MemoryStore)
    cfg.inference.store = "local"
    assert store_type(cfg) == "local"
    cfg.inference.colocate, cfg.inference.store = False, "memory"
    with pytest.raises(ConfigError, match="inference.colocate=true"):
        store_type(cfg)
    cfg.inference.store = "auto"
    assert store_type(cfg) == "local"


def test_colocated_run_through_memory_equals_shared_memory(tmp_path, tiny_target_dir):
    runs = {}
    for store in ("auto", "local"):
        cfg = tiny_run_config(tmp_path / store, tiny_target_dir, num_epochs=1)
        cfg.inference.colocate, cfg.inference.store = True, store
        runs[store] = run_training(cfg, progress=False)
    assert runs["auto"].store_root is None and runs["local"].store_root is not None   # memory vs shared memory
    assert runs["auto"].losses == runs["local"].losses and len(runs["auto"].losses) == 6
    assert runs["auto"].store_bytes_end == 0
