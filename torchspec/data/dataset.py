"""build_dataset: conversation files -> samples (cached), and the draft vocabulary beside them."""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from torchspec.config.schema import DEFER_VOCAB_SAMPLE
from torchspec.data import cache
from torchspec.data import tokenize as tokenize_mod
from torchspec.data.errors import BadRecords, DataError
from torchspec.data.deferred import RawRecord, RecordTokenizer
from torchspec.data.formats import file_digest, resolve_files
from torchspec.data.sample import Sample, SampleIds, SampleTable
from torchspec.data.sources import (PIECE_RECORDS, Piece, id_prefixes, piece_conversations, plan_pieces, read_raw,
                                    spill_line)
from torchspec.data.templates import get_template
from torchspec.data.tokenize import (Stats, TokenizeOptions, _process_piece, _process_refs, parallel_map, render,
                                     tokenize_stream)
from torchspec.data.vocab import VOCAB_MAP_FILE, build_vocab_map

log = logging.getLogger("torchspec.data")


class LazySamples(Sequence):
    """defer_tokenization: conversations are found and checked up front, read and tokenized on access.

    Nothing of a conversation is held: each sample is a few integers (its file, record index, line and
    byte range; `sample_ids` names them from two of those arrays), and `take` reads the records from disk
    and tokenizes them in one encoder call. Records of .json lists and parquet files are read back from a
    spill file of checked conversations (JSONL, written while indexing, beside the cache).
    A sample whose loss mask ends up all zero is still returned by indexing (the caller skips it);
    iterating skips such samples.
    """

    def __init__(self, files: list[str], prefixes: list[str], rows: np.ndarray, spill: str | None, tokenizer,
                 template, opts: TokenizeOptions, prompt_key: str, cache_dir: Path | None, num_proc: int = 1):
        self.files, self.rows, self.spill = files, rows, spill   # rows: int64 [N, 6], columns ROW_COLUMNS
        self.tokenizer, self.template, self.opts, self.prompt_key = tokenizer, template, opts, prompt_key
        self.cache_dir, self.num_proc = cache_dir, num_proc
        self.sample_ids = SampleIds(prefixes, rows[:, 0], rows[:, 1])
        self.stats = None
        self.record_tokenizer = RecordTokenizer(tokenizer, template, opts)   # what an engine tokenizes `raw` with
        self._handles: dict = {}

    def __getstate__(self):  # open files are opened again in whichever process reads the samples
        return {**self.__dict__, "_handles": {}}

    def __len__(self):
        return len(self.sample_ids)

    def ref(self, i: int) -> tuple:
        """(path, byte offset, byte length, line, sample id, prompt key or None for the spill file) of sample i."""
        file, _, line, offset, length, spilled = self.rows[i].tolist()
        if spilled:
            return self.spill, offset, length, 0, self.sample_ids[i], None
        return self.files[file], offset, length, line, self.sample_ids[i], self.prompt_key

    def __getitem__(self, i) -> Sample:
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.take([i])[0]

    def raw(self, indices) -> list[RawRecord]:
        """The records at `indices` as bytes, neither parsed nor tokenized (what the controller hands to engines
        that tokenize: `record_tokenizer` turns them into the samples `take` gives)."""
        out = []
        for i in indices:
            path, offset, length, line, sid, prompt_key = self.ref(i)
            out.append(RawRecord(sid, read_raw(path, offset, length, self._handles), path, line, prompt_key))
        return out

    def take(self, indices) -> list[Sample]:
        """The samples at `indices`, read and tokenized together, here."""
        return self.record_tokenizer.samples(self.raw(indices))

    def __iter__(self):
        for i in range(len(self)):
            s = self[i]
            if int(s.loss_mask.sum()) > 0:
                yield s

    def token_counts(self) -> np.ndarray:
        """Supervised-token counts (by token id) of up to DEFER_VOCAB_SAMPLE conversations spread evenly over
        the dataset (all of them when it is no larger), tokenized in `num_proc` workers: the draft
        vocabulary's input without tokenizing the whole dataset up front."""
        n = len(self)
        pick = np.unique(np.linspace(0, n - 1, min(n, DEFER_VOCAB_SAMPLE)).round().astype(np.int64)) if n else []
        refs = [self.ref(int(i)) for i in pick]
        size = PIECE_RECORDS
        items = (refs[i:i + size] for i in range(0, len(refs), size))
        stats, counts = tokenize_stream(_process_refs, items, self.tokenizer, self.template, self.opts, None,
                                        max(1, min(self.num_proc, -(-len(refs) // size))), lambda c: None,
                                        progress=False)
        log.info("defer_tokenization: draft-vocabulary counts from %d of %d conversations (%d supervised tokens) "
                 "in %.1fs", len(refs), n, stats.supervised_tokens, stats.seconds)
        return counts


ROW_COLUMNS = ("file", "record", "line", "offset", "length", "spilled")   # a deferred sample's index row
INDEX_FORMAT = 1


def _index_piece(piece: Piece):
    """Find and check the records of one piece (in a worker): index rows (ROW_COLUMNS) of the good ones,
    their spill lines (for a piece that is not JSONL) and the bad records."""
    _, template, opts, prompt_key = tokenize_mod._WORKER
    bad = BadRecords(opts.on_bad_record)
    rows, spill = [], []
    inline = piece.records is not None
    for conv, rec, line, off, length in piece_conversations(piece, prompt_key, bad):
        if bad.skipping:   # rendered now, so that a conversation the template rejects is left out up front
            try:
                render(template, conv, opts.last_turn_loss_only)
            except DataError as e:
                bad.handle(e)
                continue
        if inline:
            spill.append(spill_line(conv))
            length = len(spill[-1])
        rows.append((piece.file, rec, line, off, length, int(inline)))
    return np.asarray(rows, np.int64).reshape(-1, len(ROW_COLUMNS)), b"".join(spill), bad.count, bad.named


def _tokenize_piece_into(folder: str, piece: Piece):
    """Tokenize one piece (in a worker) and write its tokens to piece files in the build's folder `folder`;
    what comes back to the driver is the piece's lengths, record indices, counts and Stats."""
    return cache.store_piece(os.path.join(folder, f"piece-{piece.file}-{piece.first_record}"),
                             _process_piece(piece))


def _build_index(files, prefixes, template, opts, prompt_key, num_proc, folder: Path, tokenizer):
    """Index every good record into folder/index.i64 (rows of ROW_COLUMNS, written as `num_proc` workers find
    them, so this process holds one piece at a time) and the spill file; then index.json, the mark of a
    complete index. Returns the Stats."""
    bad = BadRecords(opts.on_bad_record)
    tmp = folder / f"index.i64.tmp{os.getpid()}"
    spill_tmp = folder / f"spill.jsonl.tmp{os.getpid()}"
    spill_pos = n = 0
    try:
        with open(tmp, "wb") as out, open(spill_tmp, "wb") as spill_fh:
            for arr, spill, n_bad, named in parallel_map(_index_piece, plan_pieces(files, prefixes), num_proc,
                                                         (tokenizer, template, opts, prompt_key)):
                bad.count += n_bad
                bad.named = (bad.named + named)[:bad.limit]
                if spill:   # offsets into the spill file
                    arr[:, 3] = spill_pos + np.concatenate([[0], np.cumsum(arr[:-1, 4])])
                    spill_fh.write(spill)
                    spill_pos += len(spill)
                out.write(arr.tobytes())
                n += len(arr)
    except BaseException:
        tmp.unlink(missing_ok=True)
        spill_tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, folder / "index.i64")
    os.replace(spill_tmp, folder / "spill.jsonl")
    stats = Stats(conversations=n + bad.count)
    stats.add_bad(bad)
    (folder / "index.json").write_text(json.dumps({"format": INDEX_FORMAT, "n": n, "prefixes": prefixes,
                                                   "stats": asdict(stats)}))
    return stats


def _load_index(folder: Path):
    """(prefixes, rows memory-mapped, spill path, Stats) of a complete index in `folder`, else None."""
    path = folder / "index.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if info.get("format") != INDEX_FORMAT:
        return None
    n = info["n"]
    rows = (np.memmap(folder / "index.i64", dtype=np.int64, mode="c", shape=(n, len(ROW_COLUMNS))) if n
            else np.zeros((0, len(ROW_COLUMNS)), np.int64))
    return info["prefixes"], rows, str(folder / "spill.jsonl"), Stats(**info["stats"])


def build_dataset(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, *, chat_template: str | None,
                  max_seq_length: int, prompt_key: str, cache_dir: str | os.PathLike | None = None,
                  defer_tokenization: bool = False, last_turn_loss_only: bool = False,
                  num_proc: int | None = 1, progress: bool = True, on_bad_record: str = "error",
                  config_key: str = "dataset.train_data_path", empty_hint: str = "") -> SampleTable | LazySamples:
    """Samples of every conversation in `paths` (files, folders, globs), in file and record order.

    Returns a SampleTable (a sequence of Sample, memory-mapped from the cache) or, with defer_tokenization,
    a LazySamples. Both carry `.cache_dir`: the cache folder of this exact input (None without cache_dir),
    where the draft vocabulary is saved too. The files are cut into pieces that `num_proc` worker processes
    read, check and tokenize; this process holds a few integers per sample, never the conversations.
    Raises DataError naming the file and line for bad input; with on_bad_record="skip" a bad record is left
    out instead, counted in `.stats` (skipped_bad, bad_records) and named in the log. `empty_hint` ends the
    error raised when no conversation has a supervised token.
    """
    if max_seq_length <= 0:
        raise DataError(f"training.max_seq_length must be positive, got {max_seq_length}")
    files = resolve_files(paths, config_key)
    template = get_template(chat_template, tokenizer)
    digests = [file_digest(f) for f in files]
    prefixes = id_prefixes(digests)
    BadRecords(on_bad_record)   # an unknown policy is named before anything is read
    opts = TokenizeOptions(max_seq_length=max_seq_length, last_turn_loss_only=last_turn_loss_only,
                           on_bad_record=on_bad_record)
    num_proc = max(1, num_proc or os.cpu_count() or 1)
    folder = None
    if cache_dir is not None:
        options = {"prompt_key": prompt_key, "last_turn_loss_only": last_turn_loss_only,
                   "on_bad_record": on_bad_record}
        if defer_tokenization:   # its own folder: its draft vocabulary comes from a sample of the data
            options["defer_tokenization"] = True
        key = cache.cache_key(digests, cache.tokenizer_identity(tokenizer), template.identity(), max_seq_length,
                              options)
        folder = cache.cache_folder(cache_dir, key)
        if not defer_tokenization:
            t0 = time.perf_counter()
            table = cache.load(folder)
            if table is not None:
                table.cache_dir = folder
                log.info("cache hit: %d samples from %s in %.2fs", len(table), folder, time.perf_counter() - t0)
                _log_bad(config_key, table.stats)
                return table
            log.info("cache miss: tokenizing %d file(s) into %s", len(files), folder)

    if defer_tokenization:
        t0 = time.perf_counter()
        where_ = folder if folder is not None else Path(tempfile.mkdtemp(prefix="torchspec-index-"))
        hit = _load_index(where_) if folder is not None else None
        if hit is None:
            where_.mkdir(parents=True, exist_ok=True)
            try:
                _build_index(files, prefixes, template, opts, prompt_key, num_proc, where_, tokenizer)
            except BaseException:
                if folder is None:
                    shutil.rmtree(where_, ignore_errors=True)
                raise
            hit = _load_index(where_)
        prefixes, rows, spill, stats = hit
        _no_records_left(config_key, len(rows), _named_bad(stats))
        lazy = LazySamples([str(f) for f in files], prefixes, rows, spill, tokenizer, template, opts, prompt_key,
                           folder, num_proc)
        if folder is None:   # a private index: removed with the dataset
            weakref.finalize(lazy, shutil.rmtree, where_, True)
        lazy.stats = stats
        log.info("defer_tokenization: %d conversations from %d file(s) indexed in %.1fs, tokenized on access",
                 len(rows), len(files), time.perf_counter() - t0)
        _log_bad(config_key, lazy.stats)
        return lazy

    writer = cache.TableWriter(folder)
    try:
        stats, counts = tokenize_stream(functools.partial(_tokenize_piece_into, str(writer.tmp)),
                                        plan_pieces(files, prefixes), tokenizer, template, opts, prompt_key,
                                        num_proc, writer.append, progress)
    except BaseException:
        writer.abort()
        raise
    if stats.conversations == stats.skipped_bad:
        writer.abort()
        _no_records_left(config_key, 0, _named_bad(stats))
    log.info("%s: %s", config_key, stats.summary(max_seq_length))
    _log_bad(config_key, stats)
    if stats.kept == 0:
        writer.abort()
        raise DataError(f"{config_key}: none of the {stats.conversations} conversations has a supervised "
                        f"(assistant) token under chat_template={chat_template!r}{empty_hint}")
    meta = None if folder is None else {
        "files": [str(f) for f in files], "digests": digests, "chat_template": chat_template,
        "max_seq_length": max_seq_length, "prompt_key": prompt_key, "last_turn_loss_only": last_turn_loss_only,
        "on_bad_record": on_bad_record}
    table = writer.finish(prefixes, stats, counts, meta)
    table.cache_dir = folder
    return table


def _named_bad(stats: Stats) -> BadRecords:
    bad = BadRecords("skip")
    bad.count, bad.named = stats.skipped_bad, stats.bad_records
    return bad


def _no_records_left(config_key: str, n: int, bad: BadRecords):
    if not n and bad.count:
        raise DataError(f"{config_key}: every record is bad ({bad.count} skipped under dataset.on_bad_record: skip); "
                        f"the first: {bad.named[0]}")


def _log_bad(config_key: str, stats: Stats):
    if stats.skipped_bad:
        log.warning("%s: %s", config_key, stats.bad_summary())


# a training set of prompts alone (no assistant turn) without dataset.regenerate: what the refusal suggests
PROMPTS_ONLY_HINT = "; a file of prompts alone trains with dataset.regenerate: true (the target writes the replies)"


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(cfg.model.target_model_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise DataError(f"model.target_model_path: cannot load a tokenizer from "
                        f"{cfg.model.target_model_path!r} ({e})") from None


def from_config(cfg, tokenizer=None, split: str = "train", progress: bool = True):
    """build_dataset with the values of a resolved Config (`split`: "train" or "eval")."""
    ds = cfg.dataset
    paths = ds.train_data_path if split == "train" else ds.eval_data_path
    if paths is None:
        return None
    cache_dir = cfg.cache_dir or (os.path.join(cfg.output_dir, "cache") if cfg.output_dir else None)
    return build_dataset(paths, tokenizer if tokenizer is not None else load_tokenizer(cfg),
                         chat_template=ds.chat_template, max_seq_length=cfg.training.max_seq_length,
                         prompt_key=ds.prompt_key, cache_dir=cache_dir, defer_tokenization=ds.defer_tokenization,
                         last_turn_loss_only=ds.last_turn_loss_only, num_proc=ds.num_proc, progress=progress,
                         on_bad_record=ds.on_bad_record, config_key=f"dataset.{split}_data_path",
                         empty_hint=PROMPTS_ONLY_HINT if split == "train" and not ds.regenerate else "")


def vocab_map_for(samples, target_vocab_size: int, draft_vocab_size: int | None):
    """(d2t, t2d) of `samples` (a build_dataset result), saved beside its cache as vocab_map.pt."""
    folder = getattr(samples, "cache_dir", None)
    return build_vocab_map(samples, target_vocab_size, draft_vocab_size,
                           None if folder is None else Path(folder) / VOCAB_MAP_FILE)
