"""TTT attention without [T, (k+1)T] masks: every backend off CUDA equals an explicit-mask reference (outputs and
gradients, padded and packed rows, GQA), and the memory of a TTT training step grows linearly with T."""

import math
import sys
from pathlib import Path

import pytest
import torch

from torchspec.models.attention import AttentionMasks, causal_with_lse, doc_causal, ttt_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_ttt_cpu import measure_in_subprocess  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def reference(doc, q, keys, values):
    """fp64, explicit mask over the concatenated keys of all steps: step-0 keys of the same document at rows
    <= t, then step j's key at row t (the formulation the old `sdpa` path built as a [T, (k+1)T] mask)."""
    B, nh, T, d = q.shape
    g = nh // keys[0].shape[1]
    kc = torch.cat(keys, 2).double().repeat_interleave(g, 1)
    vc = torch.cat(values, 2).double().repeat_interleave(g, 1)
    eye = torch.eye(T, dtype=torch.bool).expand(B, 1, T, T)
    mask = torch.cat([doc_causal(doc)] + [eye] * (len(keys) - 1), dim=-1)
    s = (q.double() @ kc.transpose(-1, -2)) / d ** 0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ vc


DOCS = {
    "padded": torch.tensor([[1] * 11, [1] * 7 + [0] * 4, [1] * 3 + [0] * 8]),
    "packed": torch.tensor([[1] * 4 + [2] + [3] * 5 + [0]]),
    "same_length_rows": torch.ones(2, 9, dtype=torch.long),
}


def _inputs(doc, k_steps, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T = doc.shape
    q = (torch.randn(B, 4, T, 8, generator=g) * 2).to(dtype).requires_grad_()
    keys = [(torch.randn(B, 2, T, 8, generator=g) * 2).to(dtype).requires_grad_() for _ in range(k_steps + 1)]
    values = [torch.randn(B, 2, T, 8, generator=g).to(dtype).requires_grad_() for _ in range(k_steps + 1)]
    return q, keys, values


@pytest.mark.parametrize("layout", list(DOCS))
@pytest.mark.parametrize("k_steps", [0, 1, 3])
@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
def test_backend_outputs_and_grads_equal_the_explicit_mask_reference(backend, k_steps, layout):
    doc = DOCS[layout]
    B, T = doc.shape
    q, keys, values = _inputs(doc, k_steps, torch.float32)
    real = (doc > 0)[:, :, None, None].expand(B, T, 4, 8)           # padded positions are never read
    weight = torch.randn(B, T, 4, 8, generator=torch.Generator().manual_seed(1)) * real
    got = ttt_attention(AttentionMasks(backend, doc), q, keys, values).view(B, T, 4, 8)
    want = reference(doc, q, keys, values).transpose(1, 2)
    torch.testing.assert_close(got[real], want[real].float(), atol=1e-5, rtol=1e-5)
    leaves = [q] + keys + values
    g_got = torch.autograd.grad((got * weight).sum(), leaves)
    g_want = torch.autograd.grad((want * weight.double()).sum(), leaves)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b.float(), atol=1e-5, rtol=1e-5)


def test_sdpa_keeps_the_diagonal_scores_precise_in_bf16():
    """The diagonal scores ride in bf16 columns of q split in high and low parts: the bf16 result is as
    close to the exact one (from the same bf16 inputs) as the flex path's fp32 merge is."""
    doc = DOCS["packed"]
    q, keys, values = _inputs(doc, 3, torch.bfloat16, seed=3)
    want = reference(doc, q, keys, values).transpose(1, 2).flatten(2)
    real = (doc > 0)[..., None]
    err = {b: (ttt_attention(AttentionMasks(b, doc), q, keys, values).double() - want).abs().masked_select(real).max()
           for b in ("sdpa", "flex_attention")}
    assert err["sdpa"] < 2e-2 and err["sdpa"] <= 1.5 * err["flex_attention"] + 1e-3, err


def test_chunked_causal_lse_matches_logsumexp_of_the_full_scores(monkeypatch):
    """Off CUDA the flex path's step-0 attention runs in query chunks (here 16 rows each, 3 chunks)."""
    monkeypatch.setattr("torchspec.models.attention.CHUNK_SCORES", 16 * 4 * 40)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    out, lse = causal_with_lse(q, k, v)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8 ** 0.5
    s = s.masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v.repeat_interleave(2, 1))


# ---- memory of a whole TTT step (tiny draft, ttt_length 7, one row), each in a fresh subprocess ----------------
# Linear growth: 4x the tokens may take at most LINEAR_TOL x 4 the peak memory (a [T, T] tensor would take 16x).
LINEAR_TOL = 1.25


@pytest.fixture(scope="module")
def sdpa_peaks():
    return {T: measure_in_subprocess("sdpa", T, ttt_length=7, timeout=600) for T in (4096, 8192, 16384)}


@pytest.mark.slow
def test_sdpa_step_memory_grows_linearly_from_4k_to_16k(sdpa_peaks):
    peak = {T: r["peak_mib"] for T, r in sdpa_peaks.items()}
    assert peak[8192] <= LINEAR_TOL * 2 * peak[4096], peak
    assert peak[16384] <= LINEAR_TOL * 4 * peak[4096], peak


@pytest.mark.slow
def test_flex_off_cuda_step_memory_grows_linearly():
    peak = {T: measure_in_subprocess("flex_attention", T, ttt_length=7, timeout=600)["peak_mib"] for T in (1024, 4096)}
    assert peak[4096] <= LINEAR_TOL * 4 * peak[1024], peak


@pytest.mark.slow
def test_a_32k_token_ttt7_step_runs(sdpa_peaks):
    r = measure_in_subprocess("sdpa", 32768, ttt_length=7, timeout=900)
    assert r["peak_mib"] <= LINEAR_TOL * 8 * sdpa_peaks[4096]["peak_mib"], (r, sdpa_peaks)


def test_auto_backend_is_flex_on_cuda_and_sdpa_elsewhere():
    doc = torch.ones(1, 8, dtype=torch.long)
    assert AttentionMasks("auto", doc).backend == "sdpa"
    if torch.cuda.is_available():
        assert AttentionMasks("auto", doc.cuda()).backend == "flex_attention"
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        AttentionMasks("flash", doc)


@pytest.mark.gpu
def test_compiled_flex_trains_on_rows_of_any_length_and_layout():
    """The compiled flex path, forward and backward, on rows of varying length, under 128 tokens too (a packed
    row of a few short conversations: inductor's default picked its decoding kernel there, which has no valid
    configuration with gradients and stopped a run mid-way on an H100), with q/k/v as separate projections
    or as views of one fused buffer: the explicit mask's numbers every time."""
    from torchspec.models.attention import flex_with_lse

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    torch.manual_seed(0)
    nh, nkv, d = 4, 2, 32
    widths = [nh * d, nkv * d, nkv * d]
    for i, T in enumerate([200, 333, 1024, 77, 20, 513, 100]):
        doc = torch.ones(1, T, dtype=torch.long, device="cuda")
        doc[0, T // 3:] = 2
        if i % 2:   # views of one fused buffer [1, T, 256]
            leaves = [torch.randn(1, T, sum(widths), device="cuda", dtype=torch.bfloat16, requires_grad=True)]
            parts = leaves[0].split(widths, dim=-1)
        else:       # three separate projections
            leaves = parts = [torch.randn(1, T, w, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                              for w in widths]
        q, k, v = (p.reshape(1, T, -1, d).transpose(1, 2) for p in parts)
        out, lse = flex_with_lse(q, k, v, AttentionMasks("flex_attention", doc).block_mask)
        (out.float().square().sum() + lse.sum()).backward()
        grads = leaves[0].grad.split(widths, -1) if i % 2 else [p.grad for p in leaves]

        ref = [p.detach().float().requires_grad_() for p in parts]   # explicit doc-causal mask, fp32
        rq, rk, rv = (p.reshape(1, T, -1, d).transpose(1, 2) for p in ref)
        scores = (rq @ rk.repeat_interleave(nh // nkv, 1).transpose(-1, -2)) / math.sqrt(d)
        scores = scores.masked_fill(~doc_causal(doc), float("-inf"))
        ref_out, ref_lse = scores.softmax(-1) @ rv.repeat_interleave(nh // nkv, 1), scores.logsumexp(-1)
        (ref_out.square().sum() + ref_lse.sum()).backward()
        assert rel(out, ref_out) < 2e-2 and rel(lse, ref_lse) < 1e-2, T
        for name, g, r in zip("qkv", grads, ref):
            assert rel(g, r.grad) < 3e-2, (T, name, rel(g, r.grad))
