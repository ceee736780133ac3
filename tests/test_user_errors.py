"""Errors a user can fix come out as one line naming the file, exit code 2, no traceback (issue 12, item 15):
unwritable output_dir, disk full at a save, a corrupt checkpoint, a target without config.json, a draft config
whose target_hidden_size is not the target's, a truncated newest checkpoint (skipped, said), a secret given with
the wrong type (never echoed)."""

import errno
import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from pipeline_helpers import tiny_run_config
from torchspec.config.errors import ConfigError, FileError
from torchspec.pipeline.runner import run_training
from torchspec.train_entry import main
from torchspec.training import checkpoint as ck


def _cli(cfg, *extra):
    """train_entry overrides that give `cfg`'s tiny run (tests/pipeline_helpers.tiny_run_config)."""
    t, i = cfg.training, cfg.inference
    return [f"model.target_model_path={cfg.model.target_model_path}",
            f"dataset.train_data_path={cfg.dataset.train_data_path}", "dataset.prompt_key=messages",
            "dataset.num_proc=1", f"output_dir={cfg.output_dir}", f"cache_dir={cfg.cache_dir}",
            f"training.micro_batch_size={t.micro_batch_size}", f"training.ttt_length={t.ttt_length}",
            f"training.max_seq_length={t.max_seq_length}", "training.num_train_steps=2", "training.save_interval=1",
            "inference.colocate=true", f"inference.inference_batch_size={i.inference_batch_size}",
            f"inference.inference_buffer_threshold={i.inference_buffer_threshold}",
            f"inference.max_sample_pool_size={i.max_sample_pool_size}", *extra]


def _one_error_line(capsys, rc):
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if " error: " in x and not x.startswith(("INFO", "WARNING"))]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_output_dir_that_cannot_be_written(tmp_path, tiny_target_dir, capsys, monkeypatch):
    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    (tmp_path / "a_file").write_text("x")
    line = _one_error_line(capsys, main(_cli(cfg, f"output_dir={tmp_path / 'a_file' / 'out'}")))
    assert line == (f"file error: output_dir={tmp_path / 'a_file' / 'out'}: {tmp_path / 'a_file'} is a file, not a "
                    "directory; choose another output_dir")
    # a read-only directory (simulated: tests run as root, which the permission bits do not stop)
    real_access = os.access
    monkeypatch.setattr(ck.os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    line = _one_error_line(capsys, main(_cli(cfg, f"output_dir={tmp_path / 'new'}")))
    assert line.startswith(f"file error: output_dir={tmp_path / 'new'}: {tmp_path} is not writable")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_dir_on_a_file_system_that_refuses_new_dirs(tmp_path, tiny_target_dir, capsys):
    """/proc: the permission bits say writable (to root), yet nothing can be created there: tried, not assumed."""
    from torchspec.config.render import save_resolved_config

    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    out = "/proc/torchspec_probe_out"
    expected = f"output_dir={out}: /proc is not writable (cannot create a directory there: "
    assert _one_error_line(capsys, main(_cli(cfg, f"output_dir={out}"))).startswith(f"file error: {expected}")
    rc = main(_cli(cfg, f"output_dir={out}", "--dry-run"))
    assert rc == 2 and f"  - {expected}" in capsys.readouterr().out
    with pytest.raises(FileError, match=rf"^output_dir={out}: cannot write resolved_config.yaml \("):
        save_resolved_config(cfg, out)   # a write that fails after the start's check: named, not a traceback


class _FullDisk(io.RawIOBase):
    """A file on a disk that fills up after `room` bytes: write raises OSError(ENOSPC) as the kernel's would."""

    def __init__(self, path, room=256):
        self.f, self.room = open(path, "wb"), room

    def writable(self):
        return True

    def write(self, b):
        if self.room < len(b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def close(self):
        self.f.close()
        super().close()


def test_disk_full_at_the_first_save(tmp_path, tiny_target_dir, capsys, monkeypatch):
    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    # torch.save writes trainer_state.pt through the file it is given: its zip writer turns the failed write into
    # "unexpected pos ..." (what a full disk printed before), the OSError behind it names the cause
    monkeypatch.setattr(ck, "open", lambda path, mode="r": _FullDisk(path), raising=False)
    line = _one_error_line(capsys, main(_cli(cfg)))
    step = tmp_path / "out" / "checkpoints" / "step_00000001"
    assert line.startswith(f"file error: {step}: not written: No space left on device")
    assert not list((tmp_path / "out" / "checkpoints").iterdir())    # no partial .tmp-step left


def test_disk_full_in_a_library_writer(tmp_path, monkeypatch):
    mgr = ck.CheckpointManager(tmp_path)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(ck, "_save_safetensors", full)
    with pytest.raises(FileError, match="step_00000003: not written: No space left on device"):
        mgr.save(3, {"global_step": 3}, {}, torch.nn.Linear(2, 2), {})
    assert not list((tmp_path / "checkpoints").iterdir())


def test_corrupt_trainer_state_is_named(tmp_path, tiny_target_dir, capsys):
    cfg = tiny_run_config(tmp_path, tiny_target_dir, num_train_steps=2, save_interval=1)
    run_training(cfg, progress=False)
    state = tmp_path / "out" / "checkpoints" / "step_00000002" / "trainer_state.pt"
    state.write_bytes(b"\x00" * state.stat().st_size)   # same size: meta.json cannot tell
    line = _one_error_line(capsys, main(_cli(cfg, "training.num_train_steps=3",
                                             f"training.load_path={tmp_path / 'out'}")))
    assert line.startswith(f"file error: {state}: corrupt, cannot be read (")
    assert "resume from another checkpoint (training.load_path=<a step_N dir>)" in line


@pytest.mark.parametrize("what", ["missing", "not_a_checkpoint", "truncated"])
def test_a_load_path_without_a_usable_checkpoint_is_one_line_and_fails_the_dry_run(tmp_path, tiny_target_dir,
                                                                                   capsys, what):
    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    load = tmp_path / "prev"
    if what == "not_a_checkpoint":
        load.mkdir()
        (load / "notes.txt").write_text("hi")
    elif what == "truncated":   # a checkpoint copied by hand and cut short
        step = ck.CheckpointManager(load).save(3, {"global_step": 3}, {}, torch.nn.Linear(2, 2), {})
        with open(step / "trainer_state.pt", "r+b") as f:
            f.truncate(100)
    expected = {"missing": f"training.load_path={load}: does not exist",
                "not_a_checkpoint": f"training.load_path={load}: no complete checkpoint there (expected step_N/",
                "truncated": f"training.load_path={load}: no complete checkpoint there (incomplete: step_00000003: "
                             "trainer_state.pt has 100 bytes, meta.json says "}[what]
    line = _one_error_line(capsys, main(_cli(cfg, f"training.load_path={load}")))
    assert line.startswith(f"file error: {expected}")
    assert not (tmp_path / "out" / "resolved_config.yaml").exists()
    rc = main(_cli(cfg, f"training.load_path={load}", "--dry-run"))
    out = capsys.readouterr().out
    assert rc == 2 and f"dry run: 1 problem(s) a real start would reject:\n  - {expected}" in out


def _copy_of(target_dir, tmp_path):
    """A copy of the tiny target to spoil, at tmp_path/target."""
    import shutil

    return Path(shutil.copytree(target_dir, tmp_path / "target"))


def test_target_dir_without_config_json(tmp_path, tiny_target_dir, capsys):
    target = _copy_of(tiny_target_dir, tmp_path)
    (target / "config.json").unlink()
    cfg = tiny_run_config(tmp_path, target)
    line = _one_error_line(capsys, main(_cli(cfg)))
    assert line == f"config error: model.target_model_path={target}: no config.json in {target} (a model dir " \
                   "holds config.json, the tokenizer files and the weights)"


def test_draft_config_for_another_target_width_fails_at_start(tmp_path, tiny_target_dir):
    target = json.loads((tiny_target_dir / "config.json").read_text())
    draft = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 16, "vocab_size": target["vocab_size"], "target_hidden_size": 96,
             "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
    path = tmp_path / "draft.json"
    path.write_text(json.dumps(draft))
    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    cfg.model.draft_model_config = str(path)
    steps = []
    with pytest.raises(ConfigError) as e:
        run_training(cfg, on_step=lambda s, m: steps.append(s), progress=False)
    assert str(e.value) == (f"model.draft_model_config={path}: target_hidden_size=96, but the target "
                            f"({tiny_target_dir}) has hidden_size={target['hidden_size']}; set target_hidden_size "
                            f"to {target['hidden_size']}")
    assert steps == [] and not (tmp_path / "out" / "checkpoints").exists()


def test_truncated_newest_checkpoint_is_skipped_with_a_log_line(tmp_path, caplog):
    mgr = ck.CheckpointManager(tmp_path)
    good = mgr.save(1, {"global_step": 1}, {}, torch.nn.Linear(2, 2), {})
    bad = mgr.save(2, {"global_step": 2}, {}, torch.nn.Linear(2, 2), {})
    with open(bad / "trainer_state.pt", "r+b") as f:
        f.truncate(10)
    with caplog.at_level(logging.WARNING, logger="torchspec.training"):
        assert ck.resolve_checkpoint(tmp_path) == good
    assert f"{bad}: skipped, an incomplete checkpoint (files missing or truncated); resuming from step_00000001" \
        in caplog.text


def test_a_secret_of_the_wrong_type_is_not_echoed():
    from torchspec.config.loader import load_config

    with pytest.raises(ConfigError) as e:
        load_config([], ["model.target_model_path=/x", "dataset.train_data_path=/y",
                         "logging.wandb_key=[supersecret123]"])
    assert "supersecret123" not in str(e.value) and str(e.value).startswith("logging.wandb_key: expected a string, "
                                                                               "got '***'")


def _dry_run_problems(capsys, argv):
    """(exit code, the problem lines) of `--dry-run`; never a traceback."""
    rc = main([*argv, "--dry-run"])
    out = capsys.readouterr().out
    listed = out.split("a real start would reject:\n", 1)[1] if "a real start would reject:" in out else ""
    return rc, [x[len("  - "):] for x in listed.splitlines() if x.startswith("  - ")]


def _refused_alike(capsys, argv, kind: str, message: str) -> None:
    """`--dry-run` lists `message` as its one problem (exit 2) and the real start fails with the same line,
    "<kind> error: <message>"."""
    rc, problems = _dry_run_problems(capsys, argv)
    assert rc == 2 and problems == [message]
    assert _one_error_line(capsys, main(argv)) == f"{kind} error: {message}"


def _draft_json(tmp_path, target_dir, **bad):
    target = json.loads((target_dir / "config.json").read_text())
    h = target["hidden_size"]
    draft = {"hidden_size": h, "intermediate_size": 2 * h, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": h // 4, "vocab_size": target["vocab_size"], "target_hidden_size": h,
             "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, **bad}
    path = tmp_path / "draft.json"
    path.write_text(json.dumps(draft))
    return path


@pytest.mark.parametrize("bad, message", [
    ({"hidden_size": "big"}, "'hidden_size' must be an integer, got 'big'"),
    ({"num_attention_heads": -4}, "'num_attention_heads' must be a positive integer, got -4"),
    ({"num_key_value_heads": 0}, "'num_key_value_heads' must be a positive integer, got 0"),
    ({"intermediate_size": -1}, "'intermediate_size' must be a positive integer, got -1"),
    ({"rms_norm_eps": -1e-6}, "'rms_norm_eps' must be a positive number, got -1e-06"),
])
def test_a_bad_draft_config_value_is_one_line_in_the_dry_run_and_the_start(tmp_path, tiny_target_dir, capsys,
                                                                              bad, message):
    """The dry run (which also prints a memory estimate from the same JSON) and the start refuse a draft config
    value of the wrong type or sign with the same line, naming the file and the key (DraftConfig's check)."""
    path = _draft_json(tmp_path, tiny_target_dir, **bad)
    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    _refused_alike(capsys, _cli(cfg, f"model.draft_model_config={path}"), "config", f"{path}: {message}")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_bad_draft_config_value_is_a_problem_before_the_target_is_downloaded(tmp_path, tiny_target_dir, capsys,
                                                                               monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    path = _draft_json(tmp_path, tiny_target_dir, hidden_size="big")
    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    rc, problems = _dry_run_problems(capsys, _cli(cfg, f"model.draft_model_config={path}",
                                                  "model.target_model_path=acme/not-cached",
                                                  f"model_download_dir={tmp_path / 'hub'}"))
    assert rc == 2 and problems == [f"{path}: 'hidden_size' must be an integer, got 'big'"]


def test_a_target_config_json_without_hidden_size_is_one_line_in_the_dry_run_and_the_start(tmp_path, tiny_target_dir,
                                                                                         capsys):
    target = _copy_of(tiny_target_dir, tmp_path)
    raw = json.loads((target / "config.json").read_text())
    del raw["hidden_size"]   # transformers would make it 4096: the embeddings' shape check fails only mid-start
    (target / "config.json").write_text(json.dumps(raw))
    cfg = tiny_run_config(tmp_path, target)
    message = (f"model.target_model_path: {target / 'config.json'}: missing 'hidden_size'; a target's config.json "
               "states the language model's shape")
    _refused_alike(capsys, _cli(cfg), "config", message)


def test_a_corrupt_target_safetensors_is_one_line_in_the_dry_run_and_the_start(tmp_path, tiny_target_dir, capsys):
    target = _copy_of(tiny_target_dir, tmp_path)
    weights = target / "model.safetensors"
    weights.write_bytes(b"\xff" * 64)   # its 8-byte header length is absurd
    cfg = tiny_run_config(tmp_path, target)
    message = (f"model.target_model_path: {weights}: not a readable safetensors file: Error while deserializing "
               "header: header too large")
    _refused_alike(capsys, _cli(cfg), "file", message)


def test_a_corrupt_safetensors_index_is_named(tmp_path, tiny_target_dir):
    from torchspec.models.target_head import check_head_keys

    target = _copy_of(tiny_target_dir, tmp_path)
    index = target / "model.safetensors.index.json"
    index.write_text('{"weight_map": ')   # cut mid-write
    cfg = tiny_run_config(tmp_path, target)
    with pytest.raises(FileError) as e:
        check_head_keys(cfg)
    assert str(e.value).startswith(f"model.target_model_path: {index}: not a readable safetensors index (a JSON "
                                   "object with a 'weight_map' of tensor name -> file): JSONDecodeError: ")


@pytest.mark.parametrize("given, message", [
    ("missing", "no such directory (and not a hub id of the form org/name)"),
    ("a_file", "not a directory (a model dir holds config.json, the tokenizer files and the weights)"),
])
def test_a_target_path_that_is_no_directory_is_the_same_line_in_the_dry_run_and_the_start(
        tmp_path, tiny_target_dir, capsys, monkeypatch, given, message):
    """A local-looking path (absolute, ./, ../) that is not a directory: not a tokenizer error about a repo id."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a model\n")
    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    line = f"model.target_model_path='{tmp_path / given}': {message}"
    for path in (str(tmp_path / given), f"./{given}", f"../{tmp_path.name}/{given}"):
        _refused_alike(capsys, _cli(cfg, f"model.target_model_path={path}"), "config", line)
    assert not (tmp_path / "out" / "checkpoints").exists()
