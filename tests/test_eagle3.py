"""The Eagle3 TTT forward + loss against a deliberately naive reference written from the contract
(ARCHITECTURE.md, "The Eagle3 contract"): explicit loops over samples, steps and rows, full
attention over the concatenated keys with an explicit per-row key list."""

import math
import warnings

import pytest
import torch

from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3
from torchspec.models.eagle3 import STEP_DECAY, eagle3_loss
from torchspec.models.target_head import TargetHead

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

V, V_DRAFT, H_T = 48, 32, 24


def tiny_cfg(**kw):
    d = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256, vocab_size=V,
             draft_vocab_size=V_DRAFT, target_hidden_size=H_T)
    d.update(kw)
    return DraftConfig.from_dict(d)


def make_setup(seed=0, dtype=torch.float32, B=3, T=13):
    """Draft with a permuted pruned vocab, a target head, and a right-padded batch with garbage padding."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    draft = LlamaForCausalLMEagle3(tiny_cfg())
    draft.reset_parameters(std=0.2)  # larger weights: non-trivial attention patterns and argmaxes
    with torch.no_grad():
        for n, p in draft.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5, generator=g)
    draft.embed_tokens.weight.requires_grad_(True)  # exercise the embeddings' gradient too
    keep = torch.randperm(V, generator=g)[:V_DRAFT].sort().values  # draft vocab = these target ids
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[keep] = True
    draft.set_vocab_map(keep - torch.arange(V_DRAFT), t2d)
    head = TargetHead(torch.randn(V, H_T, generator=g) * 0.7)
    lengths = [T, T - 4, T - 7][:B]
    batch = dict(
        input_ids=torch.randint(0, V, (B, T), generator=g),
        loss_mask=(torch.rand(B, T, generator=g) < 0.7).long(),
        attention_mask=torch.zeros(B, T, dtype=torch.long),
        aux_hidden_states=torch.randn(B, T, 3 * H_T, generator=g),
        final_hidden_states=torch.randn(B, T, H_T, generator=g),
    )
    for b, n in enumerate(lengths):
        batch["attention_mask"][b, :n] = 1
    draft = draft.to(dtype)
    head = head.to(dtype)
    batch["aux_hidden_states"] = batch["aux_hidden_states"].to(dtype)
    batch["final_hidden_states"] = batch["final_hidden_states"].to(dtype)
    return draft, head, batch


# ------------------------------------------------------------------------------------------------
# The naive reference: nothing vectorised across rows, steps or samples.
def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean() + eps))


def _rope(x, pos, theta):  # x [d] of one head; first-half / second-half pairing (Llama)
    d = x.shape[0]
    half = d // 2
    out = torch.empty_like(x)
    for i in range(half):
        ang = pos * theta ** (-(2 * i) / d)
        c, s = math.cos(ang), math.sin(ang)
        out[i] = x[i] * c - x[i + half] * s
        out[i + half] = x[i + half] * c + x[i] * s
    return out


def naive_reference(draft, head, batch, K, alignment="eagle"):
    """Returns (loss, [loss_k], [acc_k], [n_k], logits[(b, k, t)]) from the contract, row by row."""
    c = draft.config
    m = draft.midlayer
    nh, nkv, d, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    draft_ids = torch.arange(c.draft_vocab_size) + draft.d2t  # draft id i -> target id
    sums, counts, correct = [0.0] * K, [0] * K, [0] * K
    all_logits = {}
    for b in range(batch["input_ids"].shape[0]):
        L = int(batch["attention_mask"][b].sum())
        x = batch["input_ids"][b]
        lm = batch["loss_mask"][b]
        hidden = {t: draft.fc.weight.float() @ batch["aux_hidden_states"][b, t].float() for t in range(L)}
        keys = {}  # (step, row) -> (k [nkv, d], v [nkv, d])
        for k in range(K):
            rows = range(L - 1 - k)  # the rows that have a target at this step
            qs, new_hidden = {}, {}
            for t in rows:
                e = _rms(draft.embed_tokens.weight[x[t + 1 + k]].float(), m.input_layernorm.weight.float(), eps)
                h = _rms(hidden[t], m.hidden_norm.weight.float(), eps)
                inp = torch.cat([e, h])
                q = (m.self_attn.q_proj.weight.float() @ inp).view(nh, d)
                kk = (m.self_attn.k_proj.weight.float() @ inp).view(nkv, d)
                vv = (m.self_attn.v_proj.weight.float() @ inp).view(nkv, d)
                pos = t + k
                qs[t] = torch.stack([_rope(q[i], pos, c.rope_theta) for i in range(nh)])
                keys[(k, t)] = (torch.stack([_rope(kk[i], pos, c.rope_theta) for i in range(nkv)]), vv)
            for t in rows:
                visible = [keys[(0, j)] for j in range(t + 1)] + [keys[(s, t)] for s in range(1, k + 1)]
                heads = []
                for i in range(nh):
                    g = i // (nh // nkv)
                    scores = torch.stack([(qs[t][i] * kv[0][g]).sum() / math.sqrt(d) for kv in visible])
                    w = torch.softmax(scores, dim=0)
                    heads.append(sum(w[j] * visible[j][1][g] for j in range(len(visible))))
                attn = torch.cat(heads)
                r = hidden[t] + m.self_attn.o_proj.weight.float() @ attn
                z = _rms(r, m.post_attention_layernorm.weight.float(), eps)
                gate = m.mlp.gate_proj.weight.float() @ z
                up = m.mlp.up_proj.weight.float() @ z
                out = r + m.mlp.down_proj.weight.float() @ (torch.nn.functional.silu(gate) * up)
                new_hidden[t] = out
                logits = draft.lm_head.weight.float() @ _rms(out, draft.norm.weight.float(), eps)
                all_logits[(b, k, t)] = logits
                # supervision of row t at step k: target p_{t+1+k}
                tgt = head.lm_head.float() @ batch["final_hidden_states"][b, t + 1 + k].float()
                if alignment == "eagle":
                    supervised = bool(lm[t + k])
                else:
                    supervised = t + 2 + k < L and bool(lm[t + 2 + k])
                if not supervised or not bool(draft.t2d[int(tgt.argmax())]):
                    continue
                p = torch.softmax(tgt[draft_ids], dim=0)
                logq = torch.log_softmax(logits, dim=0)
                sums[k] = sums[k] - (p * logq).sum()
                counts[k] += 1
                correct[k] += int(int(logits.argmax()) == int(p.argmax()))
            hidden = new_hidden
    losses = [sums[k] / max(counts[k], 1) for k in range(K)]
    loss = sum(STEP_DECAY ** k * losses[k] for k in range(K))
    accs = [correct[k] / max(counts[k], 1) for k in range(K)]
    return loss, losses, accs, counts, all_logits


def grads_of(draft, loss):
    draft.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in draft.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alignment", ["eagle", "serving"])
@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
def test_loss_accs_and_grads_match_naive_reference_fp32(alignment, backend):
    K = 3
    draft, head, batch = make_setup(seed=1)
    ref_loss, ref_losses, ref_accs, ref_n, _ = naive_reference(draft, head, batch, K, alignment)
    ref_grads = grads_of(draft, ref_loss)
    out = eagle3_loss(draft, head, batch, K, backend, loss_mask_alignment=alignment)
    got_grads = grads_of(draft, out.loss)

    assert out.num_valid == ref_n
    assert all(n > 0 for n in ref_n)
    # the draft-vocab check must have excluded some loss-masked rows, or this test proves little
    supervised = sum(int(batch["loss_mask"][b, t]) for b in range(3)
                     for t in range(int(batch["attention_mask"][b].sum()) - 1))
    assert out.num_valid[0] < supervised
    torch.testing.assert_close(out.loss, ref_loss.detach(), atol=1e-5, rtol=1e-5)
    for k in range(K):
        torch.testing.assert_close(out.losses[k], ref_losses[k].detach(), atol=1e-5, rtol=1e-5)
        assert abs(float(out.accs[k]) - ref_accs[k]) < 1e-6
    assert set(got_grads) == set(ref_grads) and len(got_grads) == 14  # embeddings trainable here
    for n in ref_grads:
        torch.testing.assert_close(got_grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_sdpa_equals_flex_fp32_and_bf16():
    for dtype, tol in [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)]:
        draft, head, batch = make_setup(seed=2, dtype=dtype)
        res = {}
        for backend in ["sdpa", "flex_attention"]:
            out = eagle3_loss(draft, head, batch, 4, backend)
            res[backend] = (out, grads_of(draft, out.loss))
        (a, ga), (b, gb) = res["sdpa"], res["flex_attention"]
        torch.testing.assert_close(a.loss, b.loss, atol=tol, rtol=tol)
        assert a.num_valid == b.num_valid
        for n in ga:
            scale = ga[n].float().abs().max().clamp_min(1e-6)
            assert (ga[n].float() - gb[n].float()).abs().max() / scale < (1e-5 if dtype == torch.float32 else 5e-2), n


def test_bf16_close_to_fp32_reference():
    K = 3
    draft, head, batch = make_setup(seed=3)
    ref_loss, *_ = naive_reference(draft, head, batch, K)
    draft16, head16 = draft.to(torch.bfloat16), head.to(torch.bfloat16)
    b16 = dict(batch, aux_hidden_states=batch["aux_hidden_states"].bfloat16(),
               final_hidden_states=batch["final_hidden_states"].bfloat16())
    out = eagle3_loss(draft16, head16, b16, K, "flex_attention")
    assert out.loss.dtype == torch.float32
    assert abs(float(out.loss) - float(ref_loss)) / float(ref_loss) < 3e-2


def test_each_row_depends_only_on_its_own_sample():
    """Per-step loss sums / correct counts of a padded batch == the sums over one-sample batches;
    gradients agree; garbage in the padding changes neither loss nor gradients."""
    K = 3
    draft, head, batch = make_setup(seed=4)
    B = batch["input_ids"].shape[0]

    def single(b, k_steps=K):
        n = int(batch["attention_mask"][b].sum())
        return eagle3_loss(draft, head, {k: v[b:b + 1, :n] for k, v in batch.items()}, k_steps, "sdpa")

    full = eagle3_loss(draft, head, batch, K, "sdpa")
    singles = [single(b) for b in range(B)]
    for k in range(K):
        torch.testing.assert_close(full.loss_sums[k], sum(s.loss_sums[k] for s in singles), atol=1e-5, rtol=1e-5)
        assert float(full.correct[k]) == sum(float(s.correct[k]) for s in singles)
        assert full.num_valid[k] == sum(s.num_valid[k] for s in singles)

    # gradients (one step, where the pooled mean is a plain n_b/N mix of the single losses)
    full1 = eagle3_loss(draft, head, batch, 1, "sdpa")
    g_full = grads_of(draft, full1.loss)
    g_mix = {}
    for b in range(B):
        out = single(b, 1)
        g = grads_of(draft, out.loss * out.num_valid[0] / full1.num_valid[0])
        g_mix = {n: g_mix.get(n, 0) + g[n] for n in g}
    for n in g_full:
        torch.testing.assert_close(g_full[n], g_mix[n], atol=1e-6, rtol=1e-4)

    # garbage in the padded positions changes nothing (loss and all gradients, K steps)
    noisy = {k: v.clone() for k, v in batch.items()}
    pad = noisy["attention_mask"] == 0
    noisy["input_ids"][pad] = 7
    noisy["loss_mask"][pad] = 1
    noisy["aux_hidden_states"][pad] = 1e3
    noisy["final_hidden_states"][pad] = -1e3
    for backend in ["sdpa", "flex_attention"]:
        clean = eagle3_loss(draft, head, batch, K, backend)
        g_clean = grads_of(draft, clean.loss)
        again = eagle3_loss(draft, head, noisy, K, backend)
        g_noisy = grads_of(draft, again.loss)
        torch.testing.assert_close(again.loss, clean.loss, atol=1e-6, rtol=1e-6)
        for n in g_clean:
            torch.testing.assert_close(g_noisy[n], g_clean[n], atol=1e-6, rtol=1e-5)
