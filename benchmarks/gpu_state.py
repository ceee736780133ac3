"""What the GPU and the host did while one part of a bench ran: nvidia-smi sampled in the background.

The same code on the same kind of card can run slower in one device call than in another when the card is
held under its boost clock (power cap, heat) or the host is busy. `GpuSampler` records the SM clock, power,
temperature, utilisation and the driver's reasons for lowering the clock every `interval_ms`, plus the host's
load average, so a bench can say whether a slow run was the machine or the code.

    with GpuSampler() as gpu:
        run_something()
    print(gpu.summary())     # {"sm_clock_mhz": {...}, "reasons": {"sw_power_cap": 0.4, ...}, ...}

Without nvidia-smi (a CPU machine) the summary says so and nothing is sampled.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile

FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "temperature.gpu", "utilization.gpu")
# the active clock-lowering reasons, as a bit mask: newer drivers name the field "clocks_event_reasons",
# older ones "clocks_throttle_reasons"; the bits are NVML's
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
REASON_BITS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
               0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
               0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:   # "[N/A]", "[Not Supported]"
        return None


def reasons_of(mask: str) -> list[str]:
    """The names of the bits set in a reason mask as nvidia-smi prints it ("0x0000000000000004")."""
    try:
        bits = int(mask, 16)
    except ValueError:
        return []
    return [name for bit, name in REASON_BITS.items() if bits & bit]


def summarize(lines: list[str], with_reasons: bool, loadavg: tuple[float, float] | None = None) -> dict:
    """One summary of nvidia-smi CSV rows (FIELDS, then the reason mask when `with_reasons`)."""
    rows = [[c.strip() for c in line.split(",")] for line in lines if line.strip()]
    rows = [r for r in rows if len(r) == len(FIELDS) + with_reasons]
    if not rows:
        return {"samples": 0}

    def column(i: int) -> list[float]:
        return [x for x in (_number(r[i]) for r in rows) if x is not None]

    def spread(xs: list[float]) -> dict | None:
        if not xs:
            return None
        s = sorted(xs)
        return {"p10": s[int(0.1 * (len(s) - 1))], "p50": statistics.median(s), "max": s[-1]}

    out = {"samples": len(rows), "sm_clock_mhz": spread(column(0)),
           "sm_clock_max_mhz": max(column(1), default=None), "power_w": spread(column(2)),
           "temperature_c": spread(column(3)), "utilization_pct": spread(column(4))}
    if with_reasons:   # the share of samples in which each reason was active
        seen: dict[str, int] = {}
        for r in rows:
            for name in reasons_of(r[-1]):
                seen[name] = seen.get(name, 0) + 1
        out["reasons"] = {k: round(v / len(rows), 3) for k, v in sorted(seen.items())}
    if loadavg is not None:
        out["host_loadavg_1m"] = {"start": loadavg[0], "end": loadavg[1], "cpus": os.cpu_count()}
    return out


class GpuSampler:
    """Samples GPU `index` with nvidia-smi every `interval_ms` while the `with` block runs."""

    def __init__(self, index: int = 0, interval_ms: int = 200):
        self.index, self.interval_ms = index, interval_ms
        self.proc = self.file = None
        self.with_reasons = False
        self.result: dict = {"samples": 0, "why": "not run"}
        self.text = ""   # every row sampled, kept after the block for `window`

    def _query(self, fields: tuple[str, ...]) -> list[str]:
        return ["nvidia-smi", "-i", str(self.index), f"--query-gpu={','.join(fields)}",
                "--format=csv,noheader,nounits"]

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi") is None:
            self.result = {"samples": 0, "why": "nvidia-smi not found"}
            return self
        fields = FIELDS
        for reason in REASON_FIELDS:   # the first reason field this driver knows
            probe = subprocess.run(self._query(FIELDS + (reason,)), capture_output=True, text=True)
            if probe.returncode == 0:
                fields, self.with_reasons = FIELDS + (reason,), True
                break
        self.file = tempfile.TemporaryFile(mode="w+")
        self.load0 = os.getloadavg()[0]
        self.proc = subprocess.Popen(self._query(fields) + [f"--loop-ms={self.interval_ms}"], stdout=self.file,
                                     stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        self.proc.wait()
        self.file.seek(0)
        self.text = self.file.read()
        self.result = summarize(self.text.splitlines(), self.with_reasons, (self.load0, os.getloadavg()[0]))
        self.file.close()
        self.proc = self.file = None

    def summary(self) -> dict:
        return self.result

    def mark(self) -> int:
        """Where the sampling is now (call inside the block); two marks bound a `window`."""
        return os.fstat(self.file.fileno()).st_size if self.file is not None else 0

    def window(self, start: int, end: int) -> dict:
        """The summary of the rows sampled between two marks (after the block): one phase of a run, without
        the start-up around it."""
        lines = self.text[start:end].split("\n")
        if start > 0 and self.text[start - 1:start] != "\n":
            lines = lines[1:]   # a row cut by the first mark
        return summarize(lines[:-1], self.with_reasons)   # the last piece is a cut row, or empty
