"""Samples as they travel to engine processes and Ray actors: (sample id, input ids, loss mask) as numpy
arrays (cheap to pickle), plus the image references of a sample that has images, turned back into
`torchspec.data.sample.Sample` on the other side."""

from __future__ import annotations

import torch


def to_wire(samples) -> list[tuple]:
    return [(s.sample_id, s.input_ids.numpy(), s.loss_mask.numpy()) + ((tuple(s.images),) if s.images else ())
            for s in samples]


def from_wire(items):
    from torchspec.data.sample import Sample

    return [Sample(sid, torch.from_numpy(ids), torch.from_numpy(mask), images=tuple(images[0]) if images else ())
            for sid, ids, mask, *images in items]
