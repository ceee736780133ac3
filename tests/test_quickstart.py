"""The quickstart's target and data stages, at a tiny scale (the full run is `bash scripts/quickstart.sh`)."""

import json

from torchspec.data.quickstart_assets import DataRecipe, TargetRecipe, _cached, build_data, build_target, split_corpus

TINY = TargetRecipe(corpus_chars=80_000, vocab_size=320, hidden_size=32, num_hidden_layers=4,
                    num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, seq_len=32,
                    batch_size=8, warmup_steps=5, max_steps=40, train_seconds=60.0)


def test_target_learns_and_is_cached(tmp_path):
    info = build_target(tmp_path / "target", TINY)
    assert info["steps"] > 0
    assert info["heldout_loss"] < info["initial_heldout_loss"] - 0.3  # learned something real
    weights = tmp_path / "target" / "model.safetensors"
    cfg = json.loads((tmp_path / "target" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and cfg["num_hidden_layers"] == 4
    mtime = weights.stat().st_mtime_ns
    again = build_target(tmp_path / "target", TINY)  # a second run skips the build
    assert again == info and weights.stat().st_mtime_ns == mtime
    assert _cached(tmp_path / "target", {**info["recipe"], "hidden_size": 64}) is None  # a new recipe rebuilds


def test_conversations_hold_out_whole_files(tmp_path, tiny_tokenizer):
    from torchspec.data import build_dataset

    recipe = DataRecipe(max_train=50, max_eval=10)
    info = build_data(tmp_path / "data", TINY, recipe)
    train = [json.loads(x) for x in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "data" / "eval.jsonl").read_text().splitlines()]
    assert (len(train), len(held)) == (info["train"], info["eval"]) == (50, 10)
    train_texts, held_texts = split_corpus(TINY)
    for conv in held:
        answer = conv["conversations"][1]["value"]
        assert any(answer in t for t in held_texts) and not any(answer in t for t in train_texts)
    samples = build_dataset(tmp_path / "data" / "eval.jsonl", tiny_tokenizer, chat_template="qwen",
                            max_seq_length=256, prompt_key="conversations", progress=False)
    assert len(samples) == 10 and all(int(s.loss_mask.sum()) > 20 for s in samples)
    assert build_data(tmp_path / "data", TINY, recipe) == info  # cached
