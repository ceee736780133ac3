"""build_dataset: conversation files -> samples (cached), and the draft vocabulary beside them."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Sequence

from torchspec.data import cache
from torchspec.data.errors import BadRecords, DataError
from torchspec.data.formats import Conversation, file_digest, load_conversations, resolve_files
from torchspec.data.sample import Sample, SampleTable
from torchspec.data.templates import get_template
from torchspec.data.tokenize import Encoder, Stats, TokenizeOptions, render_all, tokenize_conversations, tokenize_many
from torchspec.data.vocab import VOCAB_MAP_FILE, build_vocab_map

log = logging.getLogger("torchspec.data")


class LazySamples(Sequence):
    """defer_tokenization: conversations are loaded and checked up front, tokenized on access.

    A sample whose loss mask ends up all zero is still returned by indexing (the caller skips it);
    iterating skips such samples.
    """

    def __init__(self, conversations: list[Conversation], tokenizer, template, opts: TokenizeOptions,
                 cache_dir: Path | None):
        self.conversations, self.tokenizer, self.template, self.opts = conversations, tokenizer, template, opts
        self.cache_dir = cache_dir
        self.stats = None
        self._encoder = None

    def __getstate__(self):  # the encoder is rebuilt in whichever process reads the samples
        return {**self.__dict__, "_encoder": None}

    def __len__(self):
        return len(self.conversations)

    @property
    def sample_ids(self) -> list[str]:
        """Every sample's id, without tokenizing (the pipeline controller schedules by id)."""
        return [c.sample_id for c in self.conversations]

    def __getitem__(self, i) -> Sample:
        if isinstance(i, slice):
            return self.take(range(*i.indices(len(self))))
        return self.take([i])[0]

    def take(self, indices) -> list[Sample]:
        """The samples at `indices`, tokenized together (the controller fetches inference_fetch_batch at a time)."""
        if self._encoder is None:
            self._encoder = Encoder(self.tokenizer)
        return tokenize_many([self.conversations[i] for i in indices], self._encoder, self.template, self.opts)

    def __iter__(self):
        for i in range(len(self)):
            s = self[i]
            if int(s.loss_mask.sum()) > 0:
                yield s


def build_dataset(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer, *, chat_template: str | None,
                  max_seq_length: int, prompt_key: str, cache_dir: str | os.PathLike | None = None,
                  defer_tokenization: bool = False, last_turn_loss_only: bool = False,
                  num_proc: int | None = 1, progress: bool = True, on_bad_record: str = "error",
                  config_key: str = "dataset.train_data_path", empty_hint: str = "") -> SampleTable | LazySamples:
    """Samples of every conversation in `paths` (files, folders, globs), in file and record order.

    Returns a SampleTable (a sequence of Sample) or, with defer_tokenization, a LazySamples. Both
    carry `.cache_dir`: the cache folder of this exact input (None without cache_dir), where the
    draft vocabulary is saved too. Raises DataError naming the file and line for bad input; with
    on_bad_record="skip" a bad record is left out instead, counted in `.stats` (skipped_bad, bad_records)
    and named in the log. `empty_hint` ends the error raised when no conversation has a supervised token.
    """
    if max_seq_length <= 0:
        raise DataError(f"training.max_seq_length must be positive, got {max_seq_length}")
    files = resolve_files(paths, config_key)
    template = get_template(chat_template, tokenizer)
    digests = [file_digest(f) for f in files]
    bad = BadRecords(on_bad_record)
    opts = TokenizeOptions(max_seq_length=max_seq_length, last_turn_loss_only=last_turn_loss_only,
                           on_bad_record=on_bad_record)
    folder = None
    if cache_dir is not None:
        key = cache.cache_key(digests, cache.tokenizer_identity(tokenizer), template.identity(), max_seq_length,
                              {"prompt_key": prompt_key, "last_turn_loss_only": last_turn_loss_only,
                               "on_bad_record": on_bad_record})
        folder = cache.cache_folder(cache_dir, key)
        if not defer_tokenization:
            t0 = time.perf_counter()
            hit = cache.load(folder)
            if hit is not None:
                table, stats = hit
                table.cache_dir, table.stats = folder, stats
                log.info("cache hit: %d samples from %s in %.2fs", len(table), folder, time.perf_counter() - t0)
                _log_bad(config_key, stats)
                return table
            log.info("cache miss: tokenizing %d file(s) into %s", len(files), folder)

    convs = load_conversations(files, prompt_key, digests, bad)
    if defer_tokenization:
        if bad.skipping:  # rendered now, so that a conversation the template rejects is left out up front
            convs, _ = render_all(template, convs, opts, bad)
        _no_records_left(config_key, convs, bad)
        lazy = LazySamples(convs, tokenizer, template, opts, folder)
        lazy.stats = Stats(conversations=len(convs) + bad.count)
        lazy.stats.add_bad(bad)
        log.info("defer_tokenization: %d conversations from %d file(s), tokenized on access", len(convs), len(files))
        _log_bad(config_key, lazy.stats)
        return lazy

    _no_records_left(config_key, convs, bad)
    table, stats = tokenize_conversations(convs, tokenizer, template, opts, num_proc=num_proc or os.cpu_count() or 1,
                                          progress=progress)
    table.images = {c.sample_id: c.images for c in convs if c.images}
    load_stats = Stats()
    load_stats.add_bad(bad)  # loading came first: its records are named first
    load_stats.add(stats)
    load_stats.seconds = stats.seconds
    stats = load_stats
    log.info("%s: %s", config_key, stats.summary(max_seq_length))
    _log_bad(config_key, stats)
    if len(table) == 0:
        raise DataError(f"{config_key}: none of the {stats.conversations} conversations has a supervised "
                        f"(assistant) token under chat_template={chat_template!r}{empty_hint}")
    if folder is not None:
        cache.save(folder, table, stats, {"files": [str(f) for f in files], "digests": digests,
                                          "chat_template": chat_template, "max_seq_length": max_seq_length,
                                          "prompt_key": prompt_key, "last_turn_loss_only": last_turn_loss_only,
                                          "on_bad_record": on_bad_record})
    table.cache_dir, table.stats = folder, stats
    return table


def _no_records_left(config_key: str, convs: list, bad: BadRecords):
    if not convs and bad.count:
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
