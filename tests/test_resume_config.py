"""Resume with a changed config (issue 12, item 13): what the checkpoint cannot continue is refused in one line
before anything starts, what it can is honoured with a warning, and a new lr schedule is rebuilt."""

import json
import logging

import pytest

from pipeline_helpers import tiny_run_config, write_conversations
from torchspec.config.errors import ConfigError
from torchspec.pipeline.runner import run_training
from torchspec.training.optim import lr_at

STOP_AT = 8   # 6 steps per epoch: step 8 is in epoch 1, its data state names 4 trained samples


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_target_dir):
    """A run of 12 steps stopped (Ctrl-C) at step 8, with a pruned draft vocab."""
    tmp = tmp_path_factory.mktemp("stopped")
    cfg = tiny_run_config(tmp, tiny_target_dir, save_interval=1000, num_train_steps=12, draft_vocab_size=64)

    def stop(step, metrics):
        if step == STOP_AT:
            raise KeyboardInterrupt
    run = run_training(cfg, on_step=stop, progress=False)
    assert run.interrupted and run.global_step == STOP_AT
    return tmp, cfg


def _resume_cfg(stopped, tmp_path, **training):
    import shutil

    src, first = stopped
    shutil.copytree(src / "out", tmp_path / "out")   # each test resumes its own copy of the run
    new = tiny_run_config(tmp_path, first.model.target_model_path, save_interval=1000, num_train_steps=12,
                          draft_vocab_size=64)
    new.dataset.train_data_path = first.dataset.train_data_path
    new.training.load_path = str(tmp_path / "out")
    for k, v in training.items():
        setattr(new.training, k, v)
    return new


def _metrics(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_new_schedule_is_rebuilt_and_reaches_the_new_min_lr(stopped, tmp_path, caplog):
    cfg = _resume_cfg(stopped, tmp_path, num_train_steps=16, min_lr=6e-4)
    with caplog.at_level(logging.WARNING, logger="torchspec.training"):
        run = run_training(cfg, progress=False)
    assert run.start_step == STOP_AT and run.global_step == 16
    lrs = {m["step"]: m["lr"] for m in _metrics(tmp_path / "out") if "lr" in m}
    assert lrs[16] == pytest.approx(6e-4, rel=1e-9)    # the new schedule's end (the old one ended at 0.0 at 12)
    for step in range(STOP_AT + 1, 17):
        assert lrs[step] == pytest.approx(lr_at(step, peak_lr=3e-3, min_lr=6e-4, warmup_steps=0, total_steps=16,
                                                style="cosine"), rel=1e-9)
    said = caplog.text
    assert "training.num_train_steps 12 -> 16: honoured: the lr schedule is rebuilt" in said
    assert "training.min_lr 0.0 -> 0.0006: honoured" in said


def test_honoured_changes_are_each_warned(stopped, tmp_path, caplog):
    import subprocess
    import sys

    cfg = _resume_cfg(stopped, tmp_path, ttt_length=3, micro_batch_size=1)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    stale = [out / f".tmp-export-{gone.pid}", out / f".tmp-trash-export-{gone.pid}",
             out / "checkpoints" / f".tmp-step_00000009-{gone.pid}"]   # as a kill mid-publish / mid-save leaves
    for p in stale:
        p.mkdir()
    with caplog.at_level(logging.WARNING, logger="torchspec.training"):
        run = run_training(cfg, progress=False)
    assert run.start_step == STOP_AT and not run.interrupted
    warned = [r.getMessage() for r in caplog.records if r.name == "torchspec.training"]
    assert any("training.ttt_length 2 -> 3: honoured" in w for w in warned)
    assert any("training.micro_batch_size 2 -> 1: honoured: the rest of the epoch comes in the same sample order"
               in w for w in warned)
    assert not any("num_train_steps" in w for w in warned)   # unchanged keys are not mentioned
    assert not any(p.exists() for p in stale) and not list(out.rglob(".tmp-*"))   # swept by the resumed run


def test_a_changed_draft_vocab_is_refused_in_one_line(stopped, tmp_path):
    cfg = _resume_cfg(stopped, tmp_path, draft_vocab_size=32)
    with pytest.raises(ConfigError) as e:
        run_training(cfg, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"training.load_path={tmp_path / 'out'}: this config's draft differs")
    assert "draft_vocab_size 64 -> 32" in msg


def test_another_dataset_is_refused_in_one_line_by_the_cli(stopped, tmp_path, capsys):
    from torchspec.train_entry import main

    cfg = _resume_cfg(stopped, tmp_path)
    other = write_conversations(tmp_path / "other.jsonl", 12, skip=20)
    args = [f"model.target_model_path={cfg.model.target_model_path}", f"dataset.train_data_path={other}",
            "dataset.prompt_key=messages", "dataset.num_proc=1", f"output_dir={tmp_path / 'out'}",
            f"cache_dir={tmp_path / 'cache'}", f"training.load_path={tmp_path / 'out'}",
            "training.draft_vocab_size=64", "training.micro_batch_size=2", "training.max_seq_length=128",
            "inference.colocate=true"]
    rc = main(args)
    stderr = capsys.readouterr().err
    err = [x for x in stderr.splitlines() if x.startswith("config error")]
    assert rc == 2 and len(err) == 1 and "Traceback" not in stderr
    assert f"dataset.train_data_path={other} is not the data this checkpoint was trained on" in err[0]
    assert "(the same number of samples (12), other sample ids; it was trained on " in err[0]


def test_continual_training_checks_the_architecture_only(stopped, tmp_path):
    cfg = _resume_cfg(stopped, tmp_path, continual_training=True, draft_vocab_size=32)
    with pytest.raises(ConfigError, match="draft_vocab_size 64 -> 32"):
        run_training(cfg, progress=False)
