"""A second run never mixes with a finished one in the same output_dir: it is refused before anything is
written (the first run's metrics, checkpoints and export stay as they were); resuming that run is allowed."""

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
