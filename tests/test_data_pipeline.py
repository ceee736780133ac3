"""build_dataset end to end: formats load to identical samples, parallel == serial, cache hit/miss."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from torchspec.data import build_dataset, from_config, vocab_map_for
from torchspec.data import dataset as dataset_mod
from torchspec.data.formats import load_conversations, resolve_files
from torchspec.data.templates import get_template
from torchspec.data.tokenize import TokenizeOptions, tokenize_conversations

TOPICS = ["len", "sorted", "zip", "map", "enumerate", "range", "dict.get", "set.add"]


def conversations(n=24):
    """ShareGPT-style records; every third has a system prompt, every fourth a second turn."""
    out = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        turns = ([{"from": "system", "value": "Answer in one line."}] if i % 3 == 0 else []) + [
            {"from": "human", "value": f"What does {t} do? (case {i})"},
            {"from": "gpt", "value": f"def use_{i}(x):\n    return {t}(x)  # {i}"}]
        if i % 4 == 0:
            turns += [{"from": "human", "value": "Shorter?"}, {"from": "gpt", "value": f"{t}(x)"}]
        out.append({"id": i, "conversations": turns})
    return out


def to_openai(rec):
    roles = {"system": "system", "human": "user", "gpt": "assistant"}
    return {"messages": [{"role": roles[m["from"]], "content": m["value"]} for m in rec["conversations"]]}


def write_jsonl(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def build(paths, tok, **kw):
    args = dict(chat_template="qwen", max_seq_length=4096, prompt_key="conversations", progress=False)
    args.update(kw)
    return build_dataset(paths, tok, **args)


def as_lists(samples):
    return [(s.input_ids.tolist(), s.loss_mask.tolist()) for s in samples]


def test_all_formats_load_to_identical_samples(tmp_path, tiny_tokenizer):
    recs = conversations()
    oa = [to_openai(r) for r in recs]
    ref = build(write_jsonl(tmp_path / "a.jsonl", recs), tiny_tokenizer)
    assert len(ref) == len(recs) and ref.stats.dropped_no_supervised == 0
    (tmp_path / "list.json").write_text(json.dumps(recs, indent=1))
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "sg.parquet")
    pq.write_table(pa.Table.from_pylist(oa), tmp_path / "oa.parquet")
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(parts / "p0.jsonl", recs[:10])
    write_jsonl(parts / "p1.jsonl", recs[10:])
    variants = {
        "json list": build(tmp_path / "list.json", tiny_tokenizer),
        "parquet sharegpt": build(tmp_path / "sg.parquet", tiny_tokenizer),
        "openai jsonl": build(write_jsonl(tmp_path / "oa.jsonl", oa), tiny_tokenizer, prompt_key="messages"),
        "openai parquet": build(tmp_path / "oa.parquet", tiny_tokenizer, prompt_key="messages"),
        "glob": build(str(parts / "p*.jsonl"), tiny_tokenizer),
        "folder": build(parts, tiny_tokenizer),
        "list of files": build([parts / "p0.jsonl", parts / "p1.jsonl"], tiny_tokenizer),
    }
    want = as_lists(ref)
    for name, got in variants.items():
        assert as_lists(got) == want, name
    # Sample ids: stable across runs, one per record, distinct.
    again = build(tmp_path / "a.jsonl", tiny_tokenizer)
    assert again.sample_ids == ref.sample_ids and len(set(ref.sample_ids)) == len(recs)
    assert variants["glob"].sample_ids == variants["folder"].sample_ids
    # Multi-turn records supervise both assistant turns.
    assert ref[0].loss_mask.sum() > ref[1].loss_mask.sum() > 0


def test_parallel_equals_serial(tmp_path, tiny_tokenizer):
    convs = load_conversations(resolve_files(write_jsonl(tmp_path / "a.jsonl", conversations(40))), "conversations")
    tpl, opts = get_template("qwen", tiny_tokenizer), TokenizeOptions(48)
    serial, s1 = tokenize_conversations(convs, tiny_tokenizer, tpl, opts, num_proc=1, chunk_size=7, progress=False)
    par, s2 = tokenize_conversations(convs, tiny_tokenizer, tpl, opts, num_proc=2, chunk_size=7, progress=False)
    assert as_lists(serial) == as_lists(par) and serial.sample_ids == par.sample_ids
    assert (s1.kept, s1.truncated, s1.dropped_no_supervised) == (s2.kept, s2.truncated, s2.dropped_no_supervised)
    assert s1.truncated > 0 and all(len(s) <= 48 for s in serial)


def test_drop_and_count_unsupervised(tmp_path, tiny_tokenizer, caplog):
    recs = conversations(6)
    recs.append({"conversations": [{"from": "human", "value": "no answer here"}]})
    recs.append({"conversations": [{"from": "human", "value": "x " * 200}, {"from": "gpt", "value": "late"}]})
    with caplog.at_level(logging.INFO, logger="torchspec.data"):
        ds = build(write_jsonl(tmp_path / "a.jsonl", recs), tiny_tokenizer, max_seq_length=160)
    assert len(ds) == 6 and ds.stats.dropped_no_supervised == 2 and ds.stats.truncated == 1
    assert "dropped 2 with no supervised token" in caplog.text


def test_cache_hit_and_invalidation(tmp_path, tiny_tokenizer, caplog, monkeypatch):
    data = write_jsonl(tmp_path / "a.jsonl", conversations(1500))
    cache = tmp_path / "cache"
    first = build(data, tiny_tokenizer, cache_dir=cache)

    calls = []   # tokenize_stream: the only way build tokenizes (a changed file below proves the spy sees it)
    real = dataset_mod.tokenize_stream
    monkeypatch.setattr(dataset_mod, "tokenize_stream", lambda *a, **k: calls.append(1) or real(*a, **k))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="torchspec.data"):
        second = build(data, tiny_tokenizer, cache_dir=cache)
    assert "cache hit" in caplog.text and calls == []   # nothing tokenized (a wall-clock warm < cold is noise)
    assert as_lists(second) == as_lists(first) and second.sample_ids == first.sample_ids
    assert second.cache_dir == first.cache_dir

    for change in ({"chat_template": "llama3"}, {"max_seq_length": 2048}, {"last_turn_loss_only": True}):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="torchspec.data"):
            other = build(data, tiny_tokenizer, cache_dir=cache, **change)
        assert "cache miss" in caplog.text and other.cache_dir != first.cache_dir, change
    n = len(calls)
    data.write_text(data.read_text() + json.dumps(conversations(1)[0]) + "\n")  # the file's content changes
    assert len(build(data, tiny_tokenizer, cache_dir=cache)) == 1501 and len(calls) == n + 1


def test_defer_tokenization_is_lazy_and_equal(tmp_path, tiny_tokenizer, monkeypatch):
    data = write_jsonl(tmp_path / "a.jsonl", conversations(12))
    eager = build(data, tiny_tokenizer)
    monkeypatch.setattr(dataset_mod, "tokenize_stream", lambda *a, **k: pytest.fail("tokenized up front"))
    lazy = build(data, tiny_tokenizer, defer_tokenization=True, cache_dir=tmp_path / "c")
    assert len(lazy) == 12 and as_lists(lazy) == as_lists(eager)
    assert [s.sample_id for s in lazy] == eager.sample_ids
    assert lazy[3].input_ids.dtype == torch.long
    import pickle

    assert as_lists(pickle.loads(pickle.dumps(lazy))) == as_lists(eager)  # can be handed to a worker


def test_from_config_and_vocab_map_beside_cache(tmp_path, tiny_tokenizer):
    from torchspec.config.schema import Config

    data = write_jsonl(tmp_path / "a.jsonl", conversations(10))
    cfg = Config()
    cfg.dataset.train_data_path = str(data)
    cfg.dataset.num_proc = 1
    cfg.cache_dir = str(tmp_path / "cache")
    cfg.training.max_seq_length = 256
    ds = from_config(cfg, tokenizer=tiny_tokenizer, progress=False)
    assert as_lists(ds) == as_lists(build(data, tiny_tokenizer, max_seq_length=256))
    assert from_config(cfg, tokenizer=tiny_tokenizer, split="eval") is None
    d2t, t2d = vocab_map_for(ds, len(tiny_tokenizer), 32)
    saved = torch.load(ds.cache_dir / "vocab_map.pt")
    assert torch.equal(saved["d2t"], d2t) and torch.equal(saved["t2d"], t2d)
    assert d2t.shape == (32,) and int(t2d.sum()) == 32


def test_example_data_files(tiny_tokenizer):
    sg = build("examples/data/python_chat_sharegpt.jsonl", tiny_tokenizer)
    oa = build("examples/data/python_chat_openai.jsonl", tiny_tokenizer, prompt_key="messages")
    assert len(sg) >= 50 and as_lists(sg) == as_lists(oa)
