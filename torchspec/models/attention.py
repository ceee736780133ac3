"""TTT attention: step k's query at row t sees step-0 keys at rows <= t OF ITS OWN DOCUMENT and its own
keys of steps 1..k (the "diagonal", same row).

A batch row may hold several documents (sequence packing): `doc` [B, T] numbers them 1, 2, ... along
the row and marks padding 0; a right-padded unpacked row is one document. Masks are built once per
forward from `doc` (`AttentionMasks`), used by every TTT step and dropped with the batch: nothing is
cached across batches, so varying lengths cannot pile masks up.

Backends compute the same thing (a test holds them equal):
- `sdpa`: keys of all steps concatenated along the sequence; on CUDA PyTorch's fused SDPA with an
  explicit boolean mask [B, 1, T, (k+1)T] (memory grows with T^2). Elsewhere the step-0 scores and the
  k diagonal scores share one softmax over T + k columns (`_dense_ttt`), no (k+1)T-wide mask; a packed
  row is attended document by document (work: the sum of the squared document lengths).
- `flex_attention`: on CUDA, compiled flex attention over step-0 keys with a block mask built from the
  document boundaries (blocks of other documents are skipped, not masked), returning its log-sum-exp;
  the k diagonal scores are merged exactly through that log-sum-exp. Off CUDA it is `_dense_ttt` too
  (the fused kernel and its backward exist only on CUDA).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex_attention")
FLEX_BLOCK = 128


def doc_causal(doc: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, T, T]: query t may see key s (s <= t, same document; a padding row sees padding)."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return (doc[:, :, None] == doc[:, None, :]).logical_and_(causal)[:, None]


def doc_block_mask(doc: torch.Tensor):
    """Flex BlockMask of `doc_causal`, built from per-block document ranges (O((T/128)^2) work).

    Documents are contiguous and numbered upwards along the row, so q block i and kv block j < i share a
    document iff the last document of j is the first of i; the pair is "full" (no per-element mask)
    when both blocks lie inside that one document.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, T = doc.shape
    n = -(-T // FLEX_BLOCK)
    padded = F.pad(doc, (0, n * FLEX_BLOCK - T), value=-1).view(B, n, FLEX_BLOCK)
    # padding past T gets document -1: ignore it in the ranges
    first = padded[..., 0]
    last = torch.where(padded >= 0, padded, padded.new_full((), -2)).amax(-1)
    i = torch.arange(n, device=doc.device)
    below = (i[None, :] < i[:, None])[None]                                   # j < i
    touches = below & (last[:, None, :] == first[:, :, None])                # [B, i, j]
    single = (first == last) & (padded[..., -1] >= 0)                         # whole block, one document
    full = touches & single[:, :, None] & single[:, None, :]
    partial = (touches & ~full) | torch.eye(n, dtype=torch.bool, device=doc.device)[None]

    def blocks(m):
        num = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return num[:, None].contiguous(), idx[:, None].contiguous()

    kv_num, kv_idx = blocks(partial)
    full_num, full_idx = blocks(full)
    doc_padded = padded.reshape(B, n * FLEX_BLOCK)   # indices of a last partial block stay in range

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_padded[b, q_idx] == doc_padded[b, kv_idx])

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(T, T))


class AttentionMasks:
    """The masks one batch needs, built on first use and shared by every TTT step of its forward."""

    def __init__(self, backend: str, doc: torch.Tensor):
        if backend not in BACKENDS:
            raise ValueError(f"training.attention_backend: unknown backend '{backend}' (choose from {BACKENDS})")
        self.backend = backend
        self.doc = doc
        self.cuda = doc.device.type == "cuda"

    @functools.cached_property
    def allowed(self) -> torch.Tensor:
        return doc_causal(self.doc)

    @functools.cached_property
    def block_mask(self):
        return doc_block_mask(self.doc)

    @functools.cached_property
    def segments(self) -> list[tuple[int, int]] | None:
        """(start, end) of each document of a single packed row (padding counts as one), else None."""
        if self.doc.shape[0] != 1:
            return None
        _, counts = torch.unique_consecutive(self.doc[0], return_counts=True)
        ends = torch.cumsum(counts, 0).tolist()
        return list(zip([0] + ends[:-1], ends))

    def sdpa_mask(self, k: int) -> torch.Tensor:
        """bool [B, 1, T, (k+1)T]: document-causal over step-0 keys, then one identity block per step 1..k."""
        T = self.doc.shape[1]
        if not k:
            return self.allowed
        eye = torch.eye(T, dtype=torch.bool, device=self.doc.device).expand(self.doc.shape[0], 1, T, T)
        return torch.cat([self.allowed] + [eye] * k, dim=-1)


# On CUDA the elementwise-heavy pieces of the TTT step (norms, RoPE, residuals, SwiGLU, the
# diagonal merge, the lm_head softmax/loss) run through torch.compile; elsewhere they run eagerly.
COMPILE_ON_CUDA = True


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def maybe_compiled(fn, like: torch.Tensor):
    """`fn` compiled (dynamic shapes, cached per function) when `like` lives on CUDA, else `fn`."""
    return _compiled(fn) if COMPILE_ON_CUDA and like.device.type == "cuda" else fn


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def flex_with_lse(q, k, v, block_mask):
    """(out [B, nh, T, d], natural-log lse [B, nh, T]) of masked attention on CUDA, differentiable in both."""
    from torch.nn.attention import flex_attention as fa

    scale = 1.0 / math.sqrt(q.shape[-1])
    gqa = q.shape[1] != k.shape[1]
    if hasattr(fa, "AuxRequest"):
        out, aux = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                    return_aux=fa.AuxRequest(lse=True))
        return out, aux.lse
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)


def _dense_ttt(q, keys, values, allowed):
    """Step-0 scores (masked by `allowed`) and the k diagonal scores in one softmax over T + k columns."""
    B, nh, T, d = q.shape
    nkv = keys[0].shape[1]
    g = nh // nkv
    scale = 1.0 / math.sqrt(d)
    qg = q.reshape(B, nkv, g, T, d).float()
    s0 = (qg @ keys[0].float().unsqueeze(2).transpose(-1, -2)) * scale            # [B, nkv, g, T, T]
    s0 = s0.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    diag = [(qg * kj.float().unsqueeze(2)).sum(-1, keepdim=True) * scale for kj in keys[1:]]
    p = torch.softmax(torch.cat([s0] + diag, dim=-1), dim=-1)
    out = p[..., :T] @ values[0].float().unsqueeze(2)
    for j, vj in enumerate(values[1:]):
        out = out + p[..., T + j:T + j + 1] * vj.float().unsqueeze(2)
    return out.to(q.dtype).reshape(B, nh, T, d)


def ttt_attention(masks: AttentionMasks, q: torch.Tensor, keys: list[torch.Tensor],
                  values: list[torch.Tensor]) -> torch.Tensor:
    """Attention of step k = len(keys) - 1. q [B, nh, T, d]; keys/values: step 0..k, each [B, nkv, T, d].

    Returns [B, T, nh*d].
    """
    B, nh, T, d = q.shape
    k_steps = len(keys) - 1
    if not masks.cuda and masks.segments is not None:   # one packed row: each document alone (sum of len^2)
        out = torch.cat([_dense_ttt(q[:, :, a:b], [k[:, :, a:b] for k in keys], [v[:, :, a:b] for v in values],
                                    doc_causal(masks.doc[:, a:b])) for a, b in masks.segments], dim=2)
    elif not masks.cuda:
        out = _dense_ttt(q, keys, values, masks.allowed)
    elif masks.backend == "sdpa":
        kc = keys[0] if k_steps == 0 else torch.cat(keys, dim=2)
        vc = values[0] if k_steps == 0 else torch.cat(values, dim=2)
        out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=masks.sdpa_mask(k_steps),
                                             enable_gqa=nh != kc.shape[1])
    else:
        out, lse = flex_with_lse(q, keys[0], values[0], masks.block_mask)
        if k_steps:
            out = maybe_compiled(_merge_diagonal, q)(q, out, lse, keys[1:], values[1:])
    return out.transpose(1, 2).reshape(B, T, nh * d)


def _merge_diagonal(q, out0, lse0, dkeys, dvalues):
    """Fold the diagonal keys (one per extra step, same row) into a causal result via its lse."""
    B, nh, T, d = q.shape
    nkv = dkeys[0].shape[1]
    g = nh // nkv
    qg = q.view(B, nkv, g, T, d)
    scale = 1.0 / math.sqrt(d)
    diag = [(qg * kj.unsqueeze(2)).float().sum(-1) * scale for kj in dkeys]  # row-wise dots: no tiny bmm
    scores = torch.stack([lse0.view(B, nkv, g, T).float()] + diag, dim=-1)  # [B, nkv, g, T, 1+k]
    w = torch.softmax(scores, dim=-1)
    out = w[..., 0:1] * out0.view(B, nkv, g, T, d).float()
    for j, vj in enumerate(dvalues, start=1):
        out = out + w[..., j:j + 1] * vj.unsqueeze(2).float()
    return out.to(q.dtype).view(B, nh, T, d)
