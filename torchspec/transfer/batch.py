"""Hidden-state records (one per sample, from the Store) -> one trainer batch.

Two layouts (`training.pack_samples`):
- packed: every record of the micro-batch one after another in a single row [1, sum(lengths)], with
  `attention_mask` numbering the documents 1..n. No padding is computed at all, and the Eagle3 forward
  keeps attention, positions and TTT shifts inside each document (torchspec.models.eagle3).
- padded: one record per row, right-padded to the longest; `attention_mask` is 1 on real tokens, 0 after.
"""

from __future__ import annotations

import torch

RECORD_KEYS = ("input_ids", "loss_mask", "aux_hidden_states", "final_hidden_states")


def collate(records: list[dict[str, torch.Tensor]], *, pack: bool) -> dict[str, torch.Tensor]:
    """The trainer batch of `records`: input_ids/loss_mask/attention_mask [B, T], hidden states [B, T, *]."""
    if not records:
        raise ValueError("collate: empty micro-batch")
    lengths = [int(r["input_ids"].shape[0]) for r in records]
    if pack:
        out = {k: torch.cat([r[k] for r in records]).unsqueeze(0) for k in RECORD_KEYS}
        out["input_ids"] = out["input_ids"].long()
        out["attention_mask"] = torch.repeat_interleave(torch.arange(1, len(records) + 1),
                                                        torch.tensor(lengths)).unsqueeze(0)
        return out
    B, T = len(records), max(lengths)
    first = records[0]

    def zeros(key, *shape):   # where the records are (the memory store keeps them on the GPU)
        return torch.zeros(B, T, *shape, dtype=first[key].dtype, device=first[key].device)

    out = {
        "input_ids": zeros("input_ids").long(),
        "loss_mask": zeros("loss_mask"),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        "aux_hidden_states": zeros("aux_hidden_states", first["aux_hidden_states"].shape[-1]),
        "final_hidden_states": zeros("final_hidden_states", first["final_hidden_states"].shape[-1]),
    }
    for i, (r, n) in enumerate(zip(records, lengths)):
        for k in RECORD_KEYS:
            out[k][i, :n] = r[k]
        out["attention_mask"][i, :n] = 1
    return out
