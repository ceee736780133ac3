"""TargetInfo: the target's facts derived once (text config, shape, aux layers, draft vocab), and the
rules it owns (the aux-layer default and check, vLLM's numbering, the text-config unwrap, the
draft-vocab precedence). Everything here is built locally: no downloads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from torchspec.config import ConfigError, load_config
from torchspec.config.target import (AUX_LAYERS_KEY, TargetInfo, TargetLoadError, check_aux_layers,
                                     default_aux_layers, resolve_aux_layers, resolve_draft_vocab_size,
                                     text_config_of, to_vllm_layer_ids)

REQUIRED_SET = ["model.target_model_path=Qwen/Qwen3-8B", "dataset.train_data_path=data.jsonl"]


def llm_dict(layers=36, hidden=64, vocab=300, **extra):
    return {"num_hidden_layers": layers, "hidden_size": hidden, "vocab_size": vocab, **extra}


# ---------------------------------------------------------------- the aux-layer rule


@pytest.mark.parametrize("L, expected", [
    (36, [1, 17, 32]),   # Qwen3-8B: [1, L//2 - 1, L - 4]
    (32, [1, 15, 28]),
    (61, [1, 29, 57]),   # Kimi-K2 / DeepSeek-V3
    (8, [1, 3, 4]),
    (7, [1, 2, 3]),      # the smallest L where the formula is ascending
    (6, [0, 2, 4]),      # smaller targets: [0, L//2 - 1, L - 2] ...
    (5, [0, 1, 3]),
    (4, [0, 1, 2]),      # ... else [0, 1, 2]
    (3, [0, 1, 2]),
])
def test_default_rule(L, expected):
    assert default_aux_layers(L) == expected
    info = TargetInfo.from_dict(llm_dict(layers=L))
    assert info.aux_layers == tuple(expected) and info.num_hidden_layers == L


def test_default_rule_is_always_valid_and_needs_three_layers():
    for L in range(3, 200):
        assert check_aux_layers(default_aux_layers(L), L) == default_aux_layers(L)
    with pytest.raises(ValueError, match=f"at least 3 layers, got 2; set {AUX_LAYERS_KEY}"):
        TargetInfo.from_dict(llm_dict(layers=2))


@pytest.mark.parametrize("ids, why", [
    ([1, 1, 5], "duplicate"),
    ([5, 3, 1], "descending"),
    ([1, 5, 3], "out of order"),
    ([1, 5, 36], "out of range (L = 36)"),
    ([-1, 5, 9], "negative"),
    ([1, 5], "two ids"),
])
def test_validation_errors_name_the_key(ids, why):
    with pytest.raises(ValueError, match=rf"^inference\.aux_hidden_states_layers=\[.*\]: need 3 distinct, ascending"):
        TargetInfo.from_dict(llm_dict(layers=36), aux_layers=ids)
    with pytest.raises(ValueError, match=r"in \[0, 35\] for this 36-layer target"):
        resolve_aux_layers(ids, 36)


def test_configured_ids_are_kept_and_checked_against_the_target():
    info = TargetInfo.from_dict(llm_dict(layers=36), aux_layers=[2, 17, 35])
    assert info.aux_layers == (2, 17, 35)
    assert TargetInfo.from_dict(llm_dict(layers=36), aux_layers=["2", 17.0, 35]).aux_layers == (2, 17, 35)
    with pytest.raises(ValueError, match=r"^aux layer ids=\[2, 17, 36\]"):  # a tool's own key in the message
        TargetInfo.from_dict(llm_dict(layers=36), aux_layers=[2, 17, 36], key="aux layer ids")


def test_config_validation_uses_the_same_check():
    """validate_config applies the one check (without L): duplicates and descending ids fail at load time,
    naming the key and where it was set."""
    for ids in ("[1,1,5]", "[5,3,1]", "[-1,2,3]", "[1,2]"):
        with pytest.raises(ConfigError, match=rf"^inference\.aux_hidden_states_layers=.*need 3 distinct, ascending"
                                              r".*\(or null for the default\) \(command line\)"):
            load_config([], [*REQUIRED_SET, f"inference.aux_hidden_states_layers={ids}"])
    cfg = load_config([], [*REQUIRED_SET, "inference.aux_hidden_states_layers=[1,17,32]"])
    assert cfg.inference.aux_hidden_states_layers == [1, 17, 32]


def test_vllm_numbering_is_ours_plus_one():
    assert to_vllm_layer_ids([1, 17, 32]) == [2, 18, 33]
    info = TargetInfo.from_dict(llm_dict(layers=36))
    assert info.vllm_aux_layers == (2, 18, 33)
    assert TargetInfo.from_dict(llm_dict(layers=4)).vllm_aux_layers == (1, 2, 3)


def test_old_import_paths_are_the_same_rule():
    import torchspec.models as models
    from torchspec.inference import hf

    assert models.default_aux_layers is default_aux_layers and models.check_aux_layers is check_aux_layers
    assert models.to_vllm_layer_ids is to_vllm_layer_ids
    assert hf.resolve_aux_layers is resolve_aux_layers and hf.TargetLoadError is TargetLoadError
    assert hf.resolve_aux_layers(None, 36) == [1, 17, 32]


# ---------------------------------------------------------------- the text-config unwrap


def _qwen2_vl():
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(text_config=dict(vocab_size=300, hidden_size=64, num_hidden_layers=12,
                                          num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                          bos_token_id=1, eos_token_id=2))


def _llava():
    from transformers import LlamaConfig, LlavaConfig

    return LlavaConfig(text_config=LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=8,
                                               num_attention_heads=4, intermediate_size=64))


@pytest.mark.parametrize("make, L, H, V", [(_qwen2_vl, 12, 64, 300), (_llava, 8, 32, 200)])
def test_vlm_config_object_unwraps_to_its_language_model(make, L, H, V):
    config = make()
    text = text_config_of(config)
    assert text is config.get_text_config() and text is not config
    info = TargetInfo.from_target_config(config)
    assert (info.num_hidden_layers, info.hidden_size, info.vocab_size) == (L, H, V)
    assert info.aux_layers == tuple(default_aux_layers(L)) and info.text_config is text and info.config is config
    # the same target as a config.json dict: the same facts
    as_json = json.loads(config.to_json_string())
    assert TargetInfo.from_dict(as_json) == info
    assert text_config_of(as_json) == as_json["text_config"]


def test_plain_configs_are_their_own_text_config():
    from transformers import LlamaConfig

    llama = LlamaConfig(vocab_size=96, hidden_size=32, num_hidden_layers=6, num_attention_heads=4,
                        intermediate_size=64)
    assert text_config_of(llama) is llama
    plain = llm_dict()
    assert text_config_of(plain) is plain
    assert text_config_of({**plain, "text_config": None}) == {**plain, "text_config": None}
    ns = SimpleNamespace(text_config=SimpleNamespace(**plain))   # an object without get_text_config
    assert text_config_of(ns) is ns.text_config
    assert TargetInfo.from_target_config(ns).num_hidden_layers == 36
    assert text_config_of(None) is None


def test_vlm_consumers_read_the_language_model():
    """The draft shape and the export's target fields come from the language model's config."""
    from torchspec.export import _target_dict
    from torchspec.models.draft import DraftConfig

    config = _qwen2_vl()
    d = DraftConfig.from_target(config)
    assert (d.hidden_size, d.vocab_size, d.draft_vocab_size, d.target_hidden_size) == (64, 300, 300, 64)
    assert DraftConfig.from_target(json.loads(config.to_json_string())) == d   # a config.json dict too
    assert _target_dict(config)["num_hidden_layers"] == 12 and _target_dict(config)["eos_token_id"] == 2
    assert _target_dict(json.loads(config.to_json_string()))["num_hidden_layers"] == 12


def test_missing_fields_and_unreadable_targets():
    with pytest.raises(ConfigError, match="target config: missing 'vocab_size'"):
        TargetInfo.from_dict({"num_hidden_layers": 4, "hidden_size": 8})
    with pytest.raises(TypeError, match="needs a dict"):
        TargetInfo.from_dict(SimpleNamespace(**llm_dict()))


def test_from_pretrained_and_from_config(tiny_target_dir, tmp_path):
    raw = json.loads((tiny_target_dir / "config.json").read_text())
    info = TargetInfo.from_pretrained(tiny_target_dir)
    assert info == TargetInfo.from_dict(raw)
    assert (info.num_hidden_layers, info.aux_layers) == (4, (0, 1, 2))
    with pytest.raises(TargetLoadError, match=r"model.target_model_path=.*has no readable model config"):
        TargetInfo.from_pretrained(tmp_path / "nowhere")

    cfg = load_config([], [f"model.target_model_path={tiny_target_dir}", "dataset.train_data_path=data.jsonl",
                           "inference.aux_hidden_states_layers=[0,2,3]"])
    info = TargetInfo.from_config(cfg)
    assert info.aux_layers == (0, 2, 3) and info.vllm_aux_layers == (1, 3, 4)
    assert info.draft_vocab_size == info.vocab_size == raw["vocab_size"]


def test_a_key_missing_from_a_local_config_json_is_named_not_defaulted(tiny_target_dir, tmp_path):
    """transformers fills a missing hidden_size with its class default (4096): the shape the weights lack. A text
    target's own keys are checked; a multimodal config's text_config may leave sizes to its class (llava-1.5)."""
    import shutil

    from torchspec.config.target import _check_target_keys

    target = tmp_path / "target"
    shutil.copytree(tiny_target_dir, target)
    raw = json.loads((target / "config.json").read_text())
    del raw["hidden_size"]
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(TargetLoadError) as e:
        TargetInfo.from_pretrained(target)
    assert str(e.value) == (f"model.target_model_path: {target / 'config.json'}: missing 'hidden_size'; a target's "
                            "config.json states the language model's shape")
    text = json.loads((tiny_target_dir / "config.json").read_text())
    vlm = {"model_type": "llava", "text_config": {k: v for k, v in text.items() if k != "hidden_size"}}
    (target / "config.json").write_text(json.dumps(vlm))
    _check_target_keys(target / "config.json")   # nested: the class default is the model's own


# ---------------------------------------------------------------- the draft-vocab precedence


def test_draft_vocab_precedence():
    assert resolve_draft_vocab_size(64, 128, 1000) == 64      # training.draft_vocab_size wins
    assert resolve_draft_vocab_size(None, 128, 1000) == 128   # else the draft config's
    assert resolve_draft_vocab_size(None, None, 1000) == 1000  # else the full vocabulary
    assert resolve_draft_vocab_size(None, 0, 1000) == 1000    # a 0 in a draft JSON means unset
    t = llm_dict(vocab=1000)
    assert TargetInfo.from_dict(t).draft_vocab_size == 1000
    assert TargetInfo.from_dict(t, draft_config_vocab=128).draft_vocab_size == 128
    assert TargetInfo.from_dict(t, draft_vocab_size=64, draft_config_vocab=128).draft_vocab_size == 64


def test_draft_vocab_precedence_in_config_plan_and_build(tmp_path, tiny_target_dir):
    """The three readers agree: TargetInfo.from_config, the pipeline's draft config, the dry-run plan."""
    from torchspec.config.plan import draft_memory_estimate
    from torchspec.pipeline.build import draft_config_for

    draft_json = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "head_dim": 16, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 256}
    vocab = json.loads((tiny_target_dir / "config.json").read_text())["vocab_size"]
    base = [f"model.target_model_path={tiny_target_dir}", "dataset.train_data_path=data.jsonl"]

    def run(draft_value, configured):
        path = tmp_path / f"draft_{draft_value}_{configured}.json"
        path.write_text(json.dumps({**draft_json, "vocab_size": vocab,
                                    **({"draft_vocab_size": draft_value} if draft_value else {})}))
        over = [f"model.draft_model_config={path}"]
        if configured:
            over.append(f"training.draft_vocab_size={configured}")
        cfg = load_config([], [*base, *over])
        info = TargetInfo.from_config(cfg)
        built = draft_config_for(cfg, None).draft_vocab_size
        plan = draft_memory_estimate({**draft_json, "vocab_size": vocab,
                                      **({"draft_vocab_size": draft_value} if draft_value else {})}, cfg)
        plan_full = draft_memory_estimate({**draft_json, "vocab_size": vocab, "draft_vocab_size": built}, cfg)
        assert plan == plan_full   # the plan sized the lm_head with the same draft vocab
        assert info.draft_vocab_size == built
        return built

    assert run(None, None) == vocab
    assert run(40, None) == 40
    assert run(40, 24) == 24
    assert run(None, 24) == 24
