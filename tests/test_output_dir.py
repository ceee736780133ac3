"""A second run never mixes with a finished one in the same output_dir: it is refused before anything is
written (the first run's metrics, checkpoints and export stay as they were); resuming that run is allowed."""

from pathlib import Path

import pytest

from pipeline_helpers import tiny_run_config
from torchspec.config.errors import ConfigError
from torchspec.pipeline.runner import run_training
from torchspec.training.checkpoint import check_output_dir


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_second_run_in_a_used_output_dir_is_refused(tmp_path, tiny_target_dir):
    cfg = tiny_run_config(tmp_path, tiny_target_dir, num_epochs=1, save_interval=2)
    first = run_training(cfg, progress=False)
    out = first.output_dir
    before = snapshot(out)
    with pytest.raises(ConfigError, match=rf"output_dir={out} already holds a training run \(metrics.jsonl, "
                                          rf"checkpoints/step_\*, export\); resume it with training.load_path={out}"):
        run_training(cfg, progress=False)
    assert snapshot(out) == before                       # nothing touched
    other = tmp_path / "elsewhere"
    with pytest.raises(ConfigError, match="training.load_path points elsewhere"):
        check_output_dir(out, other)
    check_output_dir(out, out)                           # resuming this run
    check_output_dir(out, first.checkpoints[0])          # or one of its checkpoints
    check_output_dir(tmp_path / "fresh", None)           # an empty or missing dir


def test_train_entry_says_it_in_one_line(tmp_path, tiny_target_dir, capsys):
    from torchspec.train_entry import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    args = [f"model.target_model_path={cfg.model.target_model_path}",
            f"dataset.train_data_path={cfg.dataset.train_data_path}", f"output_dir={out}"]
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("config error: output_dir=")
    assert not (out / "resolved_config.yaml").exists()


def test_a_refused_resume_leaves_the_runs_resolved_config_as_it_was(tmp_path, tiny_target_dir, capsys):
    from pipeline_helpers import config_file
    from torchspec.train_entry import main

    cfg = tiny_run_config(tmp_path, tiny_target_dir, num_epochs=1, save_interval=2)
    given = str(config_file(cfg, tmp_path / "cfg"))
    assert main(["--config", given]) == 0                # the run to resume
    out = Path(cfg.output_dir)
    saved = out / "resolved_config.yaml"
    before = saved.read_bytes()
    assert b"num_epochs: 1\n" in before and b"load_path: null\n" in before
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[6] = '{"messages": [{"role": "user", "content": "cut'   # line 7: not JSON
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    rc = main(["--config", given, f"dataset.train_data_path={bad}",
               f"training.load_path={out}", "training.num_epochs=2"])
    err = capsys.readouterr().err.strip().splitlines()[-1]   # after the weight-loading bars
    assert rc == 2 and err.startswith(f"data error: {bad} line 7: not valid JSON")
    assert saved.read_bytes() == before                  # the run being resumed keeps its config
    assert sorted(p.name for p in out.glob("resolved_config*")) == ["resolved_config.yaml"]

    cfg.training.load_path, cfg.training.num_epochs = str(out), 2   # a resume that starts
    assert run_training(cfg, progress=False).start_step == 6
    assert (out / "resolved_config.1.yaml").read_bytes() == before   # the resumed run's, kept
    now = saved.read_text()
    assert "num_epochs: 2\n" in now and f"load_path: {out}\n" in now
