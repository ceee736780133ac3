"""TTT attention: step k's query at row t sees step-0 keys at rows <= t and its own keys of steps 1..k.

Two backends compute the same thing differently (a test holds them equal):
- `sdpa`: keys of all steps concatenated along the sequence, one explicit boolean mask
  [T, (k+1)T] per (T, k). Memory grows with T^2: for tests and short sequences.
- `flex_attention`: causal attention over step-0 keys with a block mask (built once per T and
  reused by every step), returning its log-sum-exp; the k diagonal scores are computed row-wise
  and merged exactly through the log-sum-exp. Compiled on CUDA; on CPU (no fused kernel and no
  backward in the public API) it runs the same higher-order op eagerly.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa", "flex_attention")
FLEX_BLOCK = 128


@functools.lru_cache(maxsize=32)
def sdpa_step_mask(T: int, k: int, device: torch.device) -> torch.Tensor:
    """bool [T, (k+1)T]: causal over step-0 keys, then one identity block per step 1..k."""
    eye = torch.eye(T, dtype=torch.bool, device=device)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return torch.cat([causal] + [eye] * k, dim=1)


@functools.lru_cache(maxsize=32)
def causal_block_mask(T: int, device: torch.device):
    """Causal BlockMask for a [T, T] attention, built from block counts (no T x T mask materialised)."""
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-T // FLEX_BLOCK)
    rows = torch.arange(n, device=device, dtype=torch.int32)
    # q block i: partial block i (the diagonal), full blocks 0..i-1.
    kv_num = torch.ones(1, 1, n, dtype=torch.int32, device=device)
    kv_idx = rows.view(1, 1, n, 1).expand(1, 1, n, n).contiguous()
    full_num = rows.view(1, 1, n).contiguous()
    full_idx = torch.arange(n, device=device, dtype=torch.int32).view(1, 1, 1, n).expand(1, 1, n, n).contiguous()

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=causal, seq_lengths=(T, T))


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

    return torch.compile(flex_attention)  # automatic dynamic shapes after the first new length


def flex_causal_with_lse(q, k, v, block_mask):
    """(out [B, nh, T, d], natural-log lse [B, nh, T]) of causal attention, differentiable in both."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cuda":
        from torch.nn.attention import flex_attention as fa

        if hasattr(fa, "AuxRequest"):
            out, aux = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                        return_aux=fa.AuxRequest(lse=True))
            return out, aux.lse
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
    # CPU: the public API refuses backward; the higher-order op has an eager autograd path.
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
    from torch.nn.attention import flex_attention as fa

    if gqa:  # the eager path wants equal heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    options = fa._apply_kernel_options(q, k, v, True, None, None)
    out, lse, _ = flex_hop(q, k, v, fa._identity, block_mask.as_tuple(), scale, options)
    return out, lse * math.log(2.0)  # the eager op reports log2


def ttt_attention(backend: str, q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Attention of step k = len(keys) - 1. q [B, nh, T, d]; keys/values: step 0..k, each [B, nkv, T, d].

    Returns [B, T, nh*d].
    """
    B, nh, T, d = q.shape
    k_steps = len(keys) - 1
    if backend == "sdpa":
        kc = keys[0] if k_steps == 0 else torch.cat(keys, dim=2)
        vc = values[0] if k_steps == 0 else torch.cat(values, dim=2)
        out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=sdpa_step_mask(T, k_steps, q.device),
                                             enable_gqa=nh != kc.shape[1])
    elif backend == "flex_attention":
        out, lse = flex_causal_with_lse(q, keys[0], values[0], causal_block_mask(T, q.device))
        if k_steps:
            out = maybe_compiled(_merge_diagonal, q)(q, out, lse, keys[1:], values[1:])
    else:
        raise ValueError(f"training.attention_backend: unknown backend '{backend}' (choose from {BACKENDS})")
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
