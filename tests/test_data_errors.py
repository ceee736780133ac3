"""Every bad input raises one DataError that names the file and line (or the config key)."""

import json

import pytest

from torchspec.data import DataError, build_dataset

GOOD = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


def build(path, tok, **kw):
    args = dict(chat_template="qwen", max_seq_length=256, prompt_key="conversations", progress=False)
    args.update(kw)
    return build_dataset(path, tok, **args)


def lines(tmp_path, *records, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return p


def raises(match, fn, *a, **kw):
    with pytest.raises(DataError, match=match) as e:
        fn(*a, **kw)
    return str(e.value)


def test_malformed_json_line(tmp_path, tiny_tokenizer):
    p = lines(tmp_path, GOOD, '{"conversations": [', GOOD)
    msg = raises("not valid JSON", build, p, tiny_tokenizer)
    assert msg.startswith(f"{p} line 2:")


def test_malformed_json_list(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"conversations": []},\n  {oops}\n]')
    assert raises("not valid JSON", build, p, tiny_tokenizer).startswith(f"{p} line 3:")


def test_missing_prompt_key_names_the_field_and_suggests(tmp_path, tiny_tokenizer):
    p = lines(tmp_path, GOOD, {"messages": [{"role": "user", "content": "hi"}]})
    msg = raises("no 'conversations' field", build, p, tiny_tokenizer)
    assert msg.startswith(f"{p} line 2:") and "dataset.prompt_key: messages" in msg


def test_unknown_role(tmp_path, tiny_tokenizer):
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}
    msg = raises("unknown role 'robot'", build, lines(tmp_path, GOOD, GOOD, bad), tiny_tokenizer)
    assert msg.startswith(f"{tmp_path / 'd.jsonl'} line 3: message 2")


def test_unknown_role_in_parquet_names_the_row(tmp_path, tiny_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, bad]), p)
    assert raises("unknown role 'bot'", build, p, tiny_tokenizer).startswith(f"{p} row 2:")


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.json", "[]")])
def test_empty_file(tmp_path, tiny_tokenizer, name, text):
    p = tmp_path / name
    p.write_text(text)
    assert raises("empty", build, p, tiny_tokenizer) == f"{p}: the file is empty (no records)"


def test_nonexistent_path_glob_and_folder(tmp_path, tiny_tokenizer):
    msg = raises("no such file", build, tmp_path / "nope.jsonl", tiny_tokenizer, config_key="dataset.eval_data_path")
    assert msg.startswith("dataset.eval_data_path:") and "nope.jsonl" in msg
    assert "matches no file" in raises("pattern", build, str(tmp_path / "*.parquet"), tiny_tokenizer)
    (tmp_path / "empty_dir").mkdir()
    raises("holds no", build, tmp_path / "empty_dir", tiny_tokenizer)
    (tmp_path / "x.csv").write_text("a,b")
    raises("x.csv is not a", build, tmp_path / "x.csv", tiny_tokenizer)


def test_tokenizer_without_template(tmp_path):
    from torchspec.utils.tiny import train_tokenizer

    tok = train_tokenizer(tmp_path / "tok", texts=["def f(x):\n    return x\n"] * 20, vocab_size=300,
                          chat_template=None)
    p = lines(tmp_path, GOOD)
    msg = raises("has no chat template", build, p, tok, chat_template="tokenizer")
    assert msg.startswith("dataset.chat_template:") and "plain" in msg
    assert len(build(p, tok, chat_template="plain")) == 1  # the named fallback works


def test_unknown_template_name(tmp_path, tiny_tokenizer):
    msg = raises("unknown template 'qwen-3'", build, lines(tmp_path, GOOD), tiny_tokenizer, chat_template="qwen-3")
    assert "did you mean" in msg


def test_other_structure_errors(tmp_path, tiny_tokenizer):
    cases = [
        ('["a list"]', "must be a JSON object"),
        ({"conversations": []}, "non-empty list"),
        ({"conversations": [{"value": "hi"}]}, "neither 'role'"),
        ({"conversations": [{"role": "user", "content": [{"type": "image_url"}]}]}, "an image with no url/path"),
        ({"conversations": [{"role": "user", "content": [{"type": "audio"}]}]}, "'audio' content part"),
        ({"conversations": [{"role": "user"}]}, "no 'content'"),
    ]
    for rec, match in cases:
        assert raises(match, build, lines(tmp_path, GOOD, rec), tiny_tokenizer).startswith(
            f"{tmp_path / 'd.jsonl'} line 2:"), match


def test_nothing_supervised(tmp_path, tiny_tokenizer):
    p = lines(tmp_path, {"conversations": [{"from": "human", "value": "only a question"}]})
    raises("none of the 1 conversations has a supervised", build, p, tiny_tokenizer)


def test_bytes_that_are_not_utf8_name_line_and_column(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_bytes((json.dumps(GOOD) + "\n").encode() + b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}\n')
    msg = raises("not valid UTF-8", build, p, tiny_tokenizer)
    assert msg.startswith(f"{p} line 2:") and "0xe9" in msg and "column 51" in msg
    q = tmp_path / "d.json"
    q.write_bytes(b'[\n' + json.dumps(GOOD).encode() + b',\n{"x": "\xff"}\n]')
    assert raises("not valid UTF-8", build, q, tiny_tokenizer).startswith(f"{q} line 3:")


def test_lone_surrogate_names_the_line(tmp_path, tiny_tokenizer):
    bad = '{"conversations": [{"from": "human", "value": "hi \\ud83d"}, {"from": "gpt", "value": "ok"}]}'
    p = lines(tmp_path, GOOD, bad)
    msg = raises("unpaired surrogate", build, p, tiny_tokenizer)
    assert msg.startswith(f"{p} line 2:") and "message 1" in msg


def test_deeply_nested_json_is_one_line(tmp_path, tiny_tokenizer):
    p = lines(tmp_path, GOOD, "[" * 200_000 + "]" * 200_000)
    assert raises("nested too deeply", build, p, tiny_tokenizer).startswith(f"{p} line 2:")
