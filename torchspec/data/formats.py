"""Reading conversation files: JSONL, JSON (a list of records) and parquet; a file, a folder or a glob.

Each record holds a list of messages under `prompt_key` (dataset.prompt_key), in either format:
  ShareGPT:  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}
  OpenAI:    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
Messages are normalised to OpenAI style: {"role": system|user|assistant|tool, "content": str}, plus
"reasoning_content", "tool_calls", "tool_call_id" and "name" when the record has them, and "images" when
the message has image parts (or, ShareGPT, the record an "images" list): see data/multimodal.py.

Every structural problem raises one DataError naming the file and line (JSONL), record (JSON list)
or row (parquet). With dataset.on_bad_record: skip (a BadRecords passed to load_conversations), a bad
record is left out and counted instead; a file that cannot be read as a whole (a .json list that is not
valid JSON, an unreadable parquet file) still stops the run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from torchspec.data import multimodal
from torchspec.data.errors import BadRecords, DataError, where

SUFFIXES = (".jsonl", ".json", ".parquet")

# Role names seen in the wild -> our four roles.
ROLE_ALIASES = {
    "system": "system", "developer": "system",
    "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "chatgpt": "assistant",
    "function_call": "assistant",
    "tool": "tool", "function": "tool", "observation": "tool", "ipython": "tool",
}
_EXTRA_FIELDS = ("reasoning_content", "tool_calls", "tool_call_id", "name")


@dataclass
class Conversation:
    sample_id: str
    messages: list[dict]
    location: str  # "file line N", for error messages raised later (e.g. by a template)

    @property
    def images(self) -> tuple[str, ...]:
        """The conversation's images in rendering order (checked references; see data/multimodal.py)."""
        return multimodal.conversation_images(self.messages)


def resolve_files(paths: str | os.PathLike | Sequence[str | os.PathLike],
                  config_key: str = "dataset.train_data_path") -> list[Path]:
    """Expand files, folders (searched recursively) and globs into a sorted, de-duplicated file list."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        p = os.path.expanduser(str(raw))
        if glob.has_magic(p):
            found = [Path(f) for f in sorted(glob.glob(p, recursive=True)) if Path(f).is_file()]
            if not found:
                raise DataError(f"{config_key}: the pattern {p!r} matches no file")
            files += found
        elif os.path.isdir(p):
            found = sorted(f for f in Path(p).rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise DataError(f"{config_key}: the folder {p!r} holds no {'/'.join(SUFFIXES)} file")
            files += found
        elif os.path.isfile(p):
            files.append(Path(p))
        else:
            raise DataError(f"{config_key}: no such file or folder: {p!r} "
                            "(expected a local .jsonl/.json/.parquet file, a folder of them or a glob)")
    unknown = [f for f in files if f.suffix not in SUFFIXES]
    if unknown:
        raise DataError(f"{config_key}: {unknown[0]} is not a {'/'.join(SUFFIXES)} file")
    seen, unique = set(), []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def file_digest(path: Path, chunk: int = 1 << 23) -> str:
    """Content identity of a file (blake2b of its bytes): the same bytes give the same digest anywhere."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# What iter_records yields in place of a JSONL line that is not a JSON value, when bad records are skipped.
SKIPPED = object()


def iter_records(path: Path, bad: BadRecords | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) for every record of one file, in file order.

    A JSONL line that cannot be decoded goes to `bad` (which raises, or counts it and then SKIPPED is
    yielded in its place, so record numbering does not depend on the policy).
    """
    if path.suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    with open(path, encoding="utf-8", errors="replace") as fh:   # a sniff; decoding is checked per line below
        head = fh.read(4096).lstrip()
    if path.suffix == ".json" and head.startswith("["):
        yield from _iter_json_list(path)
    else:
        yield from _iter_jsonl(path, bad or BadRecords())


def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    """UTF-8 text of `raw`, or a DataError naming the line and column of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{where(path, line)}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {col}); "
                        "re-encode the file as UTF-8") from None


def _loads(text: str, loc: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{loc}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{loc}: JSON nested too deeply to read") from None


def parse_line(raw: bytes, path: Path, line: int, bad: BadRecords):
    """(location, record) of one JSONL line; SKIPPED for a bad line that `bad` lets through (else it raises)."""
    loc = where(path, line)
    try:
        return loc, _loads(_decode(raw, path, line), loc)
    except DataError as e:
        bad.handle(e)
        return loc, SKIPPED


def _iter_jsonl(path: Path, bad: BadRecords):
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                yield parse_line(raw, path, lineno, bad)


def _iter_json_list(path: Path):
    text = _decode(path.read_bytes(), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where(path, e.lineno)}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    for i, rec in enumerate(data, start=1):
        yield where(path, i, "record"), rec


def _iter_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            row += 1
            yield where(path, row, "row"), rec


def normalize_messages(record, prompt_key: str, loc: str, base_dir: Path | None = None) -> list[dict]:
    """The record's messages in our normalised form (see the module docstring). Relative image paths are
    relative to `base_dir` (the data file's folder)."""
    if not isinstance(record, dict):
        raise DataError(f"{loc}: a record must be a JSON object, got {type(record).__name__}")
    msgs = record.get(prompt_key)
    if msgs is None:
        present = [k for k, v in record.items() if isinstance(v, list)]
        hint = f"; this record has {present[0]!r}: set dataset.prompt_key: {present[0]}" if present else ""
        raise DataError(f"{loc}: no {prompt_key!r} field (dataset.prompt_key){hint}; "
                        f"the record's fields are {sorted(record)}")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{loc}: {prompt_key!r} must be a non-empty list of messages")
    out = [_normalize_message(m, i, loc, base_dir) for i, m in enumerate(msgs, start=1)]
    multimodal.place_record_images(record, out, loc, base_dir)
    return out


def _normalize_message(m, i: int, loc: str, base_dir: Path | None = None) -> dict:
    if not isinstance(m, dict):
        raise DataError(f"{loc}: message {i} must be an object, got {type(m).__name__}")
    raw_role = m.get("role") if m.get("role") is not None else m.get("from")
    if raw_role is None:
        raise DataError(f"{loc}: message {i} has neither 'role' (OpenAI style) nor 'from' (ShareGPT style)")
    role = ROLE_ALIASES.get(str(raw_role).lower())
    if role is None:
        raise DataError(f"{loc}: message {i} has unknown role {raw_role!r}; "
                        f"known roles: {', '.join(sorted(ROLE_ALIASES))}")
    content = m.get("content") if m.get("content") is not None else m.get("value")
    images: list[str] = []
    out = {"role": role, "content": _text(content, i, loc, images, base_dir)}
    for k in _EXTRA_FIELDS:
        if m.get(k) is not None:
            out[k] = m[k]
    if images:
        out["images"] = images
        multimodal.check_image_role(out, i, loc)
    if content is None and role != "assistant" and "tool_calls" not in out:
        raise DataError(f"{loc}: message {i} ({raw_role}) has no 'content'/'value'")
    return out


def _text(content, i: int, loc: str, images: list | None = None, base_dir: Path | None = None) -> str:
    text = _raw_text(content, i, loc, [] if images is None else images, base_dir)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:   # JSON escapes can spell a lone UTF-16 surrogate ("\ud83d")
        raise DataError(f"{loc}: message {i} has an unpaired surrogate {text[e.start]!r} at character {e.start} "
                        "(a cut emoji?); no tokenizer can encode it") from None
    return text


def _raw_text(content, i: int, loc: str, images: list, base_dir: Path | None) -> str:
    """The message's text; each image part becomes multimodal.IMAGE_MARK and its checked reference is
    appended to `images`."""
    if content is None:
        return ""
    if isinstance(content, str):
        return _no_mark(content, i, loc)
    if isinstance(content, list):  # OpenAI content parts
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                texts.append(_no_mark(str(part.get("text", "")), i, loc))
            elif isinstance(part, str):
                texts.append(_no_mark(part, i, loc))
            elif (url := multimodal.image_part_url(part)) is not None or \
                    (isinstance(part, dict) and part.get("type") in ("image_url", "image")):
                images.append(multimodal.resolve_image(url, base_dir, loc, f"message {i}"))
                texts.append(multimodal.IMAGE_MARK)
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(f"{loc}: message {i} has a {kind!r} content part; "
                                "text and image_url parts are supported")
        return "".join(texts)
    raise DataError(f"{loc}: message {i} content must be a string or a list of text/image parts")


def _no_mark(text: str, i: int, loc: str) -> str:
    if multimodal.IMAGE_MARK in text:
        raise DataError(f"{loc}: message {i} contains the private-use character U+E000, which marks images "
                        "internally; remove it from the text")
    return text


def load_conversations(files: Sequence[Path], prompt_key: str, digests: Sequence[str] | None = None,
                       bad: BadRecords | None = None) -> list[Conversation]:
    """All conversations of `files`, in order, with stable ids `<file digest[:12]>-<record index>`.

    A bad record raises its DataError, or with a skipping `bad` is counted there and left out (its index
    is still used up, so the other records keep their ids).
    """
    digests = digests or [file_digest(f) for f in files]
    bad = bad or BadRecords()
    counts: dict[str, int] = {}
    out: list[Conversation] = []
    for f, digest in zip(files, digests):
        # Two byte-identical files would give the same ids; number the repeats apart.
        counts[digest] = counts.get(digest, 0) + 1
        prefix = digest[:12] if counts[digest] == 1 else f"{digest[:12]}.{counts[digest]}"
        n = 0
        for loc, rec in iter_records(f, bad):
            n += 1
            if rec is SKIPPED:
                continue
            try:
                out.append(Conversation(f"{prefix}-{n - 1}", normalize_messages(rec, prompt_key, loc, f.parent),
                                        loc))
            except DataError as e:
                bad.handle(e)
        if n == 0:
            raise DataError(f"{f}: the file is empty (no records)")
    return out
