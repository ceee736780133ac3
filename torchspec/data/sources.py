"""Conversation files cut into pieces of a few hundred records, streamed to worker processes.

The driver never holds the dataset: `plan_pieces` walks the files once and yields small
descriptors (a JSONL byte range with the line number and record index it starts at), and each
worker parses, checks and renders its own piece (`piece_conversations`). A `.json` list is parsed
whole (the format allows nothing else) and a parquet file is read a batch at a time; their records
travel with the piece. Record numbering, line numbers and sample ids are exactly those of
formats.load_conversations: a blank JSONL line is no record, a bad record still uses up its index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from torchspec.data.errors import BadRecords, DataError, where
from torchspec.data.formats import (SKIPPED, Conversation, _decode, _iter_json_list, _iter_parquet, _loads,
                                    normalize_messages, parse_line)

PIECE_RECORDS = 512   # records per piece: one worker task, one write to the cache


@dataclass
class Piece:
    """Records of one file, given to one worker.

    JSONL: bytes [start, stop) of the file, beginning at line `first_line` and record `first_record`.
    Other formats: `records`, a list of (location, record or SKIPPED), from record `first_record`.
    """

    file: int             # index into the build's file list
    path: str
    prefix: str           # the file's sample-id prefix
    first_record: int
    start: int = 0
    stop: int = 0
    first_line: int = 1
    records: list | None = None
    count: int = 0        # records in the piece


def id_prefixes(digests: Sequence[str]) -> list[str]:
    """The sample-id prefix of every file (two byte-identical files are numbered apart)."""
    counts: dict[str, int] = {}
    out = []
    for d in digests:
        counts[d] = counts.get(d, 0) + 1
        out.append(d[:12] if counts[d] == 1 else f"{d[:12]}.{counts[d]}")
    return out


def is_jsonl(path: Path) -> bool:
    """True for the files read line by line (everything but parquet and a .json holding a list)."""
    if path.suffix == ".parquet":
        return False
    if path.suffix == ".json":
        with open(path, encoding="utf-8", errors="replace") as fh:
            return not fh.read(4096).lstrip().startswith("[")
    return True


def plan_pieces(files: Sequence[Path], prefixes: Sequence[str], piece_records: int = PIECE_RECORDS
                ) -> Iterator[Piece]:
    """Every file's records as pieces, in file and record order (a generator: the driver holds one piece)."""
    for i, f in enumerate(files):
        n = 0
        if is_jsonl(f):
            for piece in _jsonl_pieces(i, f, prefixes[i], piece_records):
                n += piece.count
                yield piece
        else:
            rows = _iter_parquet(f) if f.suffix == ".parquet" else _iter_json_list(f)
            batch: list = []
            for rec in rows:
                batch.append(rec)
                if len(batch) == piece_records:
                    yield Piece(i, str(f), prefixes[i], n, records=batch, count=len(batch))
                    n, batch = n + len(batch), []
            if batch:
                yield Piece(i, str(f), prefixes[i], n, records=batch, count=len(batch))
                n += len(batch)
        if n == 0:
            raise DataError(f"{f}: the file is empty (no records)")


def _jsonl_pieces(i: int, f: Path, prefix: str, piece_records: int) -> Iterator[Piece]:
    pos = start = 0
    line = first_line = 1
    records = first_record = 0
    with open(f, "rb") as fh:
        for raw in fh:
            if raw.strip():
                if records - first_record == piece_records:
                    yield Piece(i, str(f), prefix, first_record, start, pos, first_line, count=piece_records)
                    start, first_line, first_record = pos, line, records
                records += 1
            pos += len(raw)
            line += 1
    if records > first_record:
        yield Piece(i, str(f), prefix, first_record, start, pos, first_line, count=records - first_record)


def piece_rows(piece: Piece, bad: BadRecords) -> Iterator[tuple[int, int, str, object, int, int]]:
    """(record index, line, location, record or SKIPPED, byte offset, byte length) of every record of
    `piece` (line, offset and length: the JSONL line's; 0, 0, 0 for the other formats)."""
    if piece.records is not None:
        for k, (loc, rec) in enumerate(piece.records):
            yield piece.first_record + k, 0, loc, rec, 0, 0
        return
    path = Path(piece.path)
    with open(path, "rb") as fh:
        fh.seek(piece.start)
        data = fh.read(piece.stop - piece.start)
    pos, line, rec_idx = 0, piece.first_line, piece.first_record
    for raw in data.split(b"\n"):   # lines as binary file iteration cuts them: at b"\n" only
        if raw.strip():
            loc, rec = parse_line(raw, path, line, bad)
            yield rec_idx, line, loc, rec, piece.start + pos, len(raw)
            rec_idx += 1
        pos += len(raw) + 1
        line += 1


def piece_conversations(piece: Piece, prompt_key: str, bad: BadRecords
                        ) -> Iterator[tuple[Conversation, int, int, int, int]]:
    """(conversation, record index, line, byte offset, byte length) of every good record of `piece` (relative
    image paths are relative to the piece's file's folder, as formats.load_conversations reads them)."""
    base_dir = Path(piece.path).parent
    for rec_idx, line, loc, rec, off, length in piece_rows(piece, bad):
        if rec is SKIPPED:
            continue
        try:
            conv = Conversation(f"{piece.prefix}-{rec_idx}", normalize_messages(rec, prompt_key, loc, base_dir), loc)
        except DataError as e:
            bad.handle(e)
            continue
        yield conv, rec_idx, line, off, length


def read_raw(path: str, offset: int, length: int, handles: dict) -> bytes:
    """Bytes [offset, offset + length) of `path` (a deferred sample's record, not parsed); `handles` keeps the
    files open between calls."""
    fh = handles.get(path)
    if fh is None:
        fh = handles[path] = open(path, "rb")
    fh.seek(offset)
    return fh.read(length)


def parse_record(raw: bytes, path: str, line: int, sample_id: str, prompt_key: str | None) -> Conversation:
    """The conversation of one record's bytes (read_raw): a JSONL line of the source file `path` (`prompt_key`;
    relative image paths against its folder), or with prompt_key None a line of a spill file (spill_line)."""
    if prompt_key is None:
        d = json.loads(raw)
        return Conversation(sample_id, d["messages"], d["location"])
    p = Path(path)
    loc = where(p, line)
    return Conversation(sample_id, normalize_messages(_loads(_decode(raw, p, line), loc), prompt_key, loc, p.parent),
                        loc)


def read_record(path: str, offset: int, length: int, line: int, sample_id: str, prompt_key: str | None,
                handles: dict) -> Conversation:
    """The conversation at bytes [offset, offset + length) of `path` (a deferred sample): a JSONL line of
    the source file (`prompt_key`), or with prompt_key None a line of a spill file (spill_line)."""
    return parse_record(read_raw(path, offset, length, handles), path, line, sample_id, prompt_key)


def spill_line(conv: Conversation) -> bytes:
    """A checked conversation as one JSONL line: the deferred samples of .json lists and parquet files are
    read back from a spill file of these."""
    return (json.dumps({"messages": conv.messages, "location": conv.location}, ensure_ascii=False,
                       default=str) + "\n").encode()
