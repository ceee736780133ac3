"""Images in conversations: parsing (OpenAI parts, ShareGPT images), template placeholders, loss mask, errors."""

import base64
import io
import json

import pytest
import torch

from torchspec.data import build_dataset
from torchspec.data.errors import DataError
from torchspec.data.formats import load_conversations
from torchspec.data.multimodal import IMAGE_MARK
from torchspec.data.templates import get_template

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def _png(path, size=(30, 20), color=(200, 10, 10)):
    from PIL import Image

    Image.new("RGB", size, color).save(path)
    return path


def _data_uri(size=(8, 8)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (0, 90, 0)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture(scope="module")
def vl_tokenizer(tmp_path_factory, tiny_tokenizer):
    from torchspec.utils.tiny import make_tiny_vlm

    _, tok, _ = make_tiny_vlm(tmp_path_factory.mktemp("vlm"), tokenizer=tiny_tokenizer, num_hidden_layers=2)
    return tok


def _openai(url_a, url_b=None, reply="It is red."):
    parts = [{"type": "text", "text": "Look: "}, {"type": "image_url", "image_url": {"url": url_a}}]
    if url_b:
        parts += [{"type": "text", "text": " and "}, {"type": "image_url", "image_url": {"url": url_b}}]
    parts.append({"type": "text", "text": " What colour?"})
    return {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": reply}]}


def test_openai_parts_local_file_uri_and_data_uri_kept_in_order(tmp_path):
    a = _png(tmp_path / "a.png")
    (tmp_path / "imgs").mkdir()
    b = _png(tmp_path / "imgs" / "b.png")
    data = _write(tmp_path / "d.jsonl", [_openai("a.png", f"file://{b}"), _openai(_data_uri())])
    c1, c2 = load_conversations([data], "messages")
    assert c1.images == (str(a.resolve()), str(b.resolve()))   # relative paths: relative to the data file
    assert c1.messages[0]["content"] == f"Look: {IMAGE_MARK} and {IMAGE_MARK} What colour?"
    assert c2.images[0].startswith("data:image/png;base64,")
    assert "images" not in c1.messages[1]


def test_sharegpt_images_list_at_tags_or_first_user_turn(tmp_path):
    _png(tmp_path / "x.png")
    _png(tmp_path / "y.png")
    data = _write(tmp_path / "s.jsonl", [
        {"conversations": [{"from": "human", "value": "first <image> then <image>?"}, {"from": "gpt", "value": "ok"}],
         "images": ["x.png", "y.png"]},
        {"conversations": [{"from": "human", "value": "what is this?"}, {"from": "gpt", "value": "a dot"}],
         "images": ["y.png"]},
    ])
    c1, c2 = load_conversations([data], "conversations")
    assert c1.messages[0]["content"] == f"first {IMAGE_MARK} then {IMAGE_MARK}?"
    assert [p.rsplit("/", 1)[1] for p in c1.images] == ["x.png", "y.png"]
    assert c2.messages[0]["content"] == f"{IMAGE_MARK}what is this?"


def test_qwen_template_places_vision_tokens_and_mask_is_assistant_text_only(tmp_path, vl_tokenizer):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", color=(0, 0, 255))
    data = _write(tmp_path / "d.jsonl", [_openai("a.png", "b.png")])
    text, spans = get_template("qwen", vl_tokenizer).render_conversation(
        load_conversations([data], "messages")[0].messages)
    assert text.startswith(f"<|im_start|>user\nLook: {QWEN_IMAGE} and {QWEN_IMAGE} What colour?<|im_end|>\n")
    assert [text[a:b] for a, b in spans] == ["It is red.<|im_end|>"]
    table = build_dataset(data, vl_tokenizer, chat_template="qwen", max_seq_length=256, prompt_key="messages",
                          cache_dir=tmp_path / "cache", progress=False)
    s = table[0]
    pad = vl_tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((s.input_ids == pad).sum()) == 2 and len(s.images) == 2
    assert vl_tokenizer.decode(s.input_ids[s.loss_mask.bool()]) == "It is red.<|im_end|>"
    # the images survive the cache (a second build reads it)
    again = build_dataset(data, vl_tokenizer, chat_template="qwen", max_seq_length=256, prompt_key="messages",
                          cache_dir=tmp_path / "cache", progress=False)
    assert again[0].images == s.images and torch.equal(again[0].input_ids, s.input_ids)
    lazy = build_dataset(data, vl_tokenizer, chat_template="qwen", max_seq_length=256, prompt_key="messages",
                         defer_tokenization=True, progress=False)
    assert lazy[0].images == s.images


def test_kimi_k25_vlm_media_block(tmp_path, tiny_tokenizer):
    _png(tmp_path / "a.png")
    data = _write(tmp_path / "d.jsonl", [_openai("a.png")])
    text, spans = get_template("kimi-k25-vlm", tiny_tokenizer).render_conversation(
        load_conversations([data], "messages")[0].messages)
    assert text.startswith("<|im_user|>user<|im_middle|>Look: "
                           "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n What colour?<|im_end|>")
    assert [text[a:b] for a, b in spans] == ["It is red.<|im_end|>"]


def test_wire_carries_images():
    from torchspec.data.sample import Sample
    from torchspec.pipeline.wire import from_wire, to_wire

    s = [Sample("a", torch.tensor([1, 2]), torch.tensor([0, 1], dtype=torch.uint8), images=("/x.png",)),
         Sample("b", torch.tensor([3]), torch.tensor([1], dtype=torch.uint8))]
    back = from_wire(to_wire(s))
    assert back[0].images == ("/x.png",) and back[1].images == ()


@pytest.mark.parametrize("record, expected", [
    (_openai("missing.png"), "d.jsonl line 1: message 1 has an image that does not exist: "),
    (_openai("bad.png"), "d.jsonl line 1: message 1 has an image that cannot be read"),
    (_openai("data:image/png;base64,!!notbase64"), "d.jsonl line 1: message 1 has an image that cannot be read"),
    (_openai("https://example.com/a.png"), "d.jsonl line 1: message 1 has a remote image"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "ok.png"}}]}]},
     "d.jsonl line 1: message 2 (assistant) has an image"),
    ({"conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
      "images": ["ok.png"]}, "d.jsonl line 1: the record's messages have 2 <image> tag(s) for 1 image(s)"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
     "d.jsonl line 1: message 1 has a 'input_audio' content part; text and image_url parts are supported"),
])
def test_bad_images_one_error_naming_file_and_line(tmp_path, record, expected):
    _png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    key = "conversations" if "conversations" in record else "messages"
    data = _write(tmp_path / "d.jsonl", [record])
    with pytest.raises(DataError) as e:
        load_conversations([data], key)
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / expected.split(":")[0]) + ":" + expected.split(":", 1)[1]), msg
    assert "\n" not in msg


@pytest.mark.parametrize("name", ["llama3", "plain", "kimi-k25", "tokenizer"])
def test_template_without_image_placeholder_refuses_images(tmp_path, tiny_tokenizer, name):
    _png(tmp_path / "a.png")
    data = _write(tmp_path / "d.jsonl", [_openai("a.png")])
    with pytest.raises(DataError, match=r"d.jsonl line 1: dataset.chat_template=.* has no image placeholder"):
        build_dataset(data, tiny_tokenizer, chat_template=name, max_seq_length=256, prompt_key="messages",
                      progress=False)


def test_text_only_rendering_unchanged(tmp_path, tiny_tokenizer):
    data = _write(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                                       {"role": "assistant", "content": "yo"}]}])
    conv = load_conversations([data], "messages")[0]
    assert conv.images == () and "images" not in conv.messages[0]
    t = get_template("qwen", tiny_tokenizer)
    assert t.render_conversation(conv.messages) == t.render(conv.messages)


def test_images_survive_pieces_cache_hit_and_deferred_index(tmp_path, vl_tokenizer, monkeypatch):
    """Image conversations tokenized in pieces by 2 workers keep their images by sample id: up front, from a
    cache hit (images.json), and deferred (JSONL lines read back, a .json list read back from spill.jsonl),
    also when the deferred index is reused; text conversations have none, a bad image is skipped."""
    import functools

    import torchspec.data.dataset as dataset_mod
    from torchspec.data.errors import BadRecords
    from torchspec.data.formats import file_digest
    from torchspec.data.sources import plan_pieces

    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    (d2 / "imgs").mkdir(parents=True)
    d1.mkdir()
    _png(d1 / "a.png")
    _png(d1 / "b.png", color=(0, 0, 255))
    _png(d2 / "imgs" / "c.png", color=(0, 200, 0))
    text = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}
    f1 = _write(d1 / "train.jsonl", [text, _openai("a.png"), _openai("missing.png"), _openai("b.png", "a.png"),
                                     text, _openai(_data_uri())])
    f2 = d2 / "more.json"   # a JSON list: deferred samples come back from the spill file
    f2.write_text(json.dumps([_openai("imgs/c.png"), text, _openai("imgs/c.png", "imgs/c.png")]))

    bad = BadRecords("skip")
    convs = load_conversations([f1, f2], "messages", [file_digest(f1), file_digest(f2)], bad)
    assert bad.count == 1 and len(convs) == 8
    expected = {c.sample_id: c.images for c in convs}
    assert sum(1 for v in expected.values() if v) == 5
    assert expected[convs[5].sample_id][0] == str((d2 / "imgs" / "c.png").resolve())   # relative to d2

    monkeypatch.setattr(dataset_mod, "plan_pieces", functools.partial(plan_pieces, piece_records=2))
    kw = dict(chat_template="qwen", max_seq_length=256, prompt_key="messages", on_bad_record="skip", num_proc=2,
              progress=False)
    pad = vl_tokenizer.convert_tokens_to_ids("<|image_pad|>")

    def check(samples):
        assert [s.sample_id for s in samples] == [c.sample_id for c in convs]
        for s in samples:
            assert s.images == expected[s.sample_id]
            assert int((s.input_ids == pad).sum()) == len(s.images)

    eager = build_dataset([f1, f2], vl_tokenizer, cache_dir=tmp_path / "cache", **kw)
    check(list(eager))
    assert eager.images == {k: v for k, v in expected.items() if v}
    assert json.loads((eager.cache_dir / "images.json").read_text()) == {k: list(v) for k, v in eager.images.items()}

    monkeypatch.setattr(dataset_mod, "tokenize_stream", lambda *a, **k: pytest.fail("cache missed"))
    hit = build_dataset([f1, f2], vl_tokenizer, cache_dir=tmp_path / "cache", **kw)
    check(list(hit))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(hit, eager))

    lazy = build_dataset([f1, f2], vl_tokenizer, cache_dir=tmp_path / "cache", defer_tokenization=True, **kw)
    check(lazy.take(range(len(lazy))))
    check([lazy.take([i])[0] for i in reversed(range(len(lazy)))][::-1])
    monkeypatch.setattr(dataset_mod, "_build_index", lambda *a, **k: pytest.fail("index rebuilt"))
    again = build_dataset([f1, f2], vl_tokenizer, cache_dir=tmp_path / "cache", defer_tokenization=True, **kw)
    check(again.take(range(len(again))))
