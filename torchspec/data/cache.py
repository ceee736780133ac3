"""The tokenization cache: one folder per (files' content, tokenizer, template, max length, options).

`cache_dir/samples-<key>/` holds a SampleTable as raw little-endian arrays, written piece by piece
while the workers tokenize and memory-mapped when read (nothing is copied into RAM):
  input_ids.i32, loss_mask.u8   every sample's tokens, one after another
  offsets.i64                   sample i is tokens [offsets[i], offsets[i+1])
  file.i32, record.i64          sample i's id: <prefixes[file[i]]>-<record[i]>
  token_counts.npy              how often each token id is supervised (the draft vocabulary's input)
  images.json                   {sample id: [image reference, ...]} of the samples that have images
  table.json                    format, counts, id prefixes, Stats; written last: its presence marks
                                a complete cache
The draft vocabulary computed from those samples is saved beside it (vocab.py). Any change to an
input of the key gives a new folder, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import shutil
import tempfile

import numpy as np
import torch

from torchspec.data.sample import SampleIds, SampleTable
from torchspec.data.tokenize import Chunk, Stats

CACHE_FORMAT = 3   # 3: images.json (a format-2 folder has no images and is rebuilt)
_ARRAYS = {"input_ids": np.int32, "loss_mask": np.uint8, "offsets": np.int64, "file": np.int32, "record": np.int64}
_SUFFIX = {np.int32: "i32", np.uint8: "u8", np.int64: "i64"}


def tokenizer_identity(tokenizer) -> str:
    """A digest of everything about the tokenizer that changes token ids or rendering."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(type(tokenizer).__name__.encode())
    template = getattr(tokenizer, "chat_template", None)
    h.update(json.dumps(template, sort_keys=True).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(file_digests: list[str], tokenizer_id: str, template_id: str, max_seq_length: int,
              options: dict) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, "files": file_digests, "tokenizer": tokenizer_id,
                       "template": template_id, "max_seq_length": max_seq_length, "options": options},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_folder(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"samples-{key}"


def _name(key: str) -> str:
    return f"{key}.{_SUFFIX[_ARRAYS[key]]}"


class TableWriter:
    """Appends tokenized Chunks to raw array files as they come (O(1) memory here), then `finish` moves
    them into `folder` (None: a private temporary folder, removed once the arrays are mapped)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp" if folder else "torchspec-samples-",
                                         dir=folder.parent if folder else None))
        self.fh = {k: open(self.tmp / _name(k), "wb") for k in _ARRAYS}
        self.fh["offsets"].write(np.zeros(1, np.int64).tobytes())
        self.n = self.tokens = 0
        self.images: dict[str, tuple[str, ...]] = {}

    def append(self, chunk: Chunk) -> None:
        ends = self.tokens + np.cumsum(chunk.lengths)
        for key, arr in (("input_ids", chunk.ids), ("loss_mask", chunk.mask), ("offsets", ends),
                         ("file", np.full(len(chunk.lengths), chunk.file, np.int32)), ("record", chunk.records)):
            self.fh[key].write(np.ascontiguousarray(arr, dtype=_ARRAYS[key]).tobytes())
        self.n += len(chunk.lengths)
        self.tokens += int(chunk.lengths.sum())
        self.images.update(chunk.images)

    def finish(self, prefixes: list[str], stats: Stats, counts: np.ndarray, meta: dict | None
               ) -> SampleTable:
        for fh in self.fh.values():
            fh.close()
        np.save(self.tmp / "token_counts.npy", counts)
        (self.tmp / "images.json").write_text(json.dumps(self.images, ensure_ascii=False))
        (self.tmp / "table.json").write_text(json.dumps({"format": CACHE_FORMAT, "n": self.n, "tokens": self.tokens,
                                                          "prefixes": prefixes, "stats": asdict(stats)}))
        if self.folder is None:
            try:
                return _map(self.tmp)   # mapped pages stay readable after the files are unlinked
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        for f in [*(_name(k) for k in _ARRAYS), "token_counts.npy", "images.json", "table.json"]:   # table.json last
            os.replace(self.tmp / f, self.folder / f)
        shutil.rmtree(self.tmp, ignore_errors=True)
        if meta is not None:
            (self.folder / "meta.json").write_text(json.dumps({**meta, "stats": asdict(stats)}, indent=2,
                                                              default=str))
        return _map(self.folder)

    def abort(self) -> None:
        for fh in self.fh.values():
            fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _map(folder: Path) -> SampleTable:
    info = json.loads((folder / "table.json").read_text())
    n, tokens = info["n"], info["tokens"]

    def arr(key, count):
        if count == 0:   # numpy cannot map an empty file
            return np.zeros(0, _ARRAYS[key])
        return np.memmap(folder / _name(key), dtype=_ARRAYS[key], mode="c", shape=(count,))

    table = SampleTable(torch.from_numpy(arr("input_ids", tokens)), torch.from_numpy(arr("loss_mask", tokens)),
                        torch.from_numpy(arr("offsets", n + 1)),
                        SampleIds(info["prefixes"], arr("file", n), arr("record", n)),
                        {sid: tuple(refs) for sid, refs in json.loads((folder / "images.json").read_text()).items()})
    table.token_counts = np.load(folder / "token_counts.npy")
    table.stats = Stats(**info["stats"])
    return table


def load(folder: Path) -> SampleTable | None:
    """The cached table of `folder`, memory-mapped (None when there is no complete cache of this format)."""
    path = folder / "table.json"
    if not path.is_file():
        return None
    try:
        if json.loads(path.read_text()).get("format") != CACHE_FORMAT:
            return None
    except json.JSONDecodeError:
        return None
    return _map(folder)
