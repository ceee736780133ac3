import json


def test_tiny_target_is_local_and_loadable(tiny_target_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    cfg = json.loads((tiny_target_dir / "config.json").read_text())
    assert cfg["vocab_size"] == len(tiny_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_target_dir))
    ids = tiny_tokenizer("def f(x): return x", return_tensors="pt").input_ids
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == cfg["num_hidden_layers"] + 1
