"""logging.report_to: tensorboard writes every numeric metric of every step (and the redacted config)
to <output_dir>/tensorboard, where TensorBoard reads them back."""

from __future__ import annotations

import pytest

from torchspec.config.schema import Config
from torchspec.training.metrics import MetricsLogger


def _read(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_metrics_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    cfg = Config()
    cfg.logging.report_to = "tensorboard"
    cfg.logging.wandb_key = "hunter2"
    run_config = {"logging": {"wandb_key": "hunter2", "report_to": "tensorboard"}}
    with MetricsLogger(tmp_path, cfg.logging, total_steps=3, progress=False, run_config=run_config) as log:
        for step, loss in ((1, 2.5), (2, 1.75), (3, 1.25)):
            log.log(step, {"loss": loss, "acc_0": loss / 10, "note": "text is not a scalar"})
        log.log_eval(3, {"acc_0": 0.5})
    acc = _read(tmp_path / "tensorboard")
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "acc_0", "eval/acc_0"} <= tags and "note" not in tags
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 1.75), (3, 1.25)]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("eval/acc_0")] == [(3, 0.5)]
    config_text = b"".join(t.tensor_proto.string_val[0] for t in acc.Tensors("config/text_summary"))
    assert b"hunter2" not in config_text and b"wandb_key" in config_text
