"""The tokenization cache: one folder per (files' content, tokenizer, template, max length, options).

`cache_dir/samples-<key>/` holds a SampleTable as raw little-endian arrays, memory-mapped when read
(nothing is copied into RAM). Each worker writes its piece's tokens to files of its own in the build's
private folder (`store_piece`: a temporary name, then a rename, so a piece file is whole or absent) and
returns a few numbers per sample; the driver appends those files to the table's (a kernel copy, the tokens
never pass through this process) in piece order:
  input_ids.i32, loss_mask.u8   every sample's tokens, one after another
  offsets.i64                   sample i is tokens [offsets[i], offsets[i+1])
  file.i32, record.i64          sample i's id: <prefixes[file[i]]>-<record[i]>
  token_counts.npy              how often each token id is supervised (the draft vocabulary's input)
  images.json                   {sample id: [image reference, ...]} of the samples that have images
  table.json                    format, counts, id prefixes, Stats; written last: its presence marks
                                a complete cache
The draft vocabulary computed from those samples is saved beside it (vocab.py). Any change to an
input of the key gives a new folder, so a stale cache is never read. A build works in
`samples-<key>.tmp-<host>-<pid>-*/`, moved into place only when complete; an interrupted build removes
it, and one killed outright leaves it for the next build of this host, which removes it when its process
is gone. Nothing is resumed from such a folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, replace
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


_TOKEN_FILES = (("input_ids", "ids"), ("loss_mask", "mask"))   # (table array, Chunk field) of a piece's files


def store_piece(path: str, chunk: Chunk) -> Chunk:
    """Write `chunk`'s tokens to `path`.i32 / `path`.u8 (in a worker) and return it without them.

    Each file is written under a temporary name and renamed when complete, so a piece file is never seen
    half written; the driver checks its size against the chunk's token count before appending it."""
    for key, attr in _TOKEN_FILES:
        final = f"{path}.{_SUFFIX[_ARRAYS[key]]}"
        part = f"{final}.part"
        with open(part, "wb") as fh:
            fh.write(np.ascontiguousarray(getattr(chunk, attr), dtype=_ARRAYS[key]).data)
        os.replace(part, final)
    return replace(chunk, ids=None, mask=None, stored=path)


def _append_file(out, src: str, nbytes: int) -> None:
    """Append the file `src` (which must hold exactly `nbytes`) to the open file `out` and remove it."""
    out.flush()
    with open(src, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != nbytes:
            raise RuntimeError(f"piece file {src} holds {size} bytes, its worker reported {nbytes}")
        left = nbytes
        try:
            while left:
                done = os.copy_file_range(fh.fileno(), out.fileno(), left)
                if done == 0:
                    break
                left -= done
        except (AttributeError, OSError):   # no copy_file_range here: a buffered copy, 1 MiB at a time
            fh.seek(nbytes - left)
            out.seek(0, os.SEEK_END)
            shutil.copyfileobj(fh, out, 1 << 20)
            left = 0
    out.seek(0, os.SEEK_END)
    if left:
        raise RuntimeError(f"piece file {src}: {left} of {nbytes} bytes not copied")
    os.unlink(src)


def _tmp_prefix(folder: Path) -> str:
    return f"{folder.name}.tmp-{socket.gethostname()}-"


def _remove_stale_builds(folder: Path) -> None:
    """Remove the working folders of builds of `folder` on this host whose process is gone (killed outright)."""
    prefix = _tmp_prefix(folder)
    for old in folder.parent.glob(f"{prefix}*"):
        pid = old.name[len(prefix):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except PermissionError:   # alive, someone else's
            pass


class TableWriter:
    """Appends tokenized Chunks to raw array files as they come (O(1) memory here), then `finish` moves
    them into `folder` (None: a private temporary folder, removed once the arrays are mapped).

    `tmp` is the build's private working folder; workers write their pieces there (store_piece)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        if folder is not None:
            folder.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_builds(folder)
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(folder)}{os.getpid()}-" if folder
                                         else "torchspec-samples-", dir=folder.parent if folder else None))
        self.fh = {k: open(self.tmp / _name(k), "wb") for k in _ARRAYS}
        self.fh["offsets"].write(np.zeros(1, np.int64).tobytes())
        self.n = self.tokens = 0
        self.images: dict[str, tuple[str, ...]] = {}

    def append(self, chunk: Chunk) -> None:
        n_tokens = int(chunk.lengths.sum())
        for key, attr in _TOKEN_FILES:
            if chunk.stored is not None:
                dtype = _ARRAYS[key]
                _append_file(self.fh[key], f"{chunk.stored}.{_SUFFIX[dtype]}", n_tokens * np.dtype(dtype).itemsize)
            else:
                self.fh[key].write(np.ascontiguousarray(getattr(chunk, attr), dtype=_ARRAYS[key]).tobytes())
        ends = self.tokens + np.cumsum(chunk.lengths)
        for key, arr in (("offsets", ends), ("file", np.full(len(chunk.lengths), chunk.file, np.int32)),
                         ("record", chunk.records)):
            self.fh[key].write(np.ascontiguousarray(arr, dtype=_ARRAYS[key]).tobytes())
        self.n += len(chunk.lengths)
        self.tokens += n_tokens
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
