import pytest
import torch

from torchspec.data.sample import Sample
from torchspec.inference.base import Engine
from torchspec.inference.hf import HFEngine, TargetLoadError, load_target
from torchspec.transfer.local import LocalStore


def _samples(vocab: int, lengths=(5, 11, 3, 8, 11)):
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=g)
        mask = (torch.arange(n) >= n // 2).to(torch.uint8)
        out.append(Sample(f"s{i}", ids, mask))
    return out


# (transformers' hidden_states[L] is the POST-norm output of the last layer, so the reference below
# holds for ids < L - 1 only; the 4-layer fixture leaves [0, 1, 2].)
@pytest.mark.parametrize("layers", [[0, 1, 2]])
def test_records_equal_transformers_hidden_states(tiny_target_dir, tmp_path, layers):
    from transformers import AutoModelForCausalLM

    model = load_target(tiny_target_dir, torch.float32, "cpu")
    store = LocalStore(root=tmp_path / "store")
    engine = HFEngine(model, store, aux_layers=layers, batch_size=3)
    assert isinstance(engine, Engine)
    # The lm_head must never run: no logits are computed, let alone leave the engine.
    model.lm_head.register_forward_hook(lambda *a: (_ for _ in ()).throw(AssertionError("lm_head ran")))
    samples = _samples(model.config.vocab_size)
    stored = engine.generate(samples)
    assert [(s.key, s.sample_id, s.length) for s in stored] == [(s.sample_id, s.sample_id, len(s)) for s in samples]

    ref = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir), dtype=torch.float32).eval()
    H = ref.config.hidden_size
    for s in samples:
        with torch.no_grad():
            hs = ref(input_ids=s.input_ids[None], output_hidden_states=True).hidden_states
        rec = store.get(s.sample_id)
        assert set(rec) == {"input_ids", "loss_mask", "aux_hidden_states", "final_hidden_states"}
        assert torch.equal(rec["input_ids"], s.input_ids) and rec["loss_mask"].dtype == torch.uint8
        assert torch.equal(rec["loss_mask"], s.loss_mask)
        assert rec["aux_hidden_states"].shape == (len(s), 3 * H)
        assert rec["aux_hidden_states"].dtype == torch.float32
        want_aux = torch.cat([hs[k + 1][0] for k in layers], dim=-1)   # id k = hidden_states[k + 1]
        torch.testing.assert_close(rec["aux_hidden_states"], want_aux, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rec["final_hidden_states"], hs[-1][0], rtol=1e-5, atol=1e-5)
    for s in samples:
        store.delete(s.sample_id)
    assert store.bytes_used() == 0
    engine.close()


def test_padded_batches_build_no_attention_mask(tiny_target_dir, tmp_path, monkeypatch):
    """A padded forward batch runs causal attention without a [B, 1, T, T] mask (B * T^2 memory), and its
    real positions equal the sample run alone."""
    import torch.nn.functional as F

    model = load_target(tiny_target_dir, torch.float32, "cpu")
    engine = HFEngine(model, LocalStore(root=tmp_path / "store"), aux_layers=[0, 1, 2], batch_size=3)
    samples = _samples(model.config.vocab_size, lengths=(9, 10, 11))
    assert [len(c) for c in engine.chunks(samples)] == [3]             # one padded batch
    masks = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kw):
        masks.append(kw.get("attn_mask"))
        assert not torch.backends.cuda.cudnn_sdp_enabled()   # cuDNN plans per shape: ~5 ms host per call
        return sdpa(*args, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    aux, final = engine._forward(samples)
    assert masks and all(m is None for m in masks), [None if m is None else tuple(m.shape) for m in masks]
    for j, s in enumerate(samples):
        a1, f1 = engine._forward([s])
        n = len(s)
        torch.testing.assert_close(aux[j, :n], a1[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final[j, :n], f1[0], rtol=1e-5, atol=1e-5)
    engine.close()


def test_default_aux_layers_and_bad_layers(tiny_target_dir, tmp_path):
    model = load_target(tiny_target_dir, torch.float32, "cpu")
    L = model.config.num_hidden_layers
    store = LocalStore(root=tmp_path / "store")
    engine = HFEngine(model, store)
    assert L == 4 and engine.aux_layers == [0, 1, 2]  # the formula's [1, 1, 0] would repeat a layer
    engine.close()
    with pytest.raises(ValueError, match=r"\[1, 1, 0\]: need 3 distinct, ascending"):
        HFEngine(model, store, aux_layers=[1, 1, 0])
    with pytest.raises(ValueError, match=r"inference.aux_hidden_states_layers=\[1, 2, 4\]"):
        HFEngine(model, store, aux_layers=[1, 2, L])


def test_missing_target_path_names_the_key(tmp_path):
    with pytest.raises(TargetLoadError, match="model.target_model_path=.*not a local directory"):
        load_target(str(tmp_path / "nowhere"), torch.float32, "cpu")


def test_default_aux_layers_formula_and_small_targets():
    from torchspec.models import default_aux_layers

    assert default_aux_layers(36) == [1, 17, 32]  # Qwen3-8B: [1, L//2 - 1, L - 4]
    assert default_aux_layers(8) == [1, 3, 4]
    for L in range(3, 129):
        a, b, c = default_aux_layers(L)
        assert 0 <= a < b < c < L, L


def test_forward_batches_bound_padding():
    """Samples go to the target sorted by length, in batches whose padding stays under PAD_WASTE."""
    from types import SimpleNamespace

    from torchspec.inference.hf import PAD_WASTE

    engine = HFEngine.__new__(HFEngine)
    engine.batch_size, engine.free_tokens = 4, 0
    lengths = [300, 20, 22, 1500, 310, 25, 21, 320, 900, 24]
    samples = [SimpleNamespace(input_ids=torch.zeros(n), sample_id=str(i)) for i, n in enumerate(lengths)]
    chunks = engine.chunks(samples)
    assert sorted(s.sample_id for c in chunks for s in c) == sorted(s.sample_id for s in samples)
    for c in chunks:
        ns = [int(s.input_ids.numel()) for s in c]
        assert ns == sorted(ns) and len(ns) <= 4
        assert len(ns) == 1 or len(ns) * max(ns) <= PAD_WASTE * sum(ns)
    assert [[int(s.input_ids.numel()) for s in c] for c in chunks] == [[20, 21, 22, 24], [25], [300, 310, 320],
                                                                       [900, 1500]]   # 3000 <= 1.25 x 2400


def test_launch_bound_forwards_pad_freely(tiny_target_dir):
    """On a GPU a small target's forward costs its launches, not its tokens: batches merge up to
    launch_bound_tokens padded tokens (then PAD_WASTE rules again); off CUDA nothing changes."""
    from types import SimpleNamespace

    from torchspec.inference.hf import GPU_FLOPS, LAUNCH_S_PER_LAYER, launch_bound_tokens

    model = load_target(tiny_target_dir, torch.float32, "cpu")
    params = sum(p.numel() for p in model.parameters())
    free = launch_bound_tokens(model, torch.device("cuda"))
    assert free == int(LAUNCH_S_PER_LAYER * GPU_FLOPS * model.config.num_hidden_layers / (2 * params))
    assert launch_bound_tokens(model, torch.device("cpu")) == 0
    big = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=36),
                          parameters=lambda: [torch.empty(1).expand(8_000_000_000)])
    assert 300 < launch_bound_tokens(big, torch.device("cuda")) < 600          # an 8B target: ~450 tokens

    engine = HFEngine.__new__(HFEngine)
    engine.batch_size, engine.free_tokens = 8, 4000
    lengths = [300, 20, 22, 1500, 310, 25, 21, 320, 900, 24]
    samples = [SimpleNamespace(input_ids=torch.zeros(n), sample_id=str(i)) for i, n in enumerate(lengths)]
    assert [[int(s.input_ids.numel()) for s in c] for c in engine.chunks(samples)] == [
        [20, 21, 22, 24, 25, 300, 310, 320], [900, 1500]]     # 8 x 320 <= 4000; 1500 x 2 = 3000 <= 4000
