"""Samples as they travel to engine processes and Ray actors: (sample id, input ids, loss mask) as numpy
arrays (cheap to pickle), turned back into `torchspec.data.sample.Sample` on the other side."""

from __future__ import annotations

import torch


def to_wire(samples) -> list[tuple]:
    return [(s.sample_id, s.input_ids.numpy(), s.loss_mask.numpy()) for s in samples]


def from_wire(items):
    from torchspec.data.sample import Sample

    return [Sample(sid, torch.from_numpy(ids), torch.from_numpy(mask)) for sid, ids, mask in items]
