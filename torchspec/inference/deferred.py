"""An engine fed deferred samples (dataset.defer_tokenization): `TokenizingEngine` tokenizes the records it is
given in the engine's own process (an engine process, a Ray actor; the trainer's process when colocated), then
runs the engine it wraps over them.

A sample left with no supervised token (its assistant turns all cut by max_seq_length, or none at all) is not
run: it comes back as a StoredSample without a record (`skipped`), in its place, and the controller counts it
as done, as the up-front path drops it before the run. Samples given already tokenized pass through unchanged.
"""

from __future__ import annotations

import functools
from typing import Sequence

from torchspec.data.deferred import RawRecord
from torchspec.inference.base import StoredSample


class TokenizingEngine:
    def __init__(self, engine, record_tokenizer):
        self.engine, self.record_tokenizer = engine, record_tokenizer

    def generate(self, items: Sequence) -> list[StoredSample]:
        samples = self.record_tokenizer.samples(items)
        # a Sample given tokenized (the held-out eval set) runs as it is
        keep = [not isinstance(x, RawRecord) or bool(s.loss_mask.any()) for x, s in zip(items, samples)]
        run = [s for s, k in zip(samples, keep) if k]
        stored = iter(self.engine.generate(run) if run else ())
        return [next(stored) if k else StoredSample("", s.sample_id, 0) for s, k in zip(samples, keep)]

    def close(self) -> None:
        self.engine.close()

    def __getattr__(self, name):   # metrics() and whatever else the wrapped engine offers
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


def _build(factory, record_tokenizer, *args):
    return TokenizingEngine(factory(*args), record_tokenizer)


def tokenizing_factory(factory, record_tokenizer):
    """engine_factory(store, device) -> an engine that tokenizes deferred records first (picklable: it travels
    to engine processes and Ray actors with the tokenizer, once); `factory` itself when record_tokenizer is None."""
    return factory if record_tokenizer is None else functools.partial(_build, factory, record_tokenizer)
