"""The Eagle3 training forward (test-time training over `ttt_length` steps) and its loss.

Implements the contract in docs/architecture.md ("The Eagle3 contract"); nothing here knows about
ranks, Ray or stores. A batch row holds one right-padded sample (`attention_mask[b, t] = 1` for
t < len_b, then 0) or several packed ones: `attention_mask` numbers the documents of a row 1, 2, ...
(0 = padding). Positions (RoPE), attention and every TTT shift stay inside a document: a packed batch
gives the loss and gradients of the same samples unpacked (a test holds them equal).

Row t of step k (k = 0..K-1) reads token x_{t+1+k}, position t+k (t counted from its document's start), hidden = fc(g_t) at k = 0 and
the draft's own pre-norm output of step k-1 after; it is trained toward p_{t+1+k} (the target's
distribution for x_{t+2+k}). Supervised ("valid") rows: t+1+k inside the same document, and
  loss_mask_alignment "eagle":   loss_mask[t+k] = 1                (EAGLE / SpecForge convention)
                      "serving": t+2+k in the document and loss_mask[t+2+k] = 1  (the predicted token is an
                                                                     assistant token)
and the target's argmax over the FULL vocab at position t+1+k lies in the draft vocab.
loss_k = mean over valid rows of -sum_v p(v) log q_k(v); loss = sum_k 0.8^k loss_k;
acc_k = mean over valid rows of [argmax q_k == argmax p].

Memory: target probabilities exist only for positions some step needs (draft vocab, computed in
chunks); the draft lm_head + softmax + loss + their gradients run chunk by chunk over valid rows
only (`_DraftHeadLoss`), so no [rows, vocab] logits tensor outlives one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint

from torchspec.config.schema import LOSS_MASK_ALIGNMENTS, TrainingConfig
from torchspec.models.attention import AttentionMasks, maybe_compiled, ttt_attention

STEP_DECAY = 0.8  # loss weight of TTT step k is STEP_DECAY**k (the EAGLE-3 recipe)
CHUNK_ELEMENTS = 1 << 27  # rows per lm_head chunk ~ CHUNK_ELEMENTS / draft_vocab_size


@dataclass
class Eagle3Output:
    loss: torch.Tensor  # scalar, differentiable: sum_k 0.8^k loss_k
    losses: list[torch.Tensor]  # detached loss_k (0 where a step has no valid row)
    accs: list[torch.Tensor]  # detached acc_k (0 where a step has no valid row)
    num_valid: list[int]  # valid rows per step
    loss_sums: list[torch.Tensor]  # detached sum over valid rows of the step-k loss (for exact pooling)
    correct: list[torch.Tensor]  # detached number of valid rows whose argmax agrees


# A pytree node, so module hooks that look for tensors in a forward's output (FSDP2 registers its
# pre-backward hook, and with it the gradient reduce-scatter, on them) find `loss` inside it.
torch.utils._pytree.register_dataclass(Eagle3Output)


@dataclass
class Eagle3Targets:
    valid: torch.Tensor  # bool [K, B, T]
    probs: torch.Tensor  # [N, V_draft] target probs of the needed positions
    prob_row: torch.Tensor  # long [B*T]: row of `probs` holding flat position b*T+t (-1: none)
    rows: list[torch.Tensor]  # per step k: long flat positions b*T+t of its valid rows, ascending
    p_rows: list[torch.Tensor]  # per step k: the `probs` row of each of those rows (position +1+k)
    live: list[torch.Tensor]  # per step k: flat positions valid at some step >= k, ascending


def step_weights(ttt_length: int) -> list[float]:
    """The weight of each TTT step's loss in the total: STEP_DECAY ** k."""
    return [STEP_DECAY ** k for k in range(ttt_length)]


def total_loss(step_losses) -> float:
    """sum_k STEP_DECAY^k loss_k: the one definition of the total loss (the training forward computes the same
    sum differentiably, with these weights, inside _DraftHeadLoss)."""
    return sum(w * loss for w, loss in zip(step_weights(len(step_losses)), step_losses))


def same_doc_ahead(doc: torch.Tensor, n: int) -> torch.Tensor:
    """bool [B, T]: position t + n exists and lies in t's document (padding, document 0, has none)."""
    out = torch.zeros_like(doc, dtype=torch.bool)
    if n < doc.shape[1]:
        out[:, : doc.shape[1] - n] = (doc[:, n:] == doc[:, :-n]) & (doc[:, :-n] > 0)
    return out


def doc_positions(doc: torch.Tensor) -> torch.Tensor:
    """long [B, T]: each position's offset from the start of its document (padding: from where it starts)."""
    B, T = doc.shape
    t = torch.arange(T, device=doc.device).expand(B, T)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    return t - torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values


def step_validity(loss_mask: torch.Tensor, attention_mask: torch.Tensor, ttt_length: int,
                  alignment: str) -> torch.Tensor:
    """bool [K, B, T]: rows supervised at each step, before the draft-vocab (argmax) check.

    attention_mask: 1/0 (one right-padded sample per row) or document numbers 1, 2, ... (packed rows)."""
    if alignment not in LOSS_MASK_ALIGNMENTS:
        raise ValueError(f"training.loss_mask_alignment: unknown value '{alignment}' "
                         f"(choose from {LOSS_MASK_ALIGNMENTS})")
    doc = attention_mask.long()
    lm = loss_mask.bool() & (doc > 0)
    valid = torch.zeros(ttt_length, *doc.shape, dtype=torch.bool, device=loss_mask.device)
    for k in range(ttt_length):
        has_target = same_doc_ahead(doc, 1 + k)
        if alignment == "eagle":   # loss_mask[t+k]: inside the document whenever t+1+k is
            valid[k] = has_target & _shift_left(lm, k)
        else:
            valid[k] = has_target & same_doc_ahead(doc, k + 2) & _shift_left(lm, k + 2)
    return valid


def _shift_left(x: torch.Tensor, n: int) -> torch.Tensor:
    """x[:, t + n] at column t, zero-filled past the end."""
    out = torch.zeros_like(x)
    if n < x.shape[1]:
        out[:, : x.shape[1] - n] = x[:, n:]
    return out


@torch.no_grad()
def prepare_targets(target_head, final_hidden_states: torch.Tensor, loss_mask: torch.Tensor,
                    attention_mask: torch.Tensor, d2t: torch.Tensor, t2d: torch.Tensor, ttt_length: int,
                    alignment: str) -> Eagle3Targets:
    """Target probs (draft vocab) for the positions some step supervises, and the final valid masks."""
    valid = step_validity(loss_mask, attention_mask, ttt_length, alignment)
    K, B, T = valid.shape
    needed = torch.zeros(B, T, dtype=torch.bool, device=valid.device)
    for k in range(K):  # step k at row t needs position t+1+k
        if T > 1 + k:
            needed[:, 1 + k:] |= valid[k][:, : T - 1 - k]
    pos = needed.flatten().nonzero().squeeze(1)
    f = final_hidden_states.reshape(B * T, -1)[pos]
    in_draft, probs = target_head.draft_probs(f, d2t, t2d)
    prob_row = torch.full((B * T,), -1, dtype=torch.long, device=valid.device)
    prob_row[pos] = torch.arange(pos.numel(), device=valid.device)
    ok = torch.zeros(B * T, dtype=torch.bool, device=valid.device)
    ok[pos] = in_draft
    ok = ok.view(B, T)
    for k in range(K):
        valid[k] &= _shift_left(ok, 1 + k)
    # Every step's valid rows at once, so the TTT forward and backward never wait on the host.
    flat = valid.view(K, B * T)
    # a row's step-k output is needed only if the row is valid at step k or later (it feeds its own row only)
    live = valid.flip(0).cummax(0).values.flip(0).view(K, B * T)
    counts = torch.cat([flat.sum(1), live.sum(1)]).tolist()
    rows = list(flat.nonzero()[:, 1].split(counts[:K]))
    p_rows = [prob_row[r + 1 + k] for k, r in enumerate(rows)]
    return Eagle3Targets(valid=valid, probs=probs, prob_row=prob_row, rows=rows, p_rows=p_rows,
                         live=list(live.nonzero()[:, 1].split(counts[K:])))


def _head_chunk(hc, weight, probs, p_idx, scale, want_grad: bool):
    """One chunk of rows: (sum of -sum_v p log q, #argmax agreements, d(scale * loss)/dlogits or None).

    The target rows p = probs[p_idx] are gathered inside (no separate copy of them)."""
    z = hc @ weight.T
    logq = torch.log_softmax(z.float(), dim=-1)
    p = probs[p_idx].float()
    loss = -(p * logq).sum()
    correct = (z.argmax(-1) == p.argmax(-1)).sum()
    gz = ((logq.exp() * p.sum(-1, keepdim=True) - p) * scale).to(hc.dtype) if want_grad else None
    return loss, correct, gz


class _DraftHeadLoss(torch.autograd.Function):
    """sum_k w_k/n_k * sum_rows -sum_v p log softmax(h W^T), chunked; gradients made in the forward.

    Inputs: `meta` = (probs, per-step prob-row indices, per-step weights w_k), weight W [V_d, H],
    then one tensor of normed hidden rows [n_k, H] per step. Returns (loss, stats [K, 2]) where
    stats[k] = (sum of row losses, number of correct argmax) — not differentiable.
    The weight gradient accumulates in fp32 for fp32 weights, else in the weights' dtype (as
    autograd would sum per-step bf16 gradients).
    """

    @staticmethod
    def forward(ctx, meta, weight, *hs):
        probs, p_rows, step_w = meta
        chunk_fn = maybe_compiled(_head_chunk, weight)
        want_w = ctx.needs_input_grad[1]
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_hs = []
        stats = torch.zeros(len(hs), 2, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=weight.device)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
        for k, h in enumerate(hs):
            n = h.shape[0]
            # a 0-d device tensor: a Python float would be a compile-time constant (a recompile per value)
            scale = torch.full((), step_w[k] / max(n, 1), dtype=torch.float32, device=weight.device)
            want_h = ctx.needs_input_grad[2 + k]
            gh = torch.empty_like(h) if want_h else None
            for s in range(0, n, rows):
                hc = h[s:s + rows]
                loss, correct, gz = chunk_fn(hc, weight, probs, p_rows[k][s:s + rows], scale, want_h or want_w)
                stats[k, 0] += loss
                stats[k, 1] += correct
                if want_h:
                    torch.mm(gz, weight, out=gh[s:s + rows])
                if want_w:
                    grad_w.addmm_(gz.T, hc)
            total = total + scale * stats[k, 0]
            grad_hs.append(gh)
        ctx.grad_w = grad_w
        ctx.grad_hs = grad_hs
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx, g_total, g_stats):
        gw = None if ctx.grad_w is None else ctx.grad_w * g_total.to(ctx.grad_w.dtype)
        ghs = [None if g is None else g * g_total.to(g.dtype) for g in ctx.grad_hs]
        ctx.grad_w = ctx.grad_hs = None
        return (None, gw, *ghs)


def _finish_rows(layer, attn: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """layer.finish (o_proj, MLP, residuals) on the flat rows `rows` only; the other rows keep `hidden`
    (their output reaches no loss: a row feeds only its own row of later steps)."""
    B, T, H = hidden.shape
    flat = hidden.reshape(B * T, H)
    out = layer.finish(attn.reshape(B * T, -1)[rows], flat[rows])
    return flat.index_copy(0, rows, out).view(B, T, H)


def _norm_rows(norm, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """norm(hidden) of the flat rows `rows` of hidden [B, T, H]: [len(rows), H]."""
    return norm(hidden.reshape(-1, hidden.shape[-1])[rows])


def ttt_forward(draft, *, input_ids: torch.Tensor, aux_hidden_states: torch.Tensor, targets: Eagle3Targets,
                ttt_length: int, attention_backend: str, gradient_checkpointing: bool,
                checkpoint_steps: Optional[int] = None, attention_mask: Optional[torch.Tensor] = None) -> Eagle3Output:
    """The TTT unroll of `draft` over a batch (attention_mask: 1/0 right padding or packed document
    numbers; None = every row one full-length sample); returns the weighted loss and metrics.

    Step k's token embeddings are those of step 0 shifted k rows, so the embedding half of the
    q/k/v projection is computed once over T + K - 1 positions and sliced per step.
    With gradient_checkpointing, the decoder layer of each TTT step is recomputed in backward
    (only its inputs, keys and values are kept); checkpoint_steps limits that to the first N steps
    (None = all), trading memory for speed in between.
    """
    n_ckpt = (ttt_length if checkpoint_steps is None else checkpoint_steps) if gradient_checkpointing else 0
    B, T = input_ids.shape
    layer = draft.midlayer
    qkv_fn = maybe_compiled(type(layer).qkv_from_parts, input_ids)
    finish_fn = maybe_compiled(_finish_rows, input_ids)
    norm_fn = maybe_compiled(_norm_rows, input_ids)
    hidden = draft.fc(aux_hidden_states.to(draft.fc.weight.dtype))
    dtype = hidden.dtype
    doc = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    masks = AttentionMasks(attention_backend, doc)
    positions = doc_positions(doc)
    cos_all, sin_all = draft.rope(torch.arange(T + ttt_length - 1, device=input_ids.device), dtype)
    w_embed, w_hidden = layer.split_qkv_weights()
    # position j holds token x_{j+1} (0 past the end): step k reads positions k .. k+T-1
    ids = torch.cat([input_ids[:, 1:], input_ids.new_zeros(B, ttt_length)], dim=1)
    embed_proj = maybe_compiled(type(layer).embed_projection, input_ids)(
        layer, draft.embed_tokens(ids).to(dtype), w_embed)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    hs = []
    for k in range(ttt_length):
        cos, sin = cos_all[positions + k].unsqueeze(1), sin_all[positions + k].unsqueeze(1)   # [B, 1, T, d]
        n_prev = len(keys)

        def step(e_proj, hidden, cos, sin, *kv, n_prev=n_prev, live=targets.live[k]):  # bound now: recomputation runs later
            q, kk, vv = qkv_fn(layer, e_proj, hidden, w_hidden, cos, sin)
            attn = ttt_attention(masks, q, list(kv[:n_prev]) + [kk], list(kv[n_prev:]) + [vv])
            return finish_fn(layer, attn, hidden, live), kk, vv

        args = (embed_proj[:, k:k + T], hidden, cos, sin, *keys, *values)
        if k < n_ckpt and torch.is_grad_enabled():
            hidden, kk, vv = checkpoint(step, *args, use_reentrant=False)
        else:
            hidden, kk, vv = step(*args)
        keys.append(kk)
        values.append(vv)
        hs.append(norm_fn(draft.norm, hidden, targets.rows[k]))
    weights = step_weights(ttt_length)
    loss, stats = _DraftHeadLoss.apply((targets.probs, targets.p_rows, weights), draft.lm_head.weight, *hs)
    num_valid = [h.shape[0] for h in hs]
    denom = [max(n, 1) for n in num_valid]
    return Eagle3Output(
        loss=loss,
        losses=[stats[k, 0] / denom[k] for k in range(ttt_length)],
        accs=[stats[k, 1] / denom[k] for k in range(ttt_length)],
        num_valid=num_valid,
        loss_sums=[stats[k, 0] for k in range(ttt_length)],
        correct=[stats[k, 1] for k in range(ttt_length)],
    )


def eagle3_loss(draft, target_head, batch: dict, ttt_length: int, attention_backend: str, *,
                loss_mask_alignment: str = TrainingConfig.loss_mask_alignment,
                gradient_checkpointing: bool = TrainingConfig.gradient_checkpointing,
                checkpoint_steps: Optional[int] = None) -> Eagle3Output:
    """Target probs from the frozen target head, then `draft(...)` (the TTT forward) on the batch.

    batch: input_ids [B,T], loss_mask [B,T], attention_mask [B,T] (1/0 right padding, or packed document
    numbers), aux_hidden_states [B,T,3H_t], final_hidden_states [B,T,H_t].
    """
    targets = prepare_targets(target_head, batch["final_hidden_states"], batch["loss_mask"],
                              batch["attention_mask"], draft.d2t, draft.t2d, ttt_length, loss_mask_alignment)
    return draft(input_ids=batch["input_ids"], aux_hidden_states=batch["aux_hidden_states"], targets=targets,
                 attention_mask=batch["attention_mask"], ttt_length=ttt_length, attention_backend=attention_backend,
                 gradient_checkpointing=gradient_checkpointing, checkpoint_steps=checkpoint_steps)


__all__ = ["Eagle3Output", "Eagle3Targets", "doc_positions", "eagle3_loss", "prepare_targets", "step_validity",
           "step_weights", "total_loss", "ttt_forward", "STEP_DECAY"]
