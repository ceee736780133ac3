"""The draft vocabulary: the `draft_vocab_size` target tokens most frequent among supervised tokens.

Format (as SGLang and vLLM load it, docs/interfaces.md):
  d2t: LongTensor[V_draft], draft id i <-> target id i + d2t[i] (draft ids in increasing target-id order)
  t2d: BoolTensor[V_target], True for the target ids the draft vocabulary keeps
Ties in frequency go to the lower token id. draft_vocab_size None or >= V_target keeps every token.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from torchspec.data.errors import DataError
from torchspec.data.sample import Sample, SampleTable

log = logging.getLogger("torchspec.data")
VOCAB_MAP_FILE = "vocab_map.pt"


def token_frequencies(samples: Iterable[Sample] | SampleTable, target_vocab_size: int) -> torch.Tensor:
    """LongTensor[V_target]: how often each token id occurs where loss_mask is 1.

    A dataset that counted them while tokenizing (SampleTable.token_counts, counted by the workers) or that
    counts a sample of itself (LazySamples.token_counts()) is not read again."""
    counts = getattr(samples, "token_counts", None)
    if counts is not None:
        counts = torch.from_numpy(np.asarray(counts() if callable(counts) else counts, dtype=np.int64))
        nonzero = torch.nonzero(counts).flatten()
        if nonzero.numel() and int(nonzero[-1]) >= target_vocab_size:
            raise DataError(f"token id {int(nonzero[-1])} is outside the target's vocabulary of {target_vocab_size}: "
                            "the tokenizer does not belong to model.target_model_path")
        out = torch.zeros(target_vocab_size, dtype=torch.long)
        out[:min(len(counts), target_vocab_size)] = counts[:target_vocab_size]
        return out
    if isinstance(samples, SampleTable):
        chunks = [samples.input_ids[samples.loss_mask.bool()].to(torch.long)]
    else:
        chunks = [s.input_ids[s.loss_mask.bool()].to(torch.long) for s in samples]
    ids = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
    if ids.numel() and int(ids.max()) >= target_vocab_size:
        raise DataError(f"token id {int(ids.max())} is outside the target's vocabulary of {target_vocab_size}: "
                        "the tokenizer does not belong to model.target_model_path")
    return torch.bincount(ids, minlength=target_vocab_size)


def vocab_map_from_frequencies(freq: torch.Tensor, draft_vocab_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    v_target = freq.shape[0]
    if draft_vocab_size is None or draft_vocab_size >= v_target:
        return torch.zeros(v_target, dtype=torch.long), torch.ones(v_target, dtype=torch.bool)
    if draft_vocab_size <= 0:
        raise DataError(f"training.draft_vocab_size must be positive, got {draft_vocab_size}")
    # Stable sort on -freq: equal counts keep increasing id order, so ties go to the lower id.
    order = torch.sort(-freq, stable=True).indices
    keep = torch.sort(order[:draft_vocab_size]).values
    d2t = keep - torch.arange(draft_vocab_size)
    t2d = torch.zeros(v_target, dtype=torch.bool)
    t2d[keep] = True
    return d2t, t2d


def build_vocab_map(samples, target_vocab_size: int, draft_vocab_size: int | None,
                    path: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t, t2d) for `samples`; read from / saved to `path` (vocab_map.pt) when given."""
    if path is not None and Path(path).is_file():
        d = torch.load(path, weights_only=True)
        if d.get("target_vocab_size") == target_vocab_size and d.get("draft_vocab_size") == draft_vocab_size:
            log.info("vocab map: cache hit, %s", path)
            return d["d2t"], d["t2d"]
    freq = token_frequencies(samples, target_vocab_size)
    d2t, t2d = vocab_map_from_frequencies(freq, draft_vocab_size)
    covered = int(freq[t2d].sum()) / max(1, int(freq.sum()))
    log.info("draft vocabulary: %d of %d target tokens, covering %.2f%% of supervised tokens",
             d2t.shape[0], target_vocab_size, 100 * covered)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp{os.getpid()}")
        torch.save({"d2t": d2t, "t2d": t2d, "target_vocab_size": target_vocab_size,
                    "draft_vocab_size": draft_vocab_size}, tmp)
        os.replace(tmp, path)
    return d2t, t2d
