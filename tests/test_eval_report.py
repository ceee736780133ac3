"""The training report: plots and summary from a run dir's metrics.jsonl."""

import json
import math

import pytest

from torchspec.eval import report


def _write_run(run_dir, steps=60, eval_every=20, torn=True):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in range(1, steps + 1):
        rec = {"step": s, "time": 1000.0 + 2 * s, "loss": 6.0 * math.exp(-s / 30) + 0.5,
               "lr": 1e-4 * min(1.0, s / 5), "samples_per_s": 10.0 + s / 10,
               "inference_samples_per_s": 30.0, "training_samples_per_s": 12.0}
        for k in range(3):
            rec[f"acc_{k}"] = (1 - math.exp(-s / 20)) * 0.8 ** k
        lines.append(json.dumps(rec))
        if s % eval_every == 0:
            lines.append(json.dumps({"step": s, "time": 1000.0 + 2 * s + 1, "eval/loss": rec["loss"] + 0.2,
                                     "eval/acc_0": rec["acc_0"] - 0.05, "eval/acc_1": rec["acc_1"] - 0.05,
                                     "eval/acc_2": rec["acc_2"] - 0.05, "eval/tau": 1 + s / 30}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": 61, "loss": 0.'  # a run killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "resolved_config.yaml").write_text(
        "model:\n  target_model_path: /models/tiny\ntraining:\n  learning_rate: 0.0001\n  ttt_length: 3\n")
    (run_dir / "eval_best.json").write_text(json.dumps(
        {"step": 60, "metric": "eval/tau", "value": 3.0, "score": 3.0, "checkpoint": "checkpoints/step_00000060"}))
    return run_dir


def test_series_and_torn_line(tmp_path):
    run = _write_run(tmp_path / "run")
    recs = report.read_metrics(run)
    assert len(recs) == 63  # 60 train + 3 eval, the torn line skipped
    xs, ys = report.series(recs, "eval/tau")
    assert xs == [20, 40, 60] and ys == pytest.approx([1 + 20 / 30, 1 + 40 / 30, 3.0])
    xs, _ = report.series(recs, "loss")
    assert xs == list(range(1, 61))


def test_report_plots_and_summary(tmp_path):
    import matplotlib.image as mpimg

    run = _write_run(tmp_path / "run")
    md = report.write_report(run)
    out = run / "report"
    for name in ("loss", "accuracy", "lr", "throughput", "tau"):
        img = mpimg.imread(out / f"{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 400
        assert img[..., :3].std() > 0.05  # not a blank canvas: curves, axes and text are drawn
    text = md.read_text()
    assert "sha256" in text and "target_model_path: `/models/tiny`" in text
    assert "last training step 60" in text and "acc_2" in text
    assert f"{6.0 * math.exp(-2) + 0.5:.4g}" in text  # final train loss
    assert "last eval (step 60)" in text and "tau 3" in text
    assert "best eval: step 60 (eval/tau = 3)" in text
    assert f"tau (held-out prompts): {1 + 20 / 30:.4g} at step 20 -> 3 at step 60" in text
    for name in ("loss", "accuracy", "lr", "throughput", "tau"):
        assert f"]({name}.png)" in text


def test_eval_lines_appended_late_fall_into_step_order(tmp_path):
    run = _write_run(tmp_path / "run", torn=False)
    with open(run / "metrics.jsonl", "a") as f:  # e.g. an untrained-draft baseline logged after the run
        f.write(json.dumps({"step": 0, "time": 0.0, "eval/tau": 1.0}) + "\n")
    xs, ys = report.series(report.read_metrics(run), "eval/tau")
    assert xs == [0, 20, 40, 60] and ys[0] == 1.0


def test_no_eval_means_no_tau_plot(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 0.0, "loss": 2.0, "acc_0": 0.1}) + "\n")
    report.write_report(run, tmp_path / "elsewhere")
    made = sorted(p.name for p in (tmp_path / "elsewhere").iterdir())
    assert made == ["accuracy.png", "loss.png", "report.md"]


def test_cli(tmp_path, capsys):
    run = _write_run(tmp_path / "run", torn=False)
    assert report.main([str(run)]) == 0
    assert (run / "report" / "report.md").is_file()
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "no metrics file" in capsys.readouterr().err
