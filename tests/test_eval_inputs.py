"""`python -m torchspec.eval` on bad inputs: one `error:` line naming the file (exit code 2), never a
traceback, and the checks that are cheap (the draft dir, the --output path) made before anything long."""

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_eval_prompts import export_dir  # noqa: E402,F401  (the tiny untrained export fixture)

from torchspec.eval.__main__ import main  # noqa: E402


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "def parse(self, text):"}]}) + "\n")
    return path


def _eval(target, draft, data, *extra):
    return main(["--target", str(target), "--draft", str(draft), "--data", str(data), "--max-new-tokens", "2",
                 "-k", "2", "--ignore-eos", "--no-greedy-check", "--device", "cpu", *extra])


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]  # (a model load's progress bar aside)
    assert len(lines) == 1, err
    return lines[0]


def _broken_copy(export_dir, tmp_path, name, files):
    """A copy of the export with `files` (name -> text or bytes; None = removed) replaced."""
    d = tmp_path / name
    shutil.copytree(export_dir, d)
    for fname, content in files.items():
        if content is None:
            (d / fname).unlink()
        elif isinstance(content, bytes):
            (d / fname).write_bytes(content)
        else:
            (d / fname).write_text(content)
    return d


def test_bad_draft_dir_is_one_line_naming_the_file(tiny_target_dir, export_dir, data, tmp_path, capsys):
    d = _broken_copy(export_dir, tmp_path, "badcfg", {"config.json": '{"hidden_size":\n'})
    assert _eval(tiny_target_dir, d, data) == 2
    assert _one_error(capsys) == (f"error: --draft {d}: {d / 'config.json'}: not valid JSON "
                                  "(line 2 column 1: Expecting value)")

    d = _broken_copy(export_dir, tmp_path, "badw", {"model.safetensors": b"\xff" * 64})
    assert _eval(tiny_target_dir, d, data) == 2
    line = _one_error(capsys)
    assert line.startswith(f"error: --draft {d}: {d / 'model.safetensors'}: corrupt, cannot be read (SafetensorError")

    whole = (export_dir / "model.safetensors").read_bytes()
    d = _broken_copy(export_dir, tmp_path, "truncated", {"model.safetensors": whole[:len(whole) // 2]})
    assert _eval(tiny_target_dir, d, data) == 2
    assert _one_error(capsys).startswith(f"error: --draft {d}: {d / 'model.safetensors'}: corrupt, cannot be read")

    d = _broken_copy(export_dir, tmp_path, "noweights", {"model.safetensors": None})
    assert _eval(tiny_target_dir, d, data) == 2
    line = _one_error(capsys)  # was reported as a --target problem
    assert line.startswith(f"error: --draft {d}: {d / 'model.safetensors'}: missing") and "--target" not in line

    cfg = json.loads((export_dir / "config.json").read_text())
    del cfg["hidden_size"]
    d = _broken_copy(export_dir, tmp_path, "nokey", {"config.json": json.dumps(cfg)})
    assert _eval(tiny_target_dir, d, data) == 2
    assert _one_error(capsys) == f"error: --draft {d}: {d / 'config.json'}: missing required key 'hidden_size'"

    cfg = json.loads((export_dir / "config.json").read_text())
    cfg["intermediate_size"] += 1  # the weights no longer fit the config
    d = _broken_copy(export_dir, tmp_path, "shapes", {"config.json": json.dumps(cfg)})
    assert _eval(tiny_target_dir, d, data) == 2
    assert _one_error(capsys).startswith(f"error: --draft {d}: {d / 'model.safetensors'}: tensor names/shapes differ")


def test_bad_draft_dir_is_reported_before_the_target_and_data_are_read(export_dir, tmp_path, capsys):
    d = _broken_copy(export_dir, tmp_path, "badcfg", {"config.json": "[1, 2"})
    # neither the target nor the data exists: the draft is checked first, before either is opened
    assert _eval(tmp_path / "no_target", d, tmp_path / "no_data.jsonl") == 2
    assert _one_error(capsys).startswith(f"error: --draft {d}: {d / 'config.json'}: not valid JSON")


def test_load_exported_raises_file_error_naming_the_file(export_dir, tmp_path):
    from torchspec.config.errors import FileError
    from torchspec.export import load_exported

    d = _broken_copy(export_dir, tmp_path, "badw", {"model.safetensors": b"not a safetensors file"})
    with pytest.raises(FileError, match=f"^{d / 'model.safetensors'}: corrupt, cannot be read"):
        load_exported(d)
    d = _broken_copy(export_dir, tmp_path, "nocfg", {"config.json": None})
    with pytest.raises(FileError, match=f"^{d / 'config.json'}: not an exported draft dir"):
        load_exported(d)


def test_unusable_output_path_is_reported_before_the_evaluation(export_dir, data, tmp_path, capsys):
    a_dir = tmp_path / "results"
    a_dir.mkdir()
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    # the target does not exist: an --output error proves the check ran before the target was opened
    for output, expected in ((a_dir, f"error: --output {a_dir}: is a directory; give a file path"),
                             (a_file / "out.json", f"error: --output {a_file / 'out.json'}: {a_file} is a file, "
                                                   "not a directory")):
        assert _eval(tmp_path / "no_target", export_dir, data, "--output", str(output)) == 2
        assert _one_error(capsys).startswith(expected)
    assert a_file.read_text() == "x" and list(a_dir.iterdir()) == []


def test_output_folder_is_made_and_a_failed_write_is_one_line(tiny_target_dir, export_dir, data, tmp_path, capsys,
                                                              monkeypatch):
    out = tmp_path / "new" / "folder" / "eval.json"
    assert _eval(tiny_target_dir, export_dir, data, "--output", str(out)) == 0
    assert json.loads(out.read_text())["num_prompts"] == 1
    assert "tau (mean acceptance length)" in capsys.readouterr().out

    def full(self, *a, **k):  # the disk fills up while the evaluation ran
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    assert _eval(tiny_target_dir, export_dir, data, "--output", str(tmp_path / "late.json")) == 2
    assert _one_error(capsys) == (f"error: --output {tmp_path / 'late.json'}: not written (No space left on device); "
                                  "only the summary above was kept")


def test_bad_target_path_is_one_clear_line_before_the_data_is_read(export_dir, tmp_path, capsys):
    no_data = tmp_path / "no_data.jsonl"  # never reached: the target is checked first
    missing = tmp_path / "no_target"
    assert _eval(missing, export_dir, no_data) == 2  # was huggingface_hub's "Repo id must be in the form ..."
    assert _one_error(capsys) == (f"error: --target {missing}: no such directory (give a local model dir or a hub "
                                  "id org/name)")
    a_file = tmp_path / "weights.bin"
    a_file.write_text("x")
    assert _eval(a_file, export_dir, no_data) == 2
    assert _one_error(capsys) == f"error: --target {a_file}: is a file; give the target's model dir"
    no_config = tmp_path / "tokenizer_only"
    no_config.mkdir()
    (no_config / "tokenizer.json").write_text("{}")
    assert _eval(no_config, export_dir, no_data) == 2
    assert _one_error(capsys).startswith(f"error: --target {no_config}: {no_config / 'config.json'} is missing")
