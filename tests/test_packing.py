"""Sequence packing: several samples in one row give exactly the loss, metrics and gradients of the same
samples right-padded, and the attention masks keep every document to itself."""


import pytest
import torch

from test_eagle3 import grads_of, make_setup, naive_reference
from torchspec.models.attention import AttentionMasks, doc_block_mask, doc_causal
from torchspec.models.eagle3 import doc_positions, eagle3_loss, step_validity
from torchspec.transfer.batch import RECORD_KEYS, collate

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def records_of(batch) -> list[dict]:
    """The padded batch's samples as store records (each cut to its length)."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        out.append({k: batch[k][b, :n] for k in RECORD_KEYS})
    return out


def test_collate_packs_documents_in_one_row():
    _, _, batch = make_setup(seed=0)
    recs = records_of(batch)
    packed = collate(recs, pack=True)
    lengths = [int(r["input_ids"].shape[0]) for r in recs]
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["attention_mask"][0].tolist() == sum(([i + 1] * n for i, n in enumerate(lengths)), [])
    assert doc_positions(packed["attention_mask"])[0].tolist() == sum((list(range(n)) for n in lengths), [])
    padded = collate(recs, pack=False)
    for k in ("input_ids", "loss_mask", "attention_mask"):
        torch.testing.assert_close(padded[k], batch[k].where(batch["attention_mask"].bool(), 0).to(padded[k].dtype))


@pytest.mark.parametrize("alignment", ["eagle", "serving"])
@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
def test_packed_equals_padded_loss_metrics_and_grads(alignment, backend):
    K = 4
    draft, head, batch = make_setup(seed=3, B=3, T=17)
    padded = collate(records_of(batch), pack=False)
    packed = collate(records_of(batch), pack=True)
    a = eagle3_loss(draft, head, padded, K, backend, loss_mask_alignment=alignment)
    ga = grads_of(draft, a.loss)
    b = eagle3_loss(draft, head, packed, K, backend, loss_mask_alignment=alignment)
    gb = grads_of(draft, b.loss)
    assert a.num_valid == b.num_valid and all(n > 0 for n in a.num_valid)
    torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)
    for k in range(K):
        torch.testing.assert_close(b.losses[k], a.losses[k], atol=1e-6, rtol=1e-6)
        assert float(b.correct[k]) == float(a.correct[k])
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-6, rtol=1e-5, msg=n)
    # and both equal the contract's naive reference, sample by sample
    ref_loss, _, _, ref_n, _ = naive_reference(draft, head, batch, K, alignment)
    assert b.num_valid == ref_n
    torch.testing.assert_close(b.loss, ref_loss.detach(), atol=1e-5, rtol=1e-5)


def test_packed_rows_never_cross_documents():
    """A document's loss and gradients do not depend on its neighbours in the row."""
    K = 3
    draft, head, batch = make_setup(seed=4, B=3, T=15)
    recs = records_of(batch)
    alone = eagle3_loss(draft, head, collate(recs[1:2], pack=True), K, "sdpa")
    g_alone = grads_of(draft, alone.loss)
    # the same document between two others whose content is garbage, and only it supervised
    noisy = [{k: v.clone() for k, v in r.items()} for r in (recs[0], recs[1], recs[2])]
    for r in (noisy[0], noisy[2]):
        r["loss_mask"].zero_()
        r["aux_hidden_states"].fill_(1e3)
        r["input_ids"].fill_(7)
    mixed = eagle3_loss(draft, head, collate(noisy, pack=True), K, "sdpa")
    g_mixed = grads_of(draft, mixed.loss)
    assert mixed.num_valid == alone.num_valid
    torch.testing.assert_close(mixed.loss, alone.loss, atol=1e-6, rtol=1e-6)
    for n in g_alone:
        torch.testing.assert_close(g_mixed[n], g_alone[n], atol=1e-6, rtol=1e-5, msg=n)


def test_step_validity_stops_at_document_ends():
    doc = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0]])
    lm = torch.ones_like(doc)
    v = step_validity(lm, doc, 3, "eagle")
    assert v[0, 0].tolist() == [1, 1, 0, 1, 1, 1, 0, 0]
    assert v[1, 0].tolist() == [1, 0, 0, 1, 1, 0, 0, 0]
    assert v[2, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("lengths", [[300], [100, 28, 129, 1, 255], [128, 128, 128], [5, 500]])
def test_flex_block_mask_is_the_document_causal_mask(lengths):
    """The block mask's block lists and mask_mod admit exactly doc_causal (flex's eager forward on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    doc = torch.repeat_interleave(torch.arange(1, len(lengths) + 1), torch.tensor(lengths))[None]
    T = doc.shape[1]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 16, generator=g) for _ in range(3))
    got = flex_attention(q, k, v, block_mask=doc_block_mask(doc))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=doc_causal(doc))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_masks_are_built_per_batch():
    """What a batch's attention needs is its rows' document runs (no T x T mask); unknown backends are refused."""
    m = AttentionMasks("sdpa", torch.tensor([[1, 1, 2, 2, 0], [1, 1, 1, 0, 0]]))
    assert m.runs == [[(0, 2, True), (2, 4, True), (4, 5, False)], [(0, 3, True), (3, 5, False)]]
    assert not m.shared_runs
    assert AttentionMasks("sdpa", torch.ones(2, 6, dtype=torch.long)).shared_runs
    with pytest.raises(ValueError, match="training.attention_backend"):
        AttentionMasks("xformers", torch.ones(1, 3))


@pytest.mark.parametrize("pack", [True, False])
def test_training_pack_samples_reaches_the_trainer(tmp_path, tiny_target_dir, monkeypatch, pack):
    """training.pack_samples decides the batches the pipeline trains on: one packed row, or one row per sample."""
    import torchspec.transfer.batch as batch_mod
    from pipeline_helpers import tiny_run_config
    from torchspec.pipeline.runner import run_training

    shapes, real = [], batch_mod.collate

    def spy(records, *, pack):
        out = real(records, pack=pack)
        shapes.append((len(records), tuple(out["input_ids"].shape), int(out["attention_mask"].max())))
        return out

    monkeypatch.setattr(batch_mod, "collate", spy)
    cfg = tiny_run_config(tmp_path, tiny_target_dir, num_epochs=1)
    cfg.training.pack_samples = pack
    run_training(cfg, progress=False)
    train = [s for s in shapes if s[0] == cfg.training.micro_batch_size]
    assert train
    for n, shape, max_doc in train:
        assert (shape[0], max_doc) == ((1, n) if pack else (n, 1))
