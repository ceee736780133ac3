"""Hidden-state records (one per sample, from the Store) -> the right-padded trainer batch."""

from __future__ import annotations

import torch

RECORD_KEYS = ("input_ids", "loss_mask", "aux_hidden_states", "final_hidden_states")


def collate(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad records to the longest: input_ids/loss_mask/attention_mask [B,T], hidden states [B,T,*]."""
    if not records:
        raise ValueError("collate: empty micro-batch")
    lengths = [int(r["input_ids"].shape[0]) for r in records]
    B, T = len(records), max(lengths)
    first = records[0]
    out = {
        "input_ids": torch.zeros(B, T, dtype=torch.long),
        "loss_mask": torch.zeros(B, T, dtype=first["loss_mask"].dtype),
        "attention_mask": torch.zeros(B, T, dtype=torch.long),
        "aux_hidden_states": torch.zeros(B, T, first["aux_hidden_states"].shape[-1],
                                         dtype=first["aux_hidden_states"].dtype),
        "final_hidden_states": torch.zeros(B, T, first["final_hidden_states"].shape[-1],
                                           dtype=first["final_hidden_states"].dtype),
    }
    for i, (r, n) in enumerate(zip(records, lengths)):
        for k in RECORD_KEYS:
            out[k][i, :n] = r[k]
        out["attention_mask"][i, :n] = 1
    return out
