"""The data position a checkpoint keeps (data_state.json), in a size that does not grow with the dataset.

    {"epoch": 1, "num_samples": 1000000, "dataset_digest": "<sha1 of the sorted sample ids>",
     "trained": [[0, 51200], [51210, 51211]]}

`trained` lists half-open ranges of positions in the epoch's order (`pipeline.controller.epoch_order`, a
function of the sample ids, the seed and the epoch) whose samples were trained in this epoch. Samples are
trained almost in that order (engines finish out of order only within the samples in the store at once), so
a 1M-sample epoch is a few ranges, not a million ids. Older checkpoints wrote {"epoch", "trained_ids": [...]};
they still load (`trained_positions`).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence


def ids_digest(sample_ids: Iterable[str]) -> str:
    """Names a dataset by its sample ids (order-free), so a resume can tell it is the same data."""
    h = hashlib.sha1()
    for sid in sorted(sample_ids):
        h.update(sid.encode())
        h.update(b"\n")
    return h.hexdigest()


class TrainedPositions:
    """Epoch positions trained so far: all below `upto`, plus the few trained ahead of it (`ahead`)."""

    def __init__(self):
        self.upto = 0
        self.ahead: set[int] = set()

    def add(self, pos: int) -> None:
        if pos < self.upto or pos in self.ahead:
            raise ValueError(f"epoch position {pos} is already trained")
        self.ahead.add(pos)
        while self.upto in self.ahead:
            self.ahead.remove(self.upto)
            self.upto += 1

    def __contains__(self, pos: int) -> bool:
        return pos < self.upto or pos in self.ahead

    def __len__(self) -> int:
        return self.upto + len(self.ahead)

    def ranges(self) -> list[list[int]]:
        """Half-open [start, end) ranges, ascending."""
        out = [[0, self.upto]] if self.upto else []
        for p in sorted(self.ahead):
            if out and out[-1][1] == p:
                out[-1][1] = p + 1
            else:
                out.append([p, p + 1])
        return out

    @classmethod
    def from_positions(cls, positions: Iterable[int]) -> "TrainedPositions":
        t = cls()
        for p in sorted(positions):
            t.add(p)
        return t

    @classmethod
    def from_ranges(cls, ranges: Sequence[Sequence[int]], num_samples: int) -> "TrainedPositions":
        t = cls()
        for r in ranges:
            start, end = int(r[0]), int(r[1])
            if not 0 <= start < end <= num_samples:
                raise ValueError(f"the resumed data state has a trained range {list(r)} outside the epoch's "
                                 f"{num_samples} samples")
            if start == t.upto and not t.ahead:
                t.upto = end
            else:
                for p in range(start, end):
                    t.add(p)
        return t


def encode(epoch: int, num_samples: int, digest: str, trained: TrainedPositions) -> dict:
    return {"epoch": int(epoch), "num_samples": int(num_samples), "dataset_digest": digest,
            "trained": trained.ranges()}


def trained_positions(state: dict, order: Sequence[str], digest: str) -> TrainedPositions:
    """The trained positions of `state` (either format) in the epoch `order` of this run's dataset; ValueError
    when the state cannot belong to it."""
    if "trained" in state:
        n = int(state.get("num_samples", len(order)))
        if n != len(order) or state.get("dataset_digest", digest) != digest:
            raise ValueError(f"the resumed data state is of a dataset of {n} samples, not this one "
                             f"({len(order)} samples{', other ids' if n == len(order) else ''}); resume with the "
                             "same dataset")
        return TrainedPositions.from_ranges(state["trained"], n)
    ids = list(state.get("trained_ids") or [])   # the format before ranges
    if not ids:
        return TrainedPositions()
    where = {sid: p for p, sid in enumerate(order)}
    unknown = [i for i in ids if i not in where]
    if unknown:
        raise ValueError(f"the resumed data state names {len(unknown)} sample ids not in this dataset "
                         f"(e.g. {sorted(unknown)[0]!r}); resume with the same dataset")
    return TrainedPositions.from_positions(where[i] for i in ids)
