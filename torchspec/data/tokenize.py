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
from dataclasses import dataclass, field

import numpy as np
import torch

from torchspec.config.schema import BAD_RECORDS_NAMED
from torchspec.data.errors import BadRecords, DataError
from torchspec.data.formats import Conversation
from torchspec.data.sample import Sample, SampleTable
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


def _init_worker(tokenizer, template, opts):
    global _WORKER
    _WORKER = (Encoder(tokenizer), template, opts)


def render_all(template: ChatTemplate, convs: list[Conversation], opts: TokenizeOptions, bad: BadRecords):
    """(conversations rendered, their renderings); one the template cannot render goes to `bad`."""
    kept, rendered = [], []
    for c in convs:
        try:
            rendered.append(render(template, c, opts.last_turn_loss_only))
        except DataError as e:
            bad.handle(e)
            continue
        kept.append(c)
    return kept, rendered


def _process_chunk(chunk: list[Conversation]):
    encoder, template, opts = _WORKER
    bad = BadRecords(opts.on_bad_record)
    stats = Stats(conversations=len(chunk))
    chunk, rendered = render_all(template, chunk, opts, bad)
    stats.add_bad(bad)
    encoded = encoder.encode(rendered)
    ids_out, mask_out, lengths, kept_ids = [], [], [], []
    for conv, (ids, mask) in zip(chunk, encoded):
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
        kept_ids.append(conv.sample_id)
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt))
    return cat(ids_out, np.int32), cat(mask_out, np.uint8), np.asarray(lengths, np.int64), kept_ids, stats


def tokenize_conversations(convs: list[Conversation], tokenizer, template: ChatTemplate, opts: TokenizeOptions,
                           num_proc: int = 1, chunk_size: int = 512, progress: bool = True
                           ) -> tuple[SampleTable, Stats]:
    """Tokenize every conversation (in `num_proc` worker processes) into a SampleTable, keeping order."""
    t0 = time.perf_counter()
    chunks = [convs[i:i + chunk_size] for i in range(0, len(convs), chunk_size)]
    num_proc = max(1, min(num_proc, len(chunks)))
    from tqdm.auto import tqdm

    bar = tqdm(total=len(convs), desc="tokenizing", unit="conv", disable=not progress, leave=False)
    results = []
    try:
        if num_proc == 1:
            _init_worker(tokenizer, template, opts)
            for c in chunks:
                results.append(_process_chunk(c))
                bar.update(len(c))
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            # One worker per core: keep each worker's tokenizer single-threaded.
            old = os.environ.get("TOKENIZERS_PARALLELISM")
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            try:
                with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer, template, opts)) as pool:
                    for r, c in zip(pool.imap(_process_chunk, chunks), chunks):
                        results.append(r)
                        bar.update(len(c))
            finally:
                if old is None:
                    os.environ.pop("TOKENIZERS_PARALLELISM", None)
                else:
                    os.environ["TOKENIZERS_PARALLELISM"] = old
    finally:
        bar.close()
        globals()["_WORKER"] = None
    stats, sample_ids, lengths = Stats(), [], []
    for _, _, ln, ids, st in results:
        stats.add(st)
        sample_ids += ids
        lengths.append(ln)
    offsets = np.zeros(len(sample_ids) + 1, np.int64)
    if sample_ids:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    table = SampleTable(torch.from_numpy(np.concatenate([r[0] for r in results]) if results else np.zeros(0, np.int32)),
                        torch.from_numpy(np.concatenate([r[1] for r in results]) if results else np.zeros(0, np.uint8)),
                        torch.from_numpy(offsets), sample_ids)
    stats.seconds = time.perf_counter() - t0
    return table, stats
