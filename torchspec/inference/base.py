"""The Engine protocol: run the target over tokenized samples and leave hidden states in a Store.

An engine never returns tensors to its caller: it puts one hidden-state record per sample in the
Store (docs/interfaces.md, "Hidden-state record") and returns where it put them. Logits never
leave an engine. Implementations (hf, sglang, vllm) must yield the same tensors for the same model
and input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The target's compute dtype on `device`, and so the records' (docs/interfaces.md): bf16 on GPU, fp32 on CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


@dataclass(frozen=True)
class StoredSample:
    key: str          # Store key of the record
    sample_id: str    # the Sample's stable id
    length: int       # tokens in the record

    @property
    def skipped(self) -> bool:
        """No record: a deferred sample that tokenized to no supervised token (inference/deferred.py)."""
        return not self.key


@runtime_checkable
class Engine(Protocol):
    def generate(self, samples: Sequence) -> list[StoredSample]:
        """Run the target over `samples` (objects with sample_id, input_ids, loss_mask)."""
        ...

    def close(self) -> None: ...

    # Optional: `metrics() -> dict[str, float]`, the engine's own counters and gauges (engine_metrics.py),
    # read in the engine's process and logged by the runner as `engine<i>/<name>` each log step.


def put_record(store, sample, aux: torch.Tensor, final: torch.Tensor) -> StoredSample:
    """Put one sample's hidden-state record (docs/interfaces.md) under its sample id: the one place every
    engine builds it. aux [n, 3H] and final [n, H] hold the n = len(sample) positions."""
    n = int(sample.input_ids.numel())
    store.put(sample.sample_id, {
        "input_ids": sample.input_ids.to(torch.long),
        "loss_mask": sample.loss_mask.to(torch.uint8),
        "aux_hidden_states": aux,
        "final_hidden_states": final,
    })
    return StoredSample(key=sample.sample_id, sample_id=sample.sample_id, length=n)
