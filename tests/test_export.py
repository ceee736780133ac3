"""Export: the tensor names/shapes/config fields SGLang's and vLLM's EAGLE3 loaders accept,
bit-exact round trip, and the convert tool (checkpoint -> export, vocab pruning)."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from torchspec.export import export_draft, load_exported, prune_draft_vocab
from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3

V, VD, H, HT, I = 40, 24, 32, 20, 48
NH, NKV, HD = 4, 2, 8


def make_draft(seed=0, vd=VD):
    torch.manual_seed(seed)
    cfg = DraftConfig.from_dict(dict(hidden_size=H, intermediate_size=I, num_attention_heads=NH,
                                     num_key_value_heads=NKV, head_dim=HD, rms_norm_eps=1e-5, rope_theta=5e5,
                                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                     max_position_embeddings=512, vocab_size=V, draft_vocab_size=vd,
                                     target_hidden_size=HT))
    d = LlamaForCausalLMEagle3(cfg)
    d.reset_parameters(std=0.3)
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(V, generator=g)[:vd].sort().values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[keep] = True
    d.set_vocab_map(keep - torch.arange(vd), t2d)
    return d


# The names and shapes, written out from the loaders' source (not from our module tree).
EXPECTED = {
    "fc.weight": (H, 3 * HT),
    "midlayer.input_layernorm.weight": (H,),
    "midlayer.hidden_norm.weight": (H,),
    "midlayer.post_attention_layernorm.weight": (H,),
    "midlayer.self_attn.q_proj.weight": (NH * HD, 2 * H),
    "midlayer.self_attn.k_proj.weight": (NKV * HD, 2 * H),
    "midlayer.self_attn.v_proj.weight": (NKV * HD, 2 * H),
    "midlayer.self_attn.o_proj.weight": (H, NH * HD),
    "midlayer.mlp.gate_proj.weight": (I, H),
    "midlayer.mlp.up_proj.weight": (I, H),
    "midlayer.mlp.down_proj.weight": (H, I),
    "norm.weight": (H,),
    "lm_head.weight": (VD, H),
    "d2t": (VD,),
    "t2d": (V,),
}

# vLLM Eagle3LlamaForCausalLM parameters (qkv and gate/up stacked) with their stacked shapes.
VLLM_PARAMS = {
    "model.layers.0.self_attn.qkv_proj.weight": ((NH + 2 * NKV) * HD, 2 * H),
    "model.layers.0.self_attn.o_proj.weight": (H, NH * HD),
    "model.layers.0.mlp.gate_up_proj.weight": (2 * I, H),
    "model.layers.0.mlp.down_proj.weight": (H, I),
    "model.layers.0.input_layernorm.weight": (H,),
    "model.layers.0.hidden_norm.weight": (H,),
    "model.layers.0.post_attention_layernorm.weight": (H,),
    "model.fc.weight": (H, 3 * HT),
    "model.norm.weight": (H,),
    "model.embed_tokens.weight": (V, H),
    "lm_head.weight": (VD, H),
    "draft_id_to_target_id": (VD,),
}


def vllm_name(name):
    """vLLM's load_weights renaming (llama_eagle3.py): None = skipped."""
    if "t2d" in name:
        return None
    if "d2t" in name:
        return name.replace("d2t", "draft_id_to_target_id")
    if "lm_head" not in name:
        name = "model." + name
    name = name.replace("midlayer.", "layers.0.")
    for shard, stacked in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
                           (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")):
        name = name.replace(shard, stacked)
    return name


def sglang_name(name):
    """SGLang's load_weights: d2t -> hot_token_id, t2d skipped, else name or model.<name>."""
    if "d2t" in name or "t2d" in name:
        return None
    for shard, stacked in ((".q_proj", ".qkv_proj"), (".k_proj", ".qkv_proj"), (".v_proj", ".qkv_proj"),
                           (".gate_proj", ".gate_up_proj"), (".up_proj", ".gate_up_proj")):
        name = name.replace(shard, stacked)
    return name if name == "lm_head.weight" else "model." + name


def read(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_export_names_shapes_and_loader_mappings(tmp_path):
    d = make_draft().to(torch.bfloat16)
    out = export_draft(d, tmp_path / "exp", {"num_hidden_layers": 36, "vocab_size": V, "eos_token_id": 5},
                       aux_layer_ids=[1, 17, 32])
    t = read(out)
    assert {k: tuple(v.shape) for k, v in t.items()} == EXPECTED  # frozen embeddings are not exported
    assert t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool
    assert t["lm_head.weight"].dtype == torch.bfloat16
    # every name maps onto a vLLM parameter (an unknown one fails vLLM's load) ...
    stacked_rows = {}
    for name, shape in EXPECTED.items():
        vn = vllm_name(name)
        if vn is None:
            continue
        assert vn in VLLM_PARAMS, name
        stacked_rows[vn] = stacked_rows.get(vn, 0) + shape[0]
    for vn, rows in stacked_rows.items():
        assert rows == VLLM_PARAMS[vn][0], vn
    # ... and every vLLM parameter but the shared embeddings is filled (a missing one stays at init)
    assert set(VLLM_PARAMS) - set(stacked_rows) == {"model.embed_tokens.weight"}
    sg = {sglang_name(n) for n in EXPECTED} - {None}
    assert sg == {"model.midlayer.self_attn.qkv_proj.weight", "model.midlayer.self_attn.o_proj.weight",
                  "model.midlayer.mlp.gate_up_proj.weight", "model.midlayer.mlp.down_proj.weight",
                  "model.midlayer.input_layernorm.weight", "model.midlayer.hidden_norm.weight",
                  "model.midlayer.post_attention_layernorm.weight", "model.fc.weight", "model.norm.weight",
                  "lm_head.weight"}


def test_export_config_fields_and_layer_id_conventions(tmp_path):
    from transformers import AutoConfig

    d = make_draft()
    out = export_draft(d, tmp_path / "exp", {"num_hidden_layers": 36, "vocab_size": V, "eos_token_id": 5},
                       aux_layer_ids=[1, 17, 32], dtype=torch.bfloat16)
    c = json.loads((out / "config.json").read_text())
    assert c["architectures"] == ["LlamaForCausalLMEagle3"] and c["model_type"] == "llama"
    assert (c["vocab_size"], c["draft_vocab_size"], c["target_hidden_size"]) == (V, VD, HT)
    assert c["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 17, 32]  # SGLang: output of layer k
    assert c["eagle_aux_hidden_state_layer_ids"] == [2, 18, 33]  # vLLM: state entering layer k
    assert c["torchspec"]["aux_hidden_state_layer_ids"] == [1, 17, 32]
    assert c["num_hidden_layers"] == 1 and c["tie_word_embeddings"] is False
    assert c["norm_before_residual"] is False and c["eos_token_id"] == 5
    hf = AutoConfig.from_pretrained(out)  # what both servers parse it with
    assert (hf.hidden_size, hf.num_key_value_heads, hf.head_dim, hf.intermediate_size) == (H, NKV, HD, I)
    assert hf.draft_vocab_size == VD
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    with pytest.raises(ValueError, match="target vocab_size"):
        export_draft(d, tmp_path / "bad", {"vocab_size": V + 1}, aux_layer_ids=[1, 2, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact_and_logits_identical(tmp_path, dtype):
    d = make_draft(seed=3).to(dtype)
    d.embed_tokens.weight.requires_grad_(True)  # trained embeddings are exported
    out = export_draft(d, tmp_path / "exp", None, aux_layer_ids=[0, 1, 2])
    assert "embed_tokens.weight" in read(out)
    back, cfg = load_exported(out)
    assert cfg["torchspec"]["embeddings_trained"] is True
    a, b = d.state_dict(), back.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 7), generator=g)
    aux = torch.randn(2, 7, 3 * HT, generator=g).to(dtype)
    pos = torch.arange(7).expand(2, 7)
    with torch.no_grad():
        h1, l1 = d.forward_step(ids, aux, pos, d.new_kv_cache())
        h2, l2 = back.forward_step(ids, aux, pos, back.new_kv_cache())
    assert torch.equal(l1, l2) and torch.equal(h1, h2)


def test_export_refuses_wrong_names(tmp_path):
    from torchspec.export import check_export_tensors

    cfg = make_draft().config
    shapes = dict(EXPECTED)
    check_export_tensors(shapes, cfg, with_embeddings=False)
    with pytest.raises(RuntimeError, match="missing.*hidden_norm"):
        check_export_tensors({k: v for k, v in shapes.items() if "hidden_norm" not in k}, cfg, False)
    with pytest.raises(RuntimeError, match="unknown.*layers.0"):
        check_export_tensors({**shapes, "layers.0.mlp.down_proj.weight": (H, I)}, cfg, False)


def write_checkpoint(d, ckpt, meta=None):
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in d.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / "draft_config.json").write_text(json.dumps(d.config.to_dict()))
    if meta is not None:
        (ckpt / "export_meta.json").write_text(json.dumps(meta))


def test_convert_tool_and_vocab_pruning(tmp_path):
    import sys
    sys.path.insert(0, "tools")
    import convert_to_hf

    d = make_draft(seed=5)
    ckpt = tmp_path / "ckpt"
    write_checkpoint(d, ckpt, {"aux_layer_ids": [1, 3, 4]})
    plain = convert_to_hf.main(["--input-dir", str(ckpt), "--output-dir", str(tmp_path / "plain")])
    back, cfg = load_exported(plain)
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert all(torch.equal(back.state_dict()[k], v) for k, v in d.state_dict().items() if k != "embed_tokens.weight")

    # prune to the 10 most frequent tokens (among the current draft vocab) of some counts
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 1000, (V,), generator=g)
    counts[~d.t2d] += 10_000  # the most frequent tokens overall are NOT in the draft vocab: must be skipped
    torch.save(counts, tmp_path / "counts.pt")
    out = convert_to_hf.main(["--input-dir", str(ckpt), "--output-dir", str(tmp_path / "pruned"),
                              "--prune-vocab", "10", "--token-counts", str(tmp_path / "counts.pt"),
                              "--dtype", "float32"])
    p, cfg = load_exported(out)
    assert cfg["draft_vocab_size"] == 10 and p.lm_head.weight.shape == (10, H)
    target_ids = torch.arange(10) + p.d2t  # draft id + d2t = target id
    assert torch.equal(p.t2d.nonzero().squeeze(1), target_ids.sort().values)
    assert bool(d.t2d[target_ids].all())
    in_old = torch.where(d.t2d, counts, torch.full_like(counts, -1))
    expected = torch.sort(-in_old, stable=True).indices[:10].sort().values
    assert torch.equal(target_ids.sort().values, expected)
    # the pruned draft's logits are the old draft's logits at the kept tokens
    p.load_embeddings(d.embed_tokens.weight)  # frozen embeddings are not exported: the target's are used
    ids, aux = torch.randint(0, V, (1, 6), generator=g), torch.randn(1, 6, 3 * HT, generator=g)
    pos = torch.arange(6)[None]
    with torch.no_grad():
        _, old = d.forward_step(ids, aux, pos, d.new_kv_cache())
        _, new = p.forward_step(ids, aux, pos, p.new_kv_cache())
    old_draft_id = {int(t): i for i, t in enumerate(torch.arange(VD) + d.d2t)}
    cols = torch.tensor([old_draft_id[int(t)] for t in target_ids])
    torch.testing.assert_close(new, old[..., cols], atol=1e-6, rtol=1e-6)


def test_convert_tool_user_errors(tmp_path):
    import sys
    sys.path.insert(0, "tools")
    import convert_to_hf

    with pytest.raises(SystemExit, match="--input-dir .*not a directory"):
        convert_to_hf.main(["--input-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")])
    d = make_draft()
    write_checkpoint(d, tmp_path / "ckpt")
    with pytest.raises(SystemExit, match="aux layer ids unknown"):
        convert_to_hf.main(["--input-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=re.escape("--prune-vocab 100: must be in [1, current draft_vocab_size=24]")):
        torch.save(torch.ones(V, dtype=torch.long), tmp_path / "c.pt")
        convert_to_hf.main(["--input-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "o"),
                            "--aux-layer-ids", "1,2,3", "--prune-vocab", "100",
                            "--token-counts", str(tmp_path / "c.pt")])


def test_full_vocab_export_has_no_vocab_map(tmp_path):
    """vLLM creates no draft_id_to_target_id when draft_vocab_size == vocab_size: d2t must not be written."""
    d = LlamaForCausalLMEagle3(make_draft().config.replace(draft_vocab_size=V))
    out = export_draft(d, tmp_path / "full", None, aux_layer_ids=[1, 2, 3])
    names = set(read(out))
    assert names == set(EXPECTED) - {"d2t", "t2d"}
    mapped = {vllm_name(n) for n in names} - {None}
    assert mapped <= set(VLLM_PARAMS) - {"draft_id_to_target_id"}
    back, _ = load_exported(out)
    assert bool(back.t2d.all()) and not bool(back.d2t.any())
    assert torch.equal(back.lm_head.weight, d.lm_head.weight)


def test_prune_keeps_full_vocab_identity():
    d = LlamaForCausalLMEagle3(make_draft().config.replace(draft_vocab_size=V))
    p = prune_draft_vocab(d, torch.arange(V), V)
    assert torch.equal(p.d2t, torch.zeros(V, dtype=torch.long)) and bool(p.t2d.all())
    assert torch.equal(p.lm_head.weight, d.lm_head.weight)


def test_convert_tool_prunes_from_a_dataset(tmp_path, tiny_target_dir):
    """--prune-vocab with --dataset: loss-masked token counts of the conversations (tokenized with the
    target's tokenizer and the chat template) pick the kept tokens."""
    import sys
    sys.path.insert(0, "tools")
    import convert_to_hf
    from transformers import AutoConfig, AutoTokenizer

    from torchspec.data import build_dataset, token_frequencies

    tc = AutoConfig.from_pretrained(tiny_target_dir)
    torch.manual_seed(0)
    d = LlamaForCausalLMEagle3(DraftConfig.from_target(tc))  # full vocab before pruning
    write_checkpoint(d, tmp_path / "ckpt", {"aux_layer_ids": [0, 1, 2]})
    data = tmp_path / "conv.jsonl"
    data.write_text("\n".join(json.dumps({"conversations": [
        {"from": "human", "value": f"question {i}: what is {i} + {i}?"},
        {"from": "gpt", "value": f"def add(a, b):\n    return a + b  # {2 * i}"}]}) for i in range(20)) + "\n")
    out = convert_to_hf.main(["--input-dir", str(tmp_path / "ckpt"), "--output-dir", str(tmp_path / "out"),
                              "--target-model-path", str(tiny_target_dir), "--prune-vocab", "16",
                              "--dataset", str(data), "--chat-template", "qwen"])
    p, cfg = load_exported(out)
    tok = AutoTokenizer.from_pretrained(tiny_target_dir)
    counts = token_frequencies(build_dataset(str(data), tok, chat_template="qwen", max_seq_length=8192,
                                             prompt_key="conversations", progress=False), tc.vocab_size)
    in_old = torch.where(d.t2d, counts, torch.full_like(counts, -1))
    expected = torch.sort(-in_old, stable=True).indices[:16].sort().values
    assert torch.equal((torch.arange(16) + p.d2t).sort().values, expected)
    assert int(counts[expected].min()) > 0  # the kept tokens really occur in assistant turns
    assert cfg["eos_token_id"] == tc.eos_token_id  # target fields copied from --target-model-path


@pytest.mark.parametrize("ids", [[1, 1, 0], [2, 1, 3], [1, 2]])
def test_export_refuses_aux_ids_a_server_cannot_reproduce(ids):
    from torchspec.export import export_config
    from torchspec.models.draft import DraftConfig

    cfg = DraftConfig.from_dict({
        "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64,
        "vocab_size": 40, "draft_vocab_size": 40,
    })
    with pytest.raises(ValueError, match="3 distinct, ascending aux layer ids"):
        export_config(cfg, ids)
    assert export_config(cfg, [0, 2, 5])["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]
