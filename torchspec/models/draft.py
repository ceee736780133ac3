"""The EAGLE-3 draft model: one Llama decoder layer fed by concat(norm(embed), norm(hidden)).

Module and buffer names are exactly the tensor names SGLang's and vLLM's EAGLE3 loaders accept
(`midlayer.*`, `fc.weight`, `norm.weight`, `lm_head.weight`, `d2t`, `t2d`, `embed_tokens.weight`),
so `state_dict()` is the export format. The training forward (TTT over several steps) lives in
`torchspec.models.eagle3`; `forward_step` is the serving-style inference step with a KV cache.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchspec.models.draft_config import SUPPORTED_ROPE_TYPES, DraftConfig, rope_inv_freq  # noqa: F401 (re-exported)

class _RMSNormFn(torch.autograd.Function):
    """weight * (x / rms(x)) computed in fp32 and rounded to x's dtype (as transformers' Llama), saving
    only x and the fp32 1/rms for backward instead of autograd's several fp32 copies of x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x.float() * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (gy * xhat.to(x.dtype)).float().reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            g = (gy * weight).float()
            gx = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return gx, gw, None


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]; cos/sin [T, d] or [B, 1, T, d]."""
    return x * cos + rotate_half(x) * sin


class Eagle3Attention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(2 * cfg.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """The `midlayer`: attention over concat(input_layernorm(embeds), hidden_norm(hidden)), then MLP.

    The residual stream starts at `hidden` (the fc output or the previous step's output), as in
    SGLang/vLLM; the layer's output is the PRE-final-norm residual stream.
    """

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Eagle3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def qkv(self, embeds, hidden, cos, sin):
        """q [B, nh, T, d], k/v [B, nkv, T, d] (RoPE applied to q and k)."""
        a = self.self_attn
        x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        B, T, _ = x.shape
        q = a.q_proj(x).view(B, T, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    # The training path splits the q/k/v projection of concat(e, h) into W_e e + W_h h: the embedding
    # half of every TTT step is a row-shifted slice of one projection over the sequence (computed once),
    # and no concatenated [T, 2H] input exists. Same function as `qkv` (a test holds them equal).
    def split_qkv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_e, W_h), each [(nh + 2 nkv) * d, H]: the q/k/v rows acting on the embedding / hidden half."""
        a = self.self_attn
        H = self.hidden_norm.weight.shape[0]
        ws = (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight)
        return torch.cat([w[:, :H] for w in ws]), torch.cat([w[:, H:] for w in ws])

    def embed_projection(self, embeds: torch.Tensor, w_embed: torch.Tensor) -> torch.Tensor:
        """input_layernorm(embeds) @ W_e^T: [B, L, (nh + 2 nkv) * d]."""
        return F.linear(self.input_layernorm(embeds), w_embed)

    def qkv_from_parts(self, embed_proj, hidden, w_hidden, cos, sin):
        """`qkv` given the embedding half already projected (embed_proj [B, T, (nh + 2 nkv) * d])."""
        a = self.self_attn
        B, T, _ = hidden.shape
        nq, nkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        qkv = F.linear(self.hidden_norm(hidden), w_hidden) + embed_proj
        q = qkv[..., :nq].reshape(B, T, a.num_heads, a.head_dim).transpose(1, 2)
        k = qkv[..., nq:nq + nkv].reshape(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = qkv[..., nq + nkv:].reshape(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def finish(self, attn: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """attn [B, T, nh*d] -> o_proj + residual, MLP + residual; returns the pre-norm stream."""
        h = hidden + self.self_attn.o_proj(attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class DraftKVCache:
    """Keys (RoPE applied) and values of every position fed so far; shared length over the batch."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def crop(self, n: int) -> None:
        """Forget every entry past the first n (rollback of rejected draft tokens)."""
        if self.k is not None:
            self.k, self.v = self.k[:, :, :n], self.v[:, :, :n]


class LlamaForCausalLMEagle3(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        config.check()
        self.config = config
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.embed_tokens.weight.requires_grad_(False)  # from the target, frozen by default
        self.fc = nn.Linear(3 * config.target_hidden_size, H, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(H, config.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.draft_vocab_size, bias=False)
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True  # identity map until set_vocab_map
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", t2d)
        inv_freq, self.rope_scale = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        nn.init.normal_(self.embed_tokens.weight, std=std)

    # ---- vocab / embeddings -----------------------------------------------------------------------
    @torch.no_grad()
    def set_vocab_map(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        c = self.config
        if d2t.shape != (c.draft_vocab_size,) or t2d.shape != (c.vocab_size,):
            raise ValueError(f"vocab map shapes d2t {tuple(d2t.shape)} / t2d {tuple(t2d.shape)} do not match "
                             f"draft_vocab_size={c.draft_vocab_size} / vocab_size={c.vocab_size}")
        self.d2t.copy_(d2t.long())
        self.t2d.copy_(t2d.bool())

    @torch.no_grad()
    def load_embeddings(self, weight: torch.Tensor) -> None:
        if weight.shape != self.embed_tokens.weight.shape:
            raise ValueError(f"target embeddings {tuple(weight.shape)} do not match the draft's "
                             f"{tuple(self.embed_tokens.weight.shape)} (vocab_size, hidden_size)")
        self.embed_tokens.weight.copy_(weight)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    @property
    def embeddings_trained(self) -> bool:
        return self.embed_tokens.weight.requires_grad

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict without the frozen embeddings (they come from the target)."""
        sd = self.state_dict()
        if not self.embeddings_trained:
            sd.pop("embed_tokens.weight")
        return sd

    def load_checkpoint_state_dict(self, sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        own = self.state_dict()
        optional = {"embed_tokens.weight"}  # from the target when frozen
        if self.config.draft_vocab_size == self.config.vocab_size:
            optional |= {"d2t", "t2d"}  # identity map: exports of full-vocab drafts omit them
        missing = sorted(set(own) - set(sd) - optional)
        unknown = sorted(set(sd) - set(own))
        if missing or unknown:
            raise ValueError(f"{source}: tensors do not match the draft config (missing {missing}, unknown {unknown})")
        for k, v in sd.items():
            if v.shape != own[k].shape:
                raise ValueError(f"{source}: tensor '{k}' has shape {tuple(v.shape)}, the draft config "
                                 f"expects {tuple(own[k].shape)}")
        self.load_state_dict(sd, strict=False)

    # ---- positions ----------------------------------------------------------------------------------
    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.rope_scale).to(dtype), (emb.sin() * self.rope_scale).to(dtype)

    def project_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """fc(aux) for target aux features [.., 3*H_t]; the draft's own hidden [.., H] passes through."""
        c = self.config
        if 3 * c.target_hidden_size == c.hidden_size:
            raise ValueError("3*target_hidden_size == hidden_size: raw aux and draft hidden are ambiguous")
        if hidden.shape[-1] == 3 * c.target_hidden_size:
            return self.fc(hidden.to(self.fc.weight.dtype))
        if hidden.shape[-1] != c.hidden_size:
            raise ValueError(f"hidden has width {hidden.shape[-1]}; expected 3*target_hidden_size="
                             f"{3 * c.target_hidden_size} (aux) or hidden_size={c.hidden_size}")
        return hidden

    # ---- training forward (TTT): see torchspec.models.eagle3 --------------------------------------
    def forward(self, **kwargs):
        from torchspec.models.eagle3 import ttt_forward

        return ttt_forward(self, **kwargs)

    # ---- inference ------------------------------------------------------------------------------------
    def new_kv_cache(self) -> DraftKVCache:
        return DraftKVCache()

    def forward_step(self, input_ids: torch.Tensor, hidden: torch.Tensor, position_ids: torch.Tensor,
                     kv_cache: DraftKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """One serving-style draft forward over n new positions.

        input_ids [B, n] (token x_{t+1} at the row of position t), hidden [B, n, 3*H_t] (target aux
        features, fc applied here) or [B, n, H] (the draft's own previous output), position_ids
        [B, n]. Appends to `kv_cache`; returns (pre-norm hidden [B, n, H], draft logits [B, n, V_draft]).
        """
        hidden = self.project_hidden(hidden)
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)
        cos, sin = self.rope(position_ids, hidden.dtype)
        q, k, v = self.midlayer.qkv(embeds, hidden, cos[:, None], sin[:, None])
        past = kv_cache.length
        keys, values = kv_cache.append(k, v)
        n = q.shape[2]
        mask = torch.ones(n, past + n, dtype=torch.bool, device=q.device).tril(diagonal=past)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                              enable_gqa=q.shape[1] != keys.shape[1])
        attn = attn.transpose(1, 2).reshape(q.shape[0], n, -1)
        out = self.midlayer.finish(attn, hidden)
        return out, self.lm_head(self.norm(out))


def build_draft(config: DraftConfig, target_head=None, vocab_map: Optional[dict[str, Any]] = None,
                train_embeddings: bool = False) -> LlamaForCausalLMEagle3:
    """A fresh draft: embeddings copied from the target head (if given), vocab map installed."""
    draft = LlamaForCausalLMEagle3(config)
    if target_head is not None and getattr(target_head, "embed_tokens", None) is not None:
        draft.load_embeddings(target_head.embed_tokens)
    if vocab_map is not None:
        draft.set_vocab_map(vocab_map["d2t"], vocab_map["t2d"])
    draft.embed_tokens.weight.requires_grad_(train_embeddings)
    return draft


__all__ = ["DraftConfig", "LlamaForCausalLMEagle3", "DraftKVCache", "build_draft", "rope_inv_freq", "RMSNorm"]
