"""Samples as they travel to engine processes and Ray actors: (sample id, input ids, loss mask) as numpy
arrays (cheap to pickle), plus the image references of a sample that has images, turned back into
`torchspec.data.sample.Sample` on the other side. A deferred record (data.deferred.RawRecord: its bytes,
dataset.defer_tokenization) travels as it is; the engine tokenizes it."""

from __future__ import annotations

import torch

from torchspec.data.deferred import RawRecord


def to_wire(samples) -> list:
    return [s if isinstance(s, RawRecord) else
            (s.sample_id, s.input_ids.numpy(), s.loss_mask.numpy()) + ((tuple(s.images),) if s.images else ())
            for s in samples]


def from_wire(items):
    from torchspec.data.sample import Sample

    return [s if isinstance(s, RawRecord) else
            Sample(s[0], torch.from_numpy(s[1]), torch.from_numpy(s[2]), images=tuple(s[3]) if len(s) > 3 else ())
            for s in items]
