"""dataset.on_bad_record: "error" (default) stops at the first bad record with one line; "skip" leaves bad
records out, counts them and names the first few (file and line + why) in the log and the data summary."""

import json
import logging

import pytest

from torchspec.config.schema import BAD_RECORDS_NAMED
from torchspec.data import DataError, build_dataset

GOOD = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
# The hostile inputs of issue 12, one per line, between good records (line numbers in the comments).
HOSTILE = [
    GOOD,                                                                        # 1
    b'{"conversations": [{"from": "human", "value": "caf\xe9"}]}',               # 2 not UTF-8
    '{"conversations": [{"from": "human", "value": "x \\ud83d"}, {"from": "gpt", "value": "y"}]}',  # 3 surrogate
    "[" * 200_000 + "]" * 200_000,                                                # 4 nested too deeply
    '{"conversations": [',                                                       # 5 not JSON
    {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]},  # 6 unknown role
    {"messages": [{"role": "user", "content": "hi"}]},                           # 7 no prompt key
    GOOD,                                                                        # 8
]
WHY = {2: "not valid UTF-8", 3: "unpaired surrogate", 4: "nested too deeply", 5: "not valid JSON",
       6: "unknown role 'robot'", 7: "no 'conversations' field"}


def write_lines(path, records):
    with open(path, "wb") as fh:
        for r in records:
            raw = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()
            fh.write(raw + b"\n")
    return path


def build(path, tok, **kw):
    args = dict(chat_template="qwen", max_seq_length=256, prompt_key="conversations", progress=False)
    args.update(kw)
    return build_dataset(path, tok, **args)


def test_error_is_the_default_and_names_the_first_bad_line(tmp_path, tiny_tokenizer):
    p = write_lines(tmp_path / "d.jsonl", HOSTILE)
    with pytest.raises(DataError, match="not valid UTF-8") as e:
        build(p, tiny_tokenizer)
    assert str(e.value).startswith(f"{p} line 2:")


@pytest.mark.parametrize("defer", [False, True])
def test_skip_counts_and_names_every_hostile_line(tmp_path, tiny_tokenizer, caplog, defer):
    p = write_lines(tmp_path / "d.jsonl", HOSTILE)
    caplog.set_level(logging.INFO, logger="torchspec.data")
    ds = build(p, tiny_tokenizer, on_bad_record="skip", defer_tokenization=defer, cache_dir=tmp_path / "cache")
    assert len(ds) == 2 and ds.stats.skipped_bad == 6
    for (line, why), named in zip(sorted(WHY.items()), ds.stats.bad_records):
        assert named.startswith(f"{p} line {line}:") and why in named, (line, named)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "skipped 6 bad record(s)" in warning[0]
    assert all(f"{p} line {line}:" in warning[0] for line in WHY)
    # The good records keep the ids they have in a file without the bad lines' fixes: their record index.
    ids = [s.sample_id for s in ds] if not defer else ds.sample_ids
    assert [i.rsplit("-", 1)[1] for i in ids] == ["0", "7"]


def test_skip_summary_is_in_the_cache_and_logged_again_on_a_hit(tmp_path, tiny_tokenizer, caplog):
    p = write_lines(tmp_path / "d.jsonl", HOSTILE)
    first = build(p, tiny_tokenizer, on_bad_record="skip", cache_dir=tmp_path / "cache")
    meta = json.loads((first.cache_dir / "meta.json").read_text())
    assert meta["stats"]["skipped_bad"] == 6 and meta["stats"]["bad_records"][0].startswith(f"{p} line 2:")
    caplog.set_level(logging.INFO, logger="torchspec.data")
    again = build(p, tiny_tokenizer, on_bad_record="skip", cache_dir=tmp_path / "cache")
    assert again.stats.skipped_bad == 6 and "skipped 6 bad record(s)" in caplog.text
    # The skip run's cache is never read by an "error" run: that one still stops at line 2.
    with pytest.raises(DataError, match=f"{p} line 2:"):
        build(p, tiny_tokenizer, cache_dir=tmp_path / "cache")


def test_skip_names_at_most_the_configured_number(tmp_path, tiny_tokenizer):
    p = write_lines(tmp_path / "d.jsonl", [GOOD] + ['{"oops'] * (BAD_RECORDS_NAMED + 5))
    ds = build(p, tiny_tokenizer, on_bad_record="skip")
    assert ds.stats.skipped_bad == BAD_RECORDS_NAMED + 5 and len(ds.stats.bad_records) == BAD_RECORDS_NAMED
    assert f"(the first {BAD_RECORDS_NAMED} named)" in ds.stats.bad_summary()


@pytest.mark.parametrize("defer", [False, True])
def test_skip_covers_conversations_the_template_rejects(tmp_path, tiny_tokenizer, defer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no boom') }}"
                         "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    boom = {"conversations": [{"from": "human", "value": "boom"}, {"from": "gpt", "value": "x"}]}
    p = write_lines(tmp_path / "d.jsonl", [GOOD, boom, GOOD])
    with pytest.raises(DataError, match=f"{p} line 2: the tokenizer's chat template failed"):
        build(p, tok, chat_template="tokenizer", defer_tokenization=defer)[1]
    ds = build(p, tok, chat_template="tokenizer", on_bad_record="skip", defer_tokenization=defer, num_proc=1)
    assert len(ds) == 2 and ds.stats.skipped_bad == 1 and "no boom" in ds.stats.bad_records[0]


def test_every_record_bad_is_one_error(tmp_path, tiny_tokenizer):
    p = write_lines(tmp_path / "d.jsonl", ['{"oops', "[1]"])
    with pytest.raises(DataError, match=r"every record is bad \(2 skipped"):
        build(p, tiny_tokenizer, on_bad_record="skip")


def test_unreadable_json_list_stops_the_run_also_under_skip(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"conversations": []},\n  {oops}\n]')
    with pytest.raises(DataError, match=f"{p} line 3: not valid JSON"):
        build(p, tiny_tokenizer, on_bad_record="skip")


def test_config_key_is_validated(capsys, caplog):
    from tests.test_config import CONFIGS, REQUIRED_SET, dry_run

    rc, _, err = dry_run(["--config", str(CONFIGS / "default.yaml"), *REQUIRED_SET, "dataset.on_bad_record=skp"],
                         capsys, caplog)
    assert rc == 2 and "dataset.on_bad_record='skp': unknown value, expected one of error, skip" in err
    assert "did you mean 'skip'" in err


def test_train_entry_bad_record_is_one_line_exit_2(tmp_path, tiny_target_dir, capsys):
    from torchspec.train_entry import main

    p = write_lines(tmp_path / "d.jsonl", HOSTILE)
    rc = main(["--config", "configs/quickstart.yaml", f"model.target_model_path={tiny_target_dir}",
               f"dataset.train_data_path={p}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1] == f"data error: {p} line 2: not valid UTF-8 (byte 0xe9 at column 51); " \
                                           "re-encode the file as UTF-8"
    assert "Traceback" not in err
