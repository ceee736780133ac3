"""A random, fully supervised, unpadded trainer batch (the layout of docs/interfaces.md)."""

import torch


def random_batch(gen: torch.Generator, b: int, T: int, H: int, V: int) -> dict:
    return {
        "input_ids": torch.randint(0, V, (b, T), generator=gen),
        "loss_mask": torch.ones(b, T, dtype=torch.uint8),
        "attention_mask": torch.ones(b, T, dtype=torch.long),
        "aux_hidden_states": torch.randn(b, T, 3 * H, generator=gen),
        "final_hidden_states": torch.randn(b, T, H, generator=gen),
    }
