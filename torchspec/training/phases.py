"""Where a training step's time goes: wall seconds per phase, summed between two optimizer steps.

Phases (the `time/<phase>_s` keys of metrics.jsonl, docs/interfaces.md):
  data_wait       the controller waiting for hidden states (engines behind the trainer)
  target_forward  the target's forward, when it runs in the trainer process (inference.colocate)
  read            store records -> one host batch (packing / padding)
  h2d             host -> device copy of the batch
  forward         target head probabilities + the draft's TTT forward and loss
  backward        backward through the TTT unroll
  optimizer       gradient clipping, AdamW, lr schedule
  metrics         turning the step's loss/acc tensors into numbers (one host sync)
  log             metrics.jsonl / progress bar / W&B
  checkpoint, eval  reported on the steps that do them

On CUDA the clock does not synchronize at phase ends: a synchronize at every phase end would leave the
GPU idle while the host launches the next phase, a cost paid every step when the step is close to
host-bound. Instead each phase records a CUDA event where it ends (on the current stream), and `take`,
after the step's own host sync, places every phase on one timeline: a phase ends when both the host has
left it and the GPU has done its work, and it is charged the time from the end of the phase before it (or
from its own start, if later) to its end. When the GPU is behind, a phase's time is therefore its GPU
time; when the host is behind, its host time. The phases never overlap, so they sum to at most the step's
wall time, and to all of it but a few milliseconds of bookkeeping. Off CUDA there are no events and
phases are host time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable

import torch

log = logging.getLogger(__name__)

PHASES = ("data_wait", "target_forward", "read", "h2d", "forward", "backward", "optimizer", "metrics", "log",
          "checkpoint", "eval")


SYNC_EACH_PHASE = False   # True: also synchronize at every phase end (the older clock; benches compare the two)
MAX_SPANS = 4096   # spans kept before they are settled into totals (a loop that never calls take())


class PhaseClock:
    def __init__(self, device: torch.device | str = "cpu", *, new_event: Callable[[], object] | None = None):
        """`new_event` makes the event a phase records at its end (`.record()`, `.elapsed_time(other)` in ms,
        `.synchronize()`); default on CUDA a timing CUDA event on the current stream, off CUDA none."""
        device = torch.device(device)
        self.device = device
        if new_event is None and device.type == "cuda":
            new_event = functools.partial(torch.cuda.Event, enable_timing=True)
        self._new_event = new_event
        self.totals: dict[str, float] = defaultdict(float)
        self._spans: list[tuple[str, float, float, object | None]] = []   # (phase, host start, host end, event)
        self._since = time.perf_counter()
        self._edge = self._since   # where the last settled phase ended on the merged timeline
        self._anchor = self._mark()
        self._open = False
        self._warned = False

    def _mark(self) -> tuple[float, object] | None:
        """(host time, an event recorded now): the GPU time of later events is placed relative to it. Taken
        when this stream has nothing queued (after the step's host syncs), so the event completes at once."""
        ev = self._record()
        return None if ev is None else (time.perf_counter(), ev)

    def _record(self) -> object | None:
        if self._new_event is None:
            return None
        ev = self._new_event()
        ev.record()
        return ev

    @contextmanager
    def phase(self, name: str):
        """Time the block as `name`; a phase opened inside another one is part of the outer one."""
        if self._open:
            yield
            return
        self._open = True
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._open = False
            if SYNC_EACH_PHASE and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._spans.append((name, t0, time.perf_counter(), self._record()))
            if len(self._spans) > MAX_SPANS:
                self._settle()

    def add(self, name: str, seconds: float) -> None:
        """A host-only phase of `seconds` that ended now (the part of it before the end of the phase before it,
        on the merged timeline, overlapped that phase and is not charged twice)."""
        now = time.perf_counter()
        self._spans.append((name, now - seconds, now, None))

    def _settle(self) -> None:
        """Charge the recorded spans to their phases (see the module doc); waits for the last event only."""
        last = next((ev for *_, ev in reversed(self._spans) if ev is not None), None)
        if last is not None:
            last.synchronize()   # the stream's earlier events are done too
        ref_t, ref_ev = self._anchor if self._anchor is not None else (None, None)
        edge = self._edge
        for name, t0, t1, ev in self._spans:
            end = t1 if ev is None else max(t1, self._gpu_done(ref_t, ref_ev, ev))
            end = max(end, edge)
            self.totals[name] += end - max(t0, edge)
            edge = end
        self._spans.clear()
        self._edge = edge
        self._anchor = self._mark()

    def _gpu_done(self, ref_t: float, ref_ev, ev) -> float:
        """When the GPU finished `ev`'s work, on the host clock; a timing the driver refuses (an event of
        another device or an unfinished stream) falls back to the host's time, with one warning."""
        try:
            return ref_t + ref_ev.elapsed_time(ev) / 1e3
        except RuntimeError as e:
            if not self._warned:
                self._warned = True
                log.warning("step phases: GPU timing unavailable (%s); phases are host time", e)
            return float("-inf")

    def take(self) -> dict[str, float]:
        """{"time/<phase>_s": seconds} since the last take, plus "time/step_s" (the wall time in between)."""
        self._settle()
        now = time.perf_counter()
        out = {f"time/{k}_s": v for k, v in self.totals.items()}
        out["time/step_s"] = now - self._since
        self.totals.clear()
        self._since = self._edge = now
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
