"""MetricsLogger: metrics.jsonl, progress text, W&B without leaking the key (CPU, no wandb needed)."""

import json
import os
import re
import sys
import types

import pytest

from torchspec.config.schema import Config
from torchspec.training.metrics import MetricsLogger, progress_text, redact, redact_argv
from torchspec.utils.optional import install_hint

KEY = "sekrit-0123456789abcdef"


def test_jsonl_lines_and_eval_prefix(tmp_path):
    with MetricsLogger(tmp_path, Config().logging, total_steps=10, progress=False) as m:
        m.log(1, {"loss": 2.5, "acc_0": 0.25, "lr": 1e-4, "samples_per_s": 3.0, "pool_size": 4})
        m.log(2, {"loss": float("nan")})
        m.log_eval(2, {"loss": 1.5, "acc_0": 0.5, "eval/tau": 1.8})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 2]
    assert lines[0]["loss"] == 2.5 and lines[0]["pool_size"] == 4 and isinstance(lines[0]["time"], float)
    assert lines[1]["loss"] == "nan"
    assert {k for k in lines[2] if k not in ("step", "time")} == {"eval/loss", "eval/acc_0", "eval/tau"}


def test_disabled_logger_writes_nothing(tmp_path):
    m = MetricsLogger(tmp_path / "run", Config().logging, enabled=False)
    m.log(1, {"loss": 1.0})
    m.close()
    assert not (tmp_path / "run").exists()


def test_progress_text_shows_the_pipeline_state():
    text = progress_text({"step": 3, "loss": 2.3456, "acc_0": 0.41, "acc_1": 0.3, "acc_2": 0.22,
                          "samples_per_s": 35.21, "inference_samples_per_s": 40.1,
                          "training_samples_per_s": 35.9, "pool_size": 12})
    assert text == "loss 2.346 | acc 0.41 0.30 0.22 | 35.2 samples/s | inf 40.1/s vs train 35.9/s | pool 12"
    assert progress_text({"eval/loss": 1.0, "eval/acc_0": 0.5, "eval/tau": 2.0}) == \
        "eval/loss 1.000 | eval/acc 0.50 | tau 2.00"


def test_progress_bar_tracks_steps(tmp_path, capsys):
    m = MetricsLogger(tmp_path, Config().logging, total_steps=5)
    m.log(2, {"loss": 1.0, "acc_0": 0.5})
    assert m._bar.n == 2 and "acc 0.50" in m._bar.postfix
    m.log_eval(2, {"loss": 0.5})
    assert m._bar.n == 2
    m.log(5, {"loss": 0.9})
    assert m._bar.n == 5
    m.close()


def test_wandb_gets_key_via_env_only(tmp_path, monkeypatch):
    seen = {}

    class FakeRun:
        def __init__(self):
            self.logged = []

        def log(self, d, step):
            self.logged.append((step, d))

        def finish(self):
            seen["finished"] = True

    def init(**kw):
        seen.update(kw, env_key=os.environ.get("WANDB_API_KEY"), argv=list(sys.argv))
        if kw["mode"] == "online":
            raise ConnectionError("no network here")
        seen["run"] = FakeRun()
        return seen["run"]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(sys, "argv", ["train_entry", f"logging.wandb_key={KEY}", "training.seed=1"])
    cfg = Config()
    cfg.logging.report_to, cfg.logging.wandb_key, cfg.logging.wandb_project = "wandb", KEY, "p"
    run_config = {"logging": {"wandb_key": KEY, "report_to": "wandb"}, "training": {"seed": 1}}
    with MetricsLogger(tmp_path, cfg.logging, run_config=run_config, progress=False) as m:
        m.log(1, {"loss": 2.0, "note": "text is not sent"})
    assert seen["mode"] == "offline"  # online failed (no network) -> offline, training goes on
    assert seen["env_key"] == KEY
    assert seen["config"]["logging"]["wandb_key"] == "***"
    assert seen["argv"] == ["train_entry", "logging.wandb_key=***", "training.seed=1"]
    assert sys.argv[1] == f"logging.wandb_key={KEY}"  # restored afterwards
    assert seen["run"].logged == [(1, {"loss": 2.0})] and seen["finished"]
    assert seen["project"] == "p" and seen["name"].startswith(tmp_path.name + "-")
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(errors="ignore")


def test_missing_wandb_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    cfg = Config()
    cfg.logging.report_to = "wandb"
    with pytest.raises(ImportError, match=re.escape(install_hint("wandb"))):
        MetricsLogger(tmp_path, cfg.logging, progress=False)


def test_redaction_helpers():
    assert redact({"a": {"wandb_key": "x", "b": [1, {"wandb_key": None}]}}) == \
        {"a": {"wandb_key": "***", "b": [1, {"wandb_key": None}]}}
    assert redact_argv(["--wandb_key=abc", "x=1", "logging.wandb_key=k"]) == \
        ["--wandb_key=***", "x=1", "logging.wandb_key=***"]


def test_missing_tensorboard_gives_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    cfg = Config()
    cfg.logging.report_to = "tensorboard"
    with pytest.raises(ImportError, match=re.escape(install_hint("tensorboard"))):
        MetricsLogger(tmp_path, cfg.logging, progress=False)
