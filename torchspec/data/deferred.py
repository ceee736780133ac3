"""dataset.defer_tokenization: a sample travels to the engine as its record's bytes, and is parsed, rendered
and tokenized there (`RecordTokenizer`, in the engine's process), with the same code as the up-front path.

The driver only reads the record's bytes from the memory-mapped index's byte range (no JSON parse, no chat
template, no tokenizer); the engine turns them into the `Sample` the up-front path would have built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from torchspec.data.sample import Sample
from torchspec.data.sources import parse_record
from torchspec.data.tokenize import Encoder, TokenizeOptions, tokenize_many


@dataclass(frozen=True)
class RawRecord:
    """A deferred sample on its way to an engine: its record's bytes, not yet parsed or tokenized."""

    sample_id: str
    raw: bytes
    path: str                 # the file the bytes are from (error locations, relative image paths)
    line: int                 # its line there (0 in a spill file)
    prompt_key: str | None    # None: a line of the index's spill file (already checked messages)


class RecordTokenizer:
    """RawRecords -> Samples with the dataset's tokenizer, chat template and options (`tokenize_many`, the function
    every path tokenizes with). Picklable: it is sent once to each engine process or actor, which builds its
    encoder on first use."""

    def __init__(self, tokenizer, template, opts: TokenizeOptions):
        self.tokenizer, self.template, self.opts = tokenizer, template, opts
        self._encoder = None

    def __getstate__(self):
        return {**self.__dict__, "_encoder": None}

    @property
    def max_length(self) -> int:
        return self.opts.max_seq_length

    def samples(self, items: Sequence) -> list[Sample]:
        """`items` as Samples, in order: RawRecords parsed and tokenized together (one encoder call), Samples
        as they are."""
        raws = [i for i, x in enumerate(items) if isinstance(x, RawRecord)]
        if not raws:
            return list(items)
        if self._encoder is None:
            self._encoder = Encoder(self.tokenizer)
        convs = [parse_record(r.raw, r.path, r.line, r.sample_id, r.prompt_key) for r in (items[i] for i in raws)]
        out = list(items)
        for i, s in zip(raws, tokenize_many(convs, self._encoder, self.template, self.opts)):
            out[i] = s
        return out
