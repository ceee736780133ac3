"""The tokenization cache: one folder per (files' content, tokenizer, template, max length, options).

`cache_dir/samples-<key>/samples.pt` holds the flat token buffers of a SampleTable; the draft
vocabulary computed from those samples is saved beside it (vocab.py). Any change to an input of
the key gives a new folder, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from torchspec.data.sample import SampleTable
from torchspec.data.tokenize import Stats

CACHE_FORMAT = 1


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


def save(folder: Path, table: SampleTable, stats: Stats, meta: dict):
    """Write atomically: a crash mid-write never leaves a readable half cache."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"samples.pt.tmp{os.getpid()}"
    torch.save({"format": CACHE_FORMAT, "input_ids": table.input_ids, "loss_mask": table.loss_mask,
                "offsets": table.offsets, "sample_ids": table.sample_ids, "stats": asdict(stats),
                "images": table.images}, tmp)
    os.replace(tmp, folder / "samples.pt")
    (folder / "meta.json").write_text(json.dumps({**meta, "stats": asdict(stats)}, indent=2, default=str))


def load(folder: Path) -> tuple[SampleTable, Stats] | None:
    path = folder / "samples.pt"
    if not path.is_file():
        return None
    d = torch.load(path, weights_only=True)
    if d.get("format") != CACHE_FORMAT:
        return None
    return (SampleTable(d["input_ids"], d["loss_mask"], d["offsets"], d["sample_ids"], d.get("images")),
            Stats(**d["stats"]))
