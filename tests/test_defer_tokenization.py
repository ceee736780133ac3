"""dataset.defer_tokenization: the engines tokenize (in their own processes), the driver only reads record
bytes; the records and losses equal the up-front path's; a sample with no supervised token is skipped."""

import json
import os
from pathlib import Path

import pytest
import torch

import torchspec.data.deferred as deferred_mod
from pipeline_helpers import tiny_run_config
from test_data_pipeline import build, conversations, write_jsonl
from test_pipeline_controller import FakeEngine
from torchspec.data.deferred import RawRecord
from torchspec.inference.deferred import TokenizingEngine
from torchspec.pipeline.controller import Controller
from torchspec.pipeline.launcher_local import InlineEngines
from torchspec.pipeline.runner import run_training
from torchspec.transfer.local import LocalStore


class _RecordingEngine:
    """Writes what the target is run on (sample id, input ids, loss mask) to a file, then runs it."""

    def __init__(self, engine, path: Path):
        self.engine, self.path = engine, path

    def generate(self, samples):
        with open(self.path, "a") as f:
            for s in samples:
                f.write(json.dumps([s.sample_id, s.input_ids.tolist(), s.loss_mask.tolist()]) + "\n")
        return self.engine.generate(samples)

    def close(self):
        self.engine.close()


class SpyFactory:
    """Builds the config's engine in the engine's process, counting there (in `<pid>.tokenized`) every
    conversation tokenized at dispatch (deferred.tokenize_many) and recording what the target runs on."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir

    def __call__(self, store, device):
        from torchspec.inference.factory import build_engine

        pid = os.getpid()
        real = deferred_mod.tokenize_many

        def counting(convs, *a, **k):
            with open(self.out_dir / f"{pid}.tokenized", "a") as f:
                f.write("".join(c.sample_id + "\n" for c in convs))
            return real(convs, *a, **k)

        deferred_mod.tokenize_many = counting
        return _RecordingEngine(build_engine(self.cfg, store, device), self.out_dir / f"{pid}.records")


def _records(out_dir: Path) -> dict:
    recs = [json.loads(x) for p in out_dir.glob("*.records") for x in p.read_text().splitlines()]
    return {sid: (ids, mask) for sid, ids, mask in recs}


def test_engine_processes_tokenize_and_records_equal_up_front(tmp_path, tiny_target_dir, cpu_only, monkeypatch):
    driver_tokenized = []
    real = deferred_mod.tokenize_many
    monkeypatch.setattr(deferred_mod, "tokenize_many",
                        lambda convs, *a, **k: driver_tokenized.extend(c.sample_id for c in convs) or real(convs, *a, **k))
    runs = {}
    for defer in (False, True):
        out = tmp_path / f"engines-{defer}"
        out.mkdir()
        cfg = tiny_run_config(tmp_path / f"run-{defer}", tiny_target_dir, engines=1, num_epochs=1)
        cfg.dataset.defer_tokenization = defer
        runs[defer] = (run_training(cfg, engine_factory=SpyFactory(cfg, out), progress=False), out)
    (up_front, out_a), (deferred, out_b) = runs[False], runs[True]
    assert driver_tokenized == []                     # the driver never tokenized a conversation at dispatch
    assert not list(out_a.glob("*.tokenized"))        # up front: the engine is given tokens
    counted = list(out_b.glob("*.tokenized"))
    assert len(counted) == 1 and int(counted[0].stem) != os.getpid()   # deferred: the engine's process did
    trained = sorted(sid for _, _, sid in deferred.trained)
    assert sorted(counted[0].read_text().split()) == trained and len(trained) == 12
    assert _records(out_b) == _records(out_a)         # the target ran on the same tokens and masks
    assert len(deferred.losses) == 6 and deferred.losses == up_front.losses   # bitwise
    assert [x[2] for x in deferred.trained] == [x[2] for x in up_front.trained]


def _with_unsupervised(tmp_path):
    """6 conversations; 2 of them have a user turn so long that max_seq_length=64 cuts every assistant token."""
    recs = conversations(6)
    for i in (1, 5):
        recs[i]["conversations"][-2]["value"] = "tell me " * 200
    return write_jsonl(tmp_path / "a.jsonl", recs)


def test_a_deferred_sample_without_supervised_token_is_skipped_by_its_engine(tmp_path, tiny_tokenizer, monkeypatch):
    data = _with_unsupervised(tmp_path)
    eager = build(data, tiny_tokenizer, max_seq_length=64)
    lazy = build(data, tiny_tokenizer, max_seq_length=64, defer_tokenization=True, cache_dir=tmp_path / "c")
    assert len(eager) == 4 and len(lazy) == 6          # up front they are dropped; deferred they are indexed
    monkeypatch.setattr(type(lazy), "take", lambda *a: pytest.fail("the driver tokenized"))
    store = LocalStore(root=tmp_path / "store")
    seen = []
    engines = InlineEngines(TokenizingEngine(FakeEngine(store), lazy.record_tokenizer))
    engines.tokenizes = True
    given = []
    real_submit = engines.submit
    engines.submit = lambda w, items: given.extend(items) or real_submit(w, items)
    ctrl = Controller(lazy, engines, store, micro_batch_size=1, num_epochs=2, max_sample_pool_size=2,
                      inference_batch_size=1, inference_buffer_threshold=1)
    epochs_ended = 0
    while (batches := ctrl.next_micro_batches()) is not None:
        for s in batches[0]:
            rec = store.get(s.key)
            assert int(rec["loss_mask"].sum()) > 0
            seen.append((ctrl.epoch, s.sample_id))
        epochs_ended += ctrl.mark_trained(batches)
    assert all(isinstance(x, RawRecord) for x in given) and len(given) == 12
    for e in (0, 1):   # each epoch trains exactly the samples the up-front path keeps
        assert sorted(sid for ep, sid in seen if ep == e) == sorted(eager.sample_ids)
    assert ctrl.skipped_empty == 4 and ctrl.finished
    # every epoch end is reported: by mark_trained, or (an epoch whose last samples were skipped ones, after its
    # last set) still pending when the data ran out, where the runner's finish() saves anyway
    assert epochs_ended + ctrl.epoch_ended == 2
    assert ctrl.store_bytes() == 0 and not ctrl.reserved
    ctrl.shutdown()
    store.close()


def test_byte_budget_counts_a_record_not_yet_tokenized_at_max_seq_length(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "a.jsonl", conversations(8))
    lazy = build(data, tiny_tokenizer, max_seq_length=200, defer_tokenization=True, cache_dir=tmp_path / "c")
    store = LocalStore(root=tmp_path / "store")
    engines = InlineEngines(TokenizingEngine(FakeEngine(store), lazy.record_tokenizer))
    engines.tokenizes = True
    ctrl = Controller(lazy, engines, store, micro_batch_size=1, num_epochs=1, max_sample_pool_size=8,
                      inference_batch_size=8, inference_buffer_threshold=8, store_capacity=3 * 200,
                      record_bytes=lambda n: n)   # one byte a token: room for three records of max_seq_length
    ctrl._feed()
    assert sum(ctrl.in_flight) == 3 and ctrl.in_flight_bytes == 600   # reserved at 200 tokens each
    ctrl._collect(timeout=1.0)
    lengths = [s.length for s in ctrl.pool]
    assert len(lengths) == 3 and max(lengths) < 200
    assert ctrl.in_flight_bytes == 0 and ctrl.pool_bytes == sum(lengths)   # the true lengths once known
    ctrl.shutdown()
    store.close()


def test_eval_samples_given_tokenized_pass_through(tmp_path, tiny_tokenizer):
    data = write_jsonl(tmp_path / "a.jsonl", conversations(3))
    lazy = build(data, tiny_tokenizer, defer_tokenization=True, cache_dir=tmp_path / "c")
    store = LocalStore(root=tmp_path / "store")
    eng = TokenizingEngine(FakeEngine(store), lazy.record_tokenizer)
    s = lazy[0]
    empty = type(s)(s.sample_id, s.input_ids, torch.zeros_like(s.loss_mask))
    stored = eng.generate([empty, *lazy.raw([1, 2])])
    assert [x.key for x in stored] == [s.sample_id] + list(lazy.sample_ids[1:3])   # not skipped: given as tokens
    assert torch.equal(store.get(lazy.sample_ids[1])["input_ids"], lazy[1].input_ids)
    store.close()
