"""Where a training step's time goes: wall seconds per phase, summed between two optimizer steps.

Phases (the `time/<phase>_s` keys of metrics.jsonl, docs/interfaces.md):
  data_wait       the controller waiting for hidden states (engines behind the trainer)
  target_forward  the target's forward, when it runs in the trainer process (inference.colocate); not
                  synchronized, so the trainer's host work overlaps the queued forward: on CUDA the
                  forward's GPU tail is counted in the next phase (read)
  read            store records -> one host batch (packing / padding)
  h2d             host -> device copy of the batch
  forward         target head probabilities + the draft's TTT forward and loss
  backward        backward through the TTT unroll
  optimizer       gradient clipping, AdamW, lr schedule
  metrics         turning the step's loss/acc tensors into numbers (one host sync)
  log             metrics.jsonl / progress bar / W&B
  checkpoint, eval  reported on the steps that do them
On CUDA each device phase ends with a synchronize, so its time is the GPU's and not the launch's; the
sum of the phases is the step's wall time up to a few milliseconds of bookkeeping (`time/step_s`).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

PHASES = ("data_wait", "target_forward", "read", "h2d", "forward", "backward", "optimizer", "metrics", "log",
          "checkpoint", "eval")


class PhaseClock:
    def __init__(self, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self._sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.totals: dict[str, float] = defaultdict(float)
        self._since = time.perf_counter()

    @contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] += seconds

    def take(self) -> dict[str, float]:
        """{"time/<phase>_s": seconds} since the last take, plus "time/step_s" (the wall time in between)."""
        now = time.perf_counter()
        out = {f"time/{k}_s": v for k, v in self.totals.items()}
        out["time/step_s"] = now - self._since
        self.totals.clear()
        self._since = now
        return out


def summary(record: dict) -> str:
    """The progress bar's compact view: 'step 0.158s: fwd 31% bwd 52% opt 6% data 4%' (largest first)."""
    step = record.get("time/step_s")
    if not step:
        return ""
    short = {"data_wait": "data", "target_forward": "target", "forward": "fwd", "backward": "bwd",
             "optimizer": "opt", "checkpoint": "ckpt"}
    parts = sorted(((record.get(f"time/{p}_s", 0.0), short.get(p, p)) for p in PHASES), reverse=True)
    return f"step {step:.3f}s: " + " ".join(f"{name} {100 * t / step:.0f}%" for t, name in parts[:4] if t > 0)
