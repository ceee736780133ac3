"""The dataset is never held whole: memory-mapped cache, worker vocab counts, deferred samples as index rows,
and peak RSS that does not grow with the dataset (measured in fresh processes by benchmarks/data_probe.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchspec.data import build_dataset, token_frequencies, vocab_map_for
from torchspec.data import dataset as dataset_mod

ROOT = Path(__file__).resolve().parents[1]


def small_conversations(path, n):
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"conversations": [{"from": "human", "value": f"What is {i} plus {i % 7}?"},
                                                   {"from": "gpt", "value": f"It is {i + i % 7}."}]}) + "\n")
    return path


def build(path, tok, **kw):
    return build_dataset(path, tok, chat_template="qwen", max_seq_length=4096, prompt_key="conversations",
                         progress=False, **kw)


def test_cache_is_memory_mapped_and_counts_come_from_the_workers(tmp_path, tiny_tokenizer):
    data = small_conversations(tmp_path / "d.jsonl", 1200)
    first = build(data, tiny_tokenizer, cache_dir=tmp_path / "c", num_proc=2)
    again = build(data, tiny_tokenizer, cache_dir=tmp_path / "c", num_proc=2)
    maps = Path("/proc/self/maps").read_text()
    assert str(again.cache_dir / "input_ids.i32") in maps and str(again.cache_dir / "loss_mask.u8") in maps
    # The workers' summed counts are what counting the table gives.
    table_counts = torch.bincount(again.input_ids[again.loss_mask.bool()].long(), minlength=len(tiny_tokenizer))
    assert torch.equal(token_frequencies(again, len(tiny_tokenizer)), table_counts)
    assert torch.equal(token_frequencies(first, len(tiny_tokenizer)), table_counts)
    assert list(again.sample_ids) == [f"{again.sample_ids.prefixes[0]}-{i}" for i in range(1200)]


def test_deferred_vocab_counts_a_spread_sample(tmp_path, tiny_tokenizer, monkeypatch):
    data = small_conversations(tmp_path / "d.jsonl", 300)
    eager = build(data, tiny_tokenizer)
    lazy = build(data, tiny_tokenizer, defer_tokenization=True, num_proc=2)
    # No larger than the sample: the draft vocabulary is exactly the eager one.
    assert all(torch.equal(a, b) for a, b in zip(vocab_map_for(lazy, len(tiny_tokenizer), 40),
                                                 vocab_map_for(eager, len(tiny_tokenizer), 40)))
    monkeypatch.setattr(dataset_mod, "DEFER_VOCAB_SAMPLE", 30)
    seen = []
    real = dataset_mod._process_refs
    monkeypatch.setattr(dataset_mod, "_process_refs", lambda refs: seen.extend(r[4] for r in refs) or real(refs))
    lazy = build(data, tiny_tokenizer, defer_tokenization=True, num_proc=1)
    counts = lazy.token_counts()
    assert len(seen) == 30 and seen[0] == lazy.sample_ids[0] and seen[-1] == lazy.sample_ids[299]
    want = sum(np.bincount(s.input_ids[s.loss_mask.bool()].numpy(), minlength=len(counts))
               for s in lazy.take([lazy.sample_ids.index(i) for i in seen]))
    assert np.array_equal(counts, want)


def test_deferred_samples_are_index_rows_read_from_disk(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [json.loads(line) for line in small_conversations(tmp_path / "d.jsonl", 50).read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "d.parquet", row_group_size=7)
    eager = build([tmp_path / "d.jsonl", tmp_path / "d.parquet"], tiny_tokenizer)
    lazy = build([tmp_path / "d.jsonl", tmp_path / "d.parquet"], tiny_tokenizer, defer_tokenization=True,
                 cache_dir=tmp_path / "c", num_proc=2)
    assert not any(isinstance(v, list) and len(v) >= 50 for v in vars(lazy).values())   # no per-sample objects
    assert lazy.rows.shape == (100, 6) and list(lazy.sample_ids) == list(eager.sample_ids)
    got = lazy.take(range(100))
    assert [(s.input_ids.tolist(), s.loss_mask.tolist()) for s in got] == \
        [(s.input_ids.tolist(), s.loss_mask.tolist()) for s in eager]
    # A second build reads the index back instead of scanning the files again.
    again = build([tmp_path / "d.jsonl", tmp_path / "d.parquet"], tiny_tokenizer, defer_tokenization=True,
                  cache_dir=tmp_path / "c")
    assert str(again.cache_dir / "index.i64") in Path("/proc/self/maps").read_text()
    assert [s.input_ids.tolist() for s in again.take([99, 0])] == [eager[99].input_ids.tolist(),
                                                                   eager[0].input_ids.tolist()]


def _probe(tmp_path, tok_dir, data, defer):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data_probe.py"), str(data), str(tok_dir),
                          str(tmp_path / f"cache-{data.stem}-{defer}"), "--num-proc", "2"] + (["--defer"] * defer),
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("defer", [False, True])
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path, tiny_tokenizer, defer):
    """4k vs 40k conversations (scaled down from 100k vs 1M for a 2-core machine): the build's peak RSS above
    the process's start grows by at most a few integers per sample (128 B; holding the conversations as
    Python objects, as before, cost ~1.5 KB each), and the peaks are within 1.5x."""
    tok_dir = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok_dir))
    small, big = 4_000, 40_000
    a = _probe(tmp_path, tok_dir, small_conversations(tmp_path / "small.jsonl", small), defer)
    b = _probe(tmp_path, tok_dir, small_conversations(tmp_path / "big.jsonl", big), defer)
    assert (a["samples"], b["samples"]) == (small, big)
    grow_a, grow_b = a["peak_mib"] - a["base_mib"], b["peak_mib"] - b["base_mib"]
    allowed = 128 * (big - small) / 2**20 + 4
    assert grow_b - grow_a <= allowed, (a, b)
    assert b["worker_peak_mib"] - a["worker_peak_mib"] <= allowed, (a, b)
    assert b["peak_mib"] <= 1.5 * a["peak_mib"], (a, b)
