"""The tokenized sample every engine and trainer consumes (see docs/interfaces.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class Sample:
    """One conversation, tokenized.

    sample_id: stable across runs (content hash of the source file + record index), so a
        resumed run can tell exactly which samples it has already seen.
    input_ids: LongTensor[T].
    loss_mask: uint8 Tensor[T]; 1 on the tokens the draft is trained to predict
        (assistant content + end-of-turn token), 0 on system/user/template scaffolding.
    images: the conversation's image references in order (data/multimodal.py), one per image placeholder in
        input_ids (before the engine expands them); empty for text.
    """

    sample_id: str
    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    images: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class SampleIds(Sequence):
    """Sample ids `<file prefix>-<record index>` kept as two integer arrays (12 bytes a sample, not a
    Python string each); a read-only sequence of str, equal to any sequence holding the same ids."""

    def __init__(self, prefixes: Sequence[str], file: np.ndarray, record: np.ndarray):
        self.prefixes, self.file, self.record = list(prefixes), file, record

    def __len__(self) -> int:
        return int(self.record.shape[0])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"{self.prefixes[int(self.file[i])]}-{int(self.record[i])}"

    def __iter__(self):
        p = self.prefixes
        return (f"{p[f]}-{r}" for f, r in zip(self.file.tolist(), self.record.tolist()))

    def __eq__(self, other):
        if isinstance(other, SampleIds) and other.prefixes == self.prefixes:
            return np.array_equal(self.file, other.file) and np.array_equal(self.record, other.record)
        return isinstance(other, Sequence) and not isinstance(other, str) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"SampleIds({len(self)} ids)"


class SampleTable:
    """Many samples stored as flat token buffers (what the cache holds); a read-only sequence of Sample.

    Indexing returns a Sample that owns its tensors (int64 input_ids, uint8 loss_mask), so saving or
    sending one sample never drags the whole table along. `images` maps the id of a sample with images to
    its image references (samples without images are not in it).

    The buffers may be memory-mapped from the cache (cache.load): a sample's pages are read when it is.
    `token_counts` (numpy, by token id): how often each id is supervised, when the build counted them.
    """

    def __init__(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, offsets: torch.Tensor,
                 sample_ids: Sequence[str], images: dict[str, tuple[str, ...]] | None = None):
        assert offsets.shape[0] == len(sample_ids) + 1 and input_ids.shape == loss_mask.shape
        self.input_ids, self.loss_mask, self.offsets, self.sample_ids = input_ids, loss_mask, offsets, sample_ids
        self.images = dict(images or {})
        self.token_counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> Sample:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        sid = self.sample_ids[i]
        return Sample(sid, self.input_ids[a:b].to(torch.long), self.loss_mask[a:b].to(torch.uint8, copy=True),
                      images=tuple(self.images.get(sid, ())))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def lengths(self) -> torch.Tensor:
        """Token count of every sample (for length-aware batching)."""
        return self.offsets[1:] - self.offsets[:-1]


def sample_ids_of(samples) -> list[str]:
    """Every sample's id, in order: a table or a lazily tokenized dataset names them without reading the samples
    (`sample_ids`); a plain list of Samples is read."""
    ids = getattr(samples, "sample_ids", None)
    return list(ids) if ids is not None else [s.sample_id for s in samples]
