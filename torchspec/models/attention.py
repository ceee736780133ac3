"""TTT attention: step k's query at row t sees step-0 keys at rows <= t OF ITS OWN DOCUMENT and its own
keys of steps 1..k (the "diagonal", same row).

A batch row may hold several documents (sequence packing): `doc` [B, T] numbers them 1, 2, ... along
the row and marks padding 0; a right-padded unpacked row is one document. What the backends need from
`doc` (`AttentionMasks`: the document runs of each row, or the flex BlockMask) is built once per forward,
used by every TTT step and dropped with the batch: nothing is cached across batches.

Backends compute the same thing (tests hold them equal to an explicit-mask reference); none builds a
[T, T] or [T, (k+1)T] mask or score tensor, so memory grows linearly with T:
- `sdpa` (every device): each document alone (batched over rows when all rows share their document runs;
  padding runs give zeros, which nothing reads) through PyTorch's fused SDPA with `is_causal`; the k
  diagonal keys join the same softmax as extra key/value columns (`_sdpa_ttt`).
- `flex_attention`: on CUDA, compiled flex attention over step-0 keys with a block mask built from the
  document boundaries (blocks of other documents are skipped, not masked), returning its log-sum-exp;
  the k diagonal scores are merged exactly through that log-sum-exp (`_merge_diagonal`). Off CUDA (no
  fused flex kernel with a backward there) the same merge follows a causal attention per document in
  query chunks that are recomputed in backward (`causal_with_lse`); slower than `sdpa` on CPU.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

BACKENDS = ("auto", "sdpa", "flex_attention")   # auto: the faster one on the batch's device (below)
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
    """What one batch's attention needs from `doc`, built on first use and shared by every TTT step of its
    forward: the document runs of each row (all backends off CUDA and `sdpa`), the flex BlockMask (CUDA flex)."""

    def __init__(self, backend: str, doc: torch.Tensor):
        if backend not in BACKENDS:
            raise ValueError(f"training.attention_backend: unknown backend '{backend}' (choose from {BACKENDS})")
        self.doc = doc
        self.cuda = doc.device.type == "cuda"
        if backend == "auto":   # compiled flex on CUDA; off CUDA sdpa's fused kernel is ~4-5x faster than flex
            backend = "flex_attention" if self.cuda else "sdpa"
        self.backend = backend

    @functools.cached_property
    def block_mask(self):
        return doc_block_mask(self.doc)

    @functools.cached_property
    def runs(self) -> list[list[tuple[int, int, bool]]]:
        """Per row, its (start, end, is_document) runs along T; padding (document 0) runs have is_document False."""
        out = []
        for row in self.doc:
            values, counts = torch.unique_consecutive(row, return_counts=True)
            ends = torch.cumsum(counts, 0).tolist()
            out.append([(a, b, bool(v)) for a, b, v in zip([0] + ends[:-1], ends, (values > 0).tolist())])
        return out

    @functools.cached_property
    def shared_runs(self) -> bool:
        """True when every row has the same runs (one row, or rows of one length): documents batch over rows."""
        return all(r == self.runs[0] for r in self.runs[1:])


# On CUDA the elementwise-heavy pieces of the TTT step (norms, RoPE, residuals, SwiGLU, the
# diagonal merge, the lm_head softmax/loss) run through torch.compile; elsewhere they run eagerly.
COMPILE_ON_CUDA = True


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def maybe_compiled(fn, like: torch.Tensor):
    """`fn` compiled (dynamic shapes, cached per function) when `like` lives on CUDA, else `fn`."""
    return _compiled(fn) if COMPILE_ON_CUDA and like.device.type == "cuda" else fn


# cuDNN's SDPA builds (and caches by exact shape) an execution plan per new shape: ~5 ms of host time per
# call when every batch has another length, which made the target's forward 3x slower than its GPU work.
# Flash, memory-efficient and math kernels have no per-shape set-up.
VARLEN_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def varlen_sdpa():
    """Context in which F.scaled_dot_product_attention never picks cuDNN (shapes vary from call to call)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in VARLEN_SDPA_BACKENDS])


# The main Triton flex kernel, always. Inductor's default picks its decoding kernel for rows under 128
# tokens, which finds no valid configuration when it must also train (NoValidChoicesError): a packed row of
# a few short conversations stopped a run mid-way on an H100.
@functools.lru_cache(maxsize=None)
def flex_kernel_options() -> dict:
    from torch.nn.attention.flex_attention import FlexKernelOptions

    if "BACKEND" in FlexKernelOptions.__annotations__:
        return {"BACKEND": "TRITON"}
    return {"FORCE_USE_FLEX_ATTENTION": True}   # older PyTorch


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
                                    kernel_options=flex_kernel_options(), return_aux=fa.AuxRequest(lse=True))
        return out, aux.lse
    return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                            kernel_options=flex_kernel_options(), return_lse=True)


def _sdpa_ttt(q, keys, values):
    """TTT attention of ONE document (rows share it), through PyTorch's fused SDPA with `is_causal` (no mask).

    The k diagonal keys enter the same softmax as k extra keys placed before the document (and k dummy
    query rows, so the causal square shows them to every real query): key j is the unit vector of an
    extra column j of q that holds q . k_j (split in a high and a low part below fp32, so the score
    keeps fp32 precision), and its value is the unit vector of an extra output column, which so returns
    the diagonal's softmax weight. The output then adds weight_j * v_j. Memory: O(T) per step.
    """
    B, nh, L, d = q.shape
    nkv, k = keys[0].shape[1], len(keys) - 1
    g, scale, gqa = nh // nkv, 1.0 / math.sqrt(d), nh != nkv
    if not k:
        with varlen_sdpa():
            return F.scaled_dot_product_attention(q, keys[0], values[0], is_causal=True, scale=scale, enable_gqa=gqa)
    qg = q.reshape(B, nkv, g, L, d).float()
    cols = []
    for kj in keys[1:]:
        dot = (qg * kj.float().unsqueeze(2)).sum(-1).reshape(B, nh, L)     # q . k_j, unscaled (SDPA scales)
        if q.dtype in (torch.float32, torch.float64):
            cols.append(dot.to(q.dtype))
        else:
            hi = dot.to(q.dtype)
            cols += [hi, (dot - hi.float()).to(q.dtype)]
    c = len(cols) // k
    extra = -(-c * k // 8) * 8                                              # head dim stays a multiple of 8
    width = d + extra
    q_aug = F.pad(torch.cat([q, torch.stack(cols, -1)], -1), (0, extra - c * k, k, 0))
    prefix_k = q.new_zeros(k, width)
    prefix_v = q.new_zeros(k, width)
    for j in range(k):
        prefix_k[j, d + j * c:d + (j + 1) * c] = 1
        prefix_v[j, d + j] = 1
    k_aug = torch.cat([prefix_k.expand(B, nkv, k, width), F.pad(keys[0], (0, extra))], dim=2)
    v_aug = torch.cat([prefix_v.expand(B, nkv, k, width), F.pad(values[0], (0, extra))], dim=2)
    with varlen_sdpa():
        o = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, is_causal=True, scale=scale, enable_gqa=gqa)[:, :, k:]
    w = o[..., d:d + k].float().reshape(B, nkv, g, L, k)
    out = o[..., :d].float().reshape(B, nkv, g, L, d)
    for j, vj in enumerate(values[1:]):
        out = out + w[..., j:j + 1] * vj.float().unsqueeze(2)
    return out.to(q.dtype).reshape(B, nh, L, d)


CHUNK_SCORES = 1 << 22   # off-CUDA flex: score elements of one query chunk (x4 bytes, a few such tensors live)


def _causal_chunk(q, k, v):
    """(out, lse) of the LAST q.shape[2] queries of a causal block over k's keys (fp32 scores of this chunk only)."""
    B, nh, C, d = q.shape
    nkv, L = k.shape[1], k.shape[2]
    qg = q.reshape(B, nkv, nh // nkv, C, d).float()
    s = (qg @ k.float().unsqueeze(2).transpose(-1, -2)) * (1.0 / math.sqrt(d))    # [B, nkv, g, C, L]
    later = torch.arange(L, device=q.device)[None, :] > torch.arange(L - C, L, device=q.device)[:, None]
    s = s.masked_fill(later, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ v.float().unsqueeze(2)
    return out.to(q.dtype).reshape(B, nh, C, d), lse.reshape(B, nh, C)


def causal_with_lse(q, k, v):
    """(out [B, nh, L, d], lse [B, nh, L]) of causal attention over one document, in query chunks; with grads
    on, each chunk is recomputed in backward (checkpointed), so memory is O(L) plus one chunk's scores."""
    B, nh, L, _ = q.shape
    chunk = max(16, CHUNK_SCORES // (B * nh * L))
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    pieces = []
    for a in range(0, L, chunk):
        b = min(L, a + chunk)
        args = (q[:, :, a:b], k[:, :, :b], v[:, :, :b])
        pieces.append(checkpoint(_causal_chunk, *args, use_reentrant=False) if recompute else _causal_chunk(*args))
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat([p[0] for p in pieces], dim=2), torch.cat([p[1] for p in pieces], dim=2)


def _flex_ttt_off_cuda(q, keys, values):
    """The flex path's arithmetic off CUDA for ONE document: chunked causal attention with its lse, then the
    same exact diagonal merge as on CUDA."""
    out, lse = causal_with_lse(q, keys[0], values[0])
    return _merge_diagonal(q, out, lse, keys[1:], values[1:]) if len(keys) > 1 else out


def _per_document(masks: AttentionMasks, fn, q, keys, values):
    """[B, nh, T, d]: `fn` on each document alone (batched over rows when all rows share their runs);
    padding runs get zeros (no real query sees them, and the loss never reads them)."""
    B, nh, T, d = q.shape

    def piece(r0, r1, a, b, is_doc):
        if not is_doc:
            return q.new_zeros(r1 - r0, nh, b - a, d)
        return fn(q[r0:r1, :, a:b], [x[r0:r1, :, a:b] for x in keys], [x[r0:r1, :, a:b] for x in values])

    def row(r0, r1, runs):
        parts = [piece(r0, r1, *run) for run in runs]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    if masks.shared_runs:
        return row(0, B, masks.runs[0])
    return torch.cat([row(r, r + 1, runs) for r, runs in enumerate(masks.runs)], dim=0)


def ttt_attention(masks: AttentionMasks, q: torch.Tensor, keys: list[torch.Tensor],
                  values: list[torch.Tensor]) -> torch.Tensor:
    """Attention of step k = len(keys) - 1. q [B, nh, T, d]; keys/values: step 0..k, each [B, nkv, T, d].

    Returns [B, T, nh*d].
    """
    B, nh, T, d = q.shape
    if masks.backend == "flex_attention" and masks.cuda:
        out, lse = flex_with_lse(q, keys[0], values[0], masks.block_mask)
        if len(keys) > 1:
            out = maybe_compiled(_merge_diagonal, q)(q, out, lse, keys[1:], values[1:])
    else:
        fn = _sdpa_ttt if masks.backend == "sdpa" else _flex_ttt_off_cuda
        out = _per_document(masks, fn, q, keys, values)
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
