"""Rendered conversations -> token ids + assistant-only loss mask, in parallel worker processes.

A token is supervised when the character it starts at lies inside a supervised span of the
rendered text (see templates.py), so the ids are exactly what tokenizing the whole text gives.
Samples are truncated to max_seq_length tokens; a sample left with no supervised token is
dropped and counted. A conversation the template cannot render raises its DataError, or with
dataset.on_bad_record: skip is left out and counted in Stats (skipped_bad, bad_records).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from torchspec.config.schema import BAD_RECORDS_NAMED
from torchspec.data.errors import BadRecords, DataError
from torchspec.data.formats import Conversation
from torchspec.data.sample import Sample, SampleTable
from torchspec.data.sources import Piece, piece_conversations, read_record
from torchspec.data.templates import ChatTemplate

log = logging.getLogger("torchspec.data")


class Encoder:
    """Tokenizes rendered text and maps supervised character spans to a per-token mask."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            # A private copy: no truncation/padding state carried over from the caller's tokenizer.
            self.fast = Tokenizer.from_str(backend.to_str())
            self.fast.no_truncation()
            self.fast.no_padding()
        else:
            self.fast = None
            self.tokenizer = tokenizer

    def encode(self, rendered: list[tuple[str, list[tuple[int, int]]]]) -> list[tuple[np.ndarray, np.ndarray]]:
        if self.fast is None:
            return [self._encode_by_segments(text, spans) for text, spans in rendered]
        encs = self.fast.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        out = []
        for enc, (_, spans) in zip(encs, rendered):
            ids = np.asarray(enc.ids, dtype=np.int32)
            starts = np.asarray([o[0] for o in enc.offsets], dtype=np.int64)
            bounds = np.asarray([c for span in spans for c in span], dtype=np.int64)
            # Inside a span <=> an odd number of span boundaries lie at or before the token's start.
            mask = (np.searchsorted(bounds, starts, side="right") % 2 == 1).astype(np.uint8)
            out.append((ids, mask))
        return out

    def _encode_by_segments(self, text, spans):
        """Slow tokenizers have no offsets: encode the pieces between span boundaries one by one."""
        ids, mask, pos = [], [], 0
        for a, b in [*spans, (len(text), len(text))]:
            for piece, m in ((text[pos:a], 0), (text[a:b], 1)):
                if piece:
                    t = self.tokenizer.encode(piece, add_special_tokens=False)
                    ids += t
                    mask += [m] * len(t)
            pos = b
        return np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.uint8)


@dataclass
class TokenizeOptions:
    max_seq_length: int
    last_turn_loss_only: bool = False
    on_bad_record: str = "error"  # dataset.on_bad_record


@dataclass
class Stats:
    conversations: int = 0
    kept: int = 0
    dropped_no_supervised: int = 0
    truncated: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    seconds: float = 0.0
    skipped_bad: int = 0  # bad records left out (dataset.on_bad_record: skip), at loading or rendering
    bad_records: list[str] = field(default_factory=list)  # the first BAD_RECORDS_NAMED of them: "file line N: why"

    def add(self, other: "Stats"):
        for k in ("conversations", "kept", "dropped_no_supervised", "truncated", "tokens", "supervised_tokens",
                  "skipped_bad"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.bad_records = (self.bad_records + other.bad_records)[:BAD_RECORDS_NAMED]

    def add_bad(self, bad: BadRecords):
        self.add(Stats(skipped_bad=bad.count, bad_records=bad.named))

    def bad_summary(self) -> str:
        """The skipped records, named (empty when none was skipped)."""
        if not self.skipped_bad:
            return ""
        shown = len(self.bad_records)
        more = f" (the first {shown} named)" if shown < self.skipped_bad else ""
        return (f"skipped {self.skipped_bad} bad record(s) (dataset.on_bad_record: skip){more}: "
                + " | ".join(self.bad_records))

    def summary(self, max_seq_length: int) -> str:
        rate = f", {self.tokens / self.seconds:,.0f} tokens/s" if self.seconds > 0 else ""
        return (f"{self.conversations} conversations -> {self.kept} samples, {self.tokens} tokens "
                f"({self.supervised_tokens} supervised); dropped {self.dropped_no_supervised} with no "
                f"supervised token; truncated {self.truncated} to max_seq_length={max_seq_length}; "
                f"skipped {self.skipped_bad} bad record(s){rate}")


def render(template: ChatTemplate, conv: Conversation, last_turn_loss_only: bool):
    try:
        text, spans = template.render_conversation(conv.messages)
    except DataError as e:
        raise DataError(f"{conv.location}: {e}") from None
    return text, (spans[-1:] if last_turn_loss_only else spans)


def tokenize_many(convs: list[Conversation], encoder: Encoder, template: ChatTemplate,
                  opts: TokenizeOptions) -> list[Sample]:
    """Conversations -> Samples in one encoder call (a loss mask may be all zero; callers decide to drop it)."""
    encoded = encoder.encode([render(template, c, opts.last_turn_loss_only) for c in convs])
    n = opts.max_seq_length
    return [Sample(c.sample_id, torch.from_numpy(ids[:n].astype(np.int64)), torch.from_numpy(mask[:n].copy()),
                   images=c.images)
            for c, (ids, mask) in zip(convs, encoded)]


def tokenize_one(conv: Conversation, encoder: Encoder, template: ChatTemplate, opts: TokenizeOptions) -> Sample:
    return tokenize_many([conv], encoder, template, opts)[0]


# ---- worker side -------------------------------------------------------------------------------
_WORKER: tuple | None = None


def _init_worker(tokenizer, template, opts, prompt_key=None):
    global _WORKER
    _WORKER = (Encoder(tokenizer), template, opts, prompt_key)


def render_all(template: ChatTemplate, convs: list[Conversation], opts: TokenizeOptions, bad: BadRecords):
    """(indices of the conversations rendered, their renderings); one the template cannot render goes to `bad`."""
    kept, rendered = [], []
    for i, c in enumerate(convs):
        try:
            rendered.append(render(template, c, opts.last_turn_loss_only))
        except DataError as e:
            bad.handle(e)
            continue
        kept.append(i)
    return kept, rendered


@dataclass
class Chunk:
    """One worker task's samples: flat ids/mask, per-sample lengths and where each came from, the
    supervised-token counts (bincount by token id), the task's Stats and the image references of its
    samples that have images (sample id -> references; empty for text). A chunk whose worker wrote its
    tokens to piece files itself (cache.store_piece) carries ids/mask None and `stored`, those files' path
    without suffix: only these few numbers travel back to the driver."""
    ids: np.ndarray | None
    mask: np.ndarray | None
    lengths: np.ndarray
    records: np.ndarray           # record index of each sample in its file
    file: int                     # the file's index (-1 for a chunk of in-memory conversations)
    sample_ids: list | None       # for a chunk of in-memory conversations
    counts: np.ndarray
    stats: Stats
    images: dict = field(default_factory=dict)
    stored: str | None = None


def add_counts(total: np.ndarray | None, counts: np.ndarray) -> np.ndarray:
    """Sum of two bincounts of different lengths."""
    if total is None or len(counts) > len(total):
        total, counts = counts.astype(np.int64, copy=True), total if total is not None else np.zeros(0, np.int64)
    total[:len(counts)] += counts
    return total


def _tokenize_chunk(convs: list[Conversation], records: list[int], file: int, stats: Stats, bad: BadRecords,
                    keep_ids: bool = False) -> Chunk:
    encoder, template, opts, _ = _WORKER
    kept, rendered = render_all(template, convs, opts, bad)
    stats.add_bad(bad)
    encoded = encoder.encode(rendered)
    ids_out, mask_out, lengths, recs, sids, images = [], [], [], [], [], {}
    for k, (ids, mask) in zip(kept, encoded):
        if len(ids) > opts.max_seq_length:
            stats.truncated += 1
            ids, mask = ids[:opts.max_seq_length], mask[:opts.max_seq_length]
        n_sup = int(mask.sum())
        if n_sup == 0:
            stats.dropped_no_supervised += 1
            continue
        stats.kept += 1
        stats.tokens += len(ids)
        stats.supervised_tokens += n_sup
        ids_out.append(ids)
        mask_out.append(mask)
        lengths.append(len(ids))
        recs.append(records[k])
        sids.append(convs[k].sample_id)
        if convs[k].images:
            images[convs[k].sample_id] = convs[k].images
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    ids, mask = cat(ids_out, np.int32), cat(mask_out, np.uint8)
    counts = np.bincount(ids[mask.astype(bool)]).astype(np.int64)
    return Chunk(ids, mask, np.asarray(lengths, np.int64), np.asarray(recs, np.int64), file,
                 sids if keep_ids else None, counts, stats, images)


def _process_convs(chunk: list[Conversation]) -> Chunk:
    opts = _WORKER[2]
    return _tokenize_chunk(chunk, list(range(len(chunk))), -1, Stats(conversations=len(chunk)),
                           BadRecords(opts.on_bad_record), keep_ids=True)


def _process_piece(piece: Piece) -> Chunk:
    """Read, check, render and tokenize one piece of a file (in a worker)."""
    opts, prompt_key = _WORKER[2], _WORKER[3]
    bad = BadRecords(opts.on_bad_record)
    convs, records = [], []
    for conv, rec, *_ in piece_conversations(piece, prompt_key, bad):
        convs.append(conv)
        records.append(rec)
    stats = Stats(conversations=piece.count)
    return _tokenize_chunk(convs, records, piece.file, stats, bad)


def _process_refs(refs: list[tuple]) -> Chunk:
    """Supervised-token counts and Stats of the deferred samples named by (path, offset, length, line, sample id,
    prompt key) (in a worker): their tokens are not sent back."""
    handles: dict = {}
    try:
        convs = [read_record(*r, handles) for r in refs]
    finally:
        for fh in handles.values():
            fh.close()
    opts = _WORKER[2]
    chunk = _tokenize_chunk(convs, list(range(len(convs))), -1, Stats(conversations=len(convs)),
                            BadRecords(opts.on_bad_record))
    chunk.ids = chunk.mask = None
    return chunk


def parallel_map(fn, items: Iterable, num_proc: int, initargs: tuple) -> Iterator:
    """fn over `items` in `num_proc` worker processes, results in order, at most 2 tasks per worker in flight
    (so neither the items nor the results pile up in this process). num_proc 1 runs here."""
    if num_proc <= 1:
        _init_worker(*initargs)
        try:
            for it in items:
                yield fn(it)
        finally:
            globals()["_WORKER"] = None
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one worker per core: each tokenizer single-threaded
    try:
        with ctx.Pool(num_proc, initializer=_init_worker, initargs=initargs) as pool:
            pending: deque = deque()
            items = iter(items)
            while True:
                try:
                    item = next(items)
                except StopIteration:
                    break
                except DataError:   # found while planning (an empty file): what comes before it is raised first
                    while pending:
                        yield pending.popleft().get()
                    raise
                pending.append(pool.apply_async(fn, (item,)))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def tokenize_stream(fn, items: Iterable, tokenizer, template: ChatTemplate, opts: TokenizeOptions,
                    prompt_key: str | None, num_proc: int, sink, progress: bool = True,
                    total: int | None = None) -> tuple[Stats, np.ndarray]:
    """Every Chunk of fn over `items` (pieces, conversation lists, sample refs) handed to `sink` in order as it
    is done; returns the summed Stats and supervised-token counts."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    stats, counts = Stats(), np.zeros(0, np.int64)
    bar = tqdm(total=total, desc="tokenizing", unit="conv", disable=not progress, leave=False)
    try:
        for chunk in parallel_map(fn, items, num_proc, (tokenizer, template, opts, prompt_key)):
            sink(chunk)
            stats.add(chunk.stats)
            counts = add_counts(counts, chunk.counts)
            bar.update(chunk.stats.conversations)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - t0
    return stats, counts


def tokenize_conversations(convs: list[Conversation], tokenizer, template: ChatTemplate, opts: TokenizeOptions,
                           num_proc: int = 1, chunk_size: int = 512, progress: bool = True
                           ) -> tuple[SampleTable, Stats]:
    """Tokenize in-memory conversations (in `num_proc` worker processes) into a SampleTable, keeping order."""
    chunks: list[Chunk] = []
    items = (convs[i:i + chunk_size] for i in range(0, len(convs), chunk_size))
    stats, counts = tokenize_stream(_process_convs, items, tokenizer, template, opts, None,
                                    max(1, min(num_proc, -(-len(convs) // chunk_size))), chunks.append, progress,
                                    total=len(convs))
    offsets = np.zeros(stats.kept + 1, np.int64)
    if chunks:
        np.cumsum(np.concatenate([c.lengths for c in chunks]), out=offsets[1:])
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    table = SampleTable(torch.from_numpy(cat([c.ids for c in chunks], np.int32)),
                        torch.from_numpy(cat([c.mask for c in chunks], np.uint8)),
                        torch.from_numpy(offsets), [i for c in chunks for i in c.sample_ids],
                        {sid: refs for c in chunks for sid, refs in c.images.items()})
    table.token_counts = counts
    return table, stats
