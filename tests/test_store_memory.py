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


@pytest.mark.gpu
def test_a_record_put_on_a_side_stream_is_read_after_it_is_written_and_kept_until_read():
    """The colocated engine puts from its own stream: a reader on the trainer's stream must see the record as
    written (the put's event), and deleting it right after the read must not let the engine's stream reuse its
    memory before the delayed read has run (record_stream)."""
    side, n = torch.cuda.Stream(), 1 << 20
    store = MemoryStore()
    ids = torch.arange(8)
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)   # the side stream is busy for a while before the record is written
        aux = torch.full((8, n // 8), 7.0, device="cuda")
        store.put("a", {"input_ids": ids, "loss_mask": torch.ones(8, dtype=torch.uint8),
                        "aux_hidden_states": aux, "final_hidden_states": aux[:, :4]})
    torch.cuda._sleep(400_000_000)       # ... and the reading stream is later still
    got = store.get("a")
    store.delete("a")
    with torch.cuda.stream(side):        # the engine's next allocation of that size
        torch.empty(8, n // 8, device="cuda").fill_(-1.0)
    assert torch.equal(got["aux_hidden_states"].cpu(), torch.full((8, n // 8), 7.0))
    assert torch.equal(got["input_ids"], ids) and not got["input_ids"].is_cuda


@pytest.mark.gpu
def test_colocated_on_cuda_the_engine_stream_trains_as_without_it(tmp_path, tiny_target_dir, monkeypatch):
    from torchspec.pipeline import launcher_local

    runs = {}
    for on in (True, False):
        monkeypatch.setattr(launcher_local, "ENGINE_STREAM", on)
        cfg = tiny_run_config(tmp_path / str(on), tiny_target_dir, num_epochs=1)
        cfg.inference.colocate = True
        runs[on] = run_training(cfg, progress=False)
    assert [s for _, s in runs[True].losses] == pytest.approx([s for _, s in runs[False].losses], rel=1e-3)
    assert [x[2] for x in runs[True].trained] == [x[2] for x in runs[False].trained]
    assert runs[True].store_bytes_end == 0
