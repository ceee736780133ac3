"""Training observability: metrics.jsonl, a progress bar, and optional W&B / TensorBoard.

`output_dir/metrics.jsonl` gets one JSON object per `log` call:
`{"step": int, "time": float (unix seconds), <metric>: number, ...}`; eval lines carry keys prefixed
`eval/`. The progress bar shows loss, acc_0..acc_k, samples/s, inference vs training capacity
(samples/s each side could sustain) and the sample-pool size, from whichever of these keys the
caller logs: loss, acc_<k>, samples_per_s, inference_samples_per_s, training_samples_per_s,
pool_size.

W&B (`logging.report_to: wandb`) is imported only when asked for. The API key
(`logging.wandb_key`) goes to wandb through the WANDB_API_KEY environment variable of this process
only: it is never written to a file, never passed as run config, never logged.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from torchspec.config.render import redact, redact_argv  # noqa: F401  (redact_argv re-exported)
from torchspec.utils.optional import install_hint

METRICS_FILE = "metrics.jsonl"
EVAL_PREFIX = "eval/"


class MetricsLogger:
    """Writes metrics from the main process (pass enabled=False on other ranks).

    output_dir: the run's output dir. logging_cfg: the `logging` config section (report_to,
    wandb_*). total_steps: optimizer steps of the run (the bar's length). run_config: the resolved
    config as a plain dict, sent (redacted) to W&B / TensorBoard.
    """

    def __init__(self, output_dir: str | os.PathLike, logging_cfg=None, total_steps: int | None = None,
                 run_config: dict | None = None, enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._file = self._bar = self._wandb = self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a killed run keeps its lines
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
                             mininterval=0.5, file=sys.stderr)
        report_to = str(getattr(logging_cfg, "report_to", "none") or "none")
        if report_to == "wandb":
            self._wandb = _init_wandb(logging_cfg, Path(output_dir), redact(run_config or {}))
        elif report_to == "tensorboard":
            self._tb = _init_tensorboard(Path(output_dir), redact(run_config or {}))

    def log(self, step: int, metrics: dict[str, Any]) -> dict:
        """Record `metrics` at optimizer step `step`; returns the record written."""
        record = {"step": int(step), "time": time.time()}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if k not in ("step", "time") and _is_number(v)}
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, int(step))
        if self._bar is not None:
            if not any(k.startswith(EVAL_PREFIX) for k in metrics):
                self._bar.update(max(0, int(step) - self._bar.n))
            self._bar.set_postfix_str(progress_text(record), refresh=False)
        return record

    def truncate_after(self, step: int) -> int:
        """Resuming at `step`: drop the lines of later steps (written after that checkpoint by the run that
        is being resumed), so every step appears once. Returns how many lines were dropped."""
        if not self.enabled:
            return 0
        self._file.close()
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                late = int(json.loads(line).get("step", -1)) > step
            except (ValueError, AttributeError):   # a line cut by a kill: drop it too
                late = True
            if late:
                dropped += 1
            else:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)
        self._file = open(self.path, "a", buffering=1)
        if self._bar is not None:
            self._bar.update(max(0, step - self._bar.n))
        return dropped

    def log_eval(self, step: int, metrics: dict[str, Any]) -> dict:
        return self.log(step, {(k if k.startswith(EVAL_PREFIX) else EVAL_PREFIX + k): v for k, v in metrics.items()})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
        self._file = self._bar = self._wandb = self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def window_means(window: list[dict]) -> dict:
    """Means over the micro-batches of one optimizer step of loss, loss_k and acc_k."""
    keys = sorted({k for m in window for k in m if k == "loss" or k.startswith(("acc_", "loss_"))})
    out = {}
    for key in keys:
        vals = [m[key] for m in window if key in m]
        out[key] = sum(vals) / len(vals)
    return out


class Throughput:
    """samples/s over the last `window` optimizer steps (start-up and compilation drop out of it): wall-clock
    (`samples_per_s`) and counting only the time inside training steps (`training_samples_per_s`)."""

    def __init__(self, start: float, window: int = 20):
        self.start = start
        self.recent: deque = deque(maxlen=window + 1)   # (time, trained samples, train seconds)

    def rates(self, now: float, samples: int, train_s: float) -> dict:
        self.recent.append((now, samples, train_s))
        (t0, n0, busy0), (t1, n1, busy1) = self.recent[0], self.recent[-1]
        if len(self.recent) == 1:
            t0, n0, busy0 = self.start, 0, 0.0
        return {"samples_per_s": (n1 - n0) / max(t1 - t0, 1e-9),
                "training_samples_per_s": (n1 - n0) / max(busy1 - busy0, 1e-9)}


def progress_text(record: dict) -> str:
    """The bar's postfix: 'loss 2.31 | acc 0.41 0.30 0.22 | 35.2 samples/s | inf 40.1/s vs train 35.9/s | pool 12 |
    step 0.158s: bwd 52% fwd 31% opt 6% data 4%' (the step's largest phases, torchspec.training.phases)."""
    parts = []
    pre = EVAL_PREFIX if any(k.startswith(EVAL_PREFIX) for k in record) else ""
    if _is_number(record.get(pre + "loss")):
        parts.append(f"{pre}loss {record[pre + 'loss']:.3f}")
    accs = []
    k = 0
    while _is_number(record.get(f"{pre}acc_{k}")):
        accs.append(f"{record[f'{pre}acc_{k}']:.2f}")
        k += 1
    if accs:
        parts.append(f"{pre}acc " + " ".join(accs))
    if _is_number(record.get(pre + "tau")):
        parts.append(f"tau {record[pre + 'tau']:.2f}")
    if _is_number(record.get("samples_per_s")):
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
    inf, trn = record.get("inference_samples_per_s"), record.get("training_samples_per_s")
    if _is_number(inf) or _is_number(trn):
        fmt = lambda v: f"{v:.1f}/s" if _is_number(v) else "?"  # noqa: E731
        parts.append(f"inf {fmt(inf)} vs train {fmt(trn)}")
    if _is_number(record.get("pool_size")):
        parts.append(f"pool {int(record['pool_size'])}")
    from torchspec.training.phases import summary

    if summary(record):
        parts.append(summary(record))
    return " | ".join(parts)


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):  # 0-d tensors / numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no nan/inf; keep the line parseable
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _init_wandb(logging_cfg, output_dir: Path, run_config: dict):
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"logging.report_to=wandb needs wandb: {install_hint('wandb')}") from e
    if logging_cfg.wandb_key:
        os.environ["WANDB_API_KEY"] = str(logging_cfg.wandb_key)  # this process only; wandb reads it
    name = output_dir.resolve().name
    if logging_cfg.wandb_random_suffix:
        name = f"{name}-{secrets.token_hex(3)}"
    kwargs = dict(project=logging_cfg.wandb_project, entity=logging_cfg.wandb_team,
                  group=logging_cfg.wandb_group, name=name, config=run_config, dir=str(output_dir),
                  mode=str(logging_cfg.wandb_mode))
    argv = sys.argv
    sys.argv = redact_argv(argv)  # wandb records the command line in its run metadata
    try:
        return wandb.init(**kwargs)
    except Exception as e:  # no network / bad key: keep training, log locally for `wandb sync`
        if kwargs["mode"] != "online":
            raise
        print(f"[torchspec] W&B online init failed ({type(e).__name__}); logging offline instead",
              file=sys.stderr)
        return wandb.init(**{**kwargs, "mode": "offline"})
    finally:
        sys.argv = argv


def _init_tensorboard(output_dir: Path, run_config: dict):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"logging.report_to=tensorboard needs tensorboard: {install_hint('tensorboard')}") from e
    writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
    writer.add_text("config", "```\n" + json.dumps(run_config, indent=1, default=str) + "\n```")
    return writer
