"""benchmarks/gpu_state.py: the benches' record of what the GPU did (clocks, power, heat, clock-lowering
reasons), read from nvidia-smi. Here a fake nvidia-smi on PATH stands in for the driver's tool."""

import stat
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_state  # noqa: E402

# A stand-in for nvidia-smi: knows only the older reason field name (as older drivers), prints one row per
# query, and with --loop-ms a row every 20 ms until terminated; the SM clock drops to 1410 MHz under a power cap.
FAKE = """#!/usr/bin/env python3
import sys, time
args = " ".join(sys.argv[1:])
if "clocks_event_reasons" in args:
    print('Field "clocks_event_reasons.active" is not a valid field to query.', file=sys.stderr)
    sys.exit(2)
rows = ["1980, 1980, 350.12, 55, 97, 0x0000000000000000", "1410, 1980, 699.80, 71, 100, 0x0000000000000004"]
if "--loop-ms" not in args:
    print(rows[0]); sys.exit(0)
i = 0
while True:
    print(rows[i % 2], flush=True); i += 1
    time.sleep(0.02)
"""


def test_summary_of_nvidia_smi_rows():
    rows = ["1980, 1980, 350.0, 55, 97, 0x0000000000000000",
            "1410, 1980, 700.0, 70, 100, 0x0000000000000004",
            "1500, 1980, [N/A], 72, 100, 0x0000000000000024",
            "garbage"]
    s = gpu_state.summarize(rows, with_reasons=True)
    assert s["samples"] == 3                                   # the malformed row is left out
    assert s["sm_clock_mhz"] == {"p10": 1410.0, "p50": 1500.0, "max": 1980.0}
    assert s["sm_clock_max_mhz"] == 1980.0
    assert s["power_w"]["max"] == 700.0 and s["power_w"]["p50"] == 525.0   # "[N/A]" is no number
    assert s["temperature_c"]["max"] == 72.0
    assert s["reasons"] == {"sw_power_cap": round(2 / 3, 3), "sw_thermal_slowdown": round(1 / 3, 3)}
    assert gpu_state.summarize([], with_reasons=False) == {"samples": 0}


def test_reason_masks():
    assert gpu_state.reasons_of("0x0000000000000000") == []
    assert gpu_state.reasons_of("0x0000000000000044") == ["sw_power_cap", "hw_thermal_slowdown"]
    assert gpu_state.reasons_of("[Not Supported]") == []


def test_sampler_runs_nvidia_smi_in_the_background(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{Path(sys.executable).parent}:/usr/bin:/bin")
    with gpu_state.GpuSampler(interval_ms=20) as gpu:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and gpu.proc.poll() is None and gpu.file.tell() < 200:
            time.sleep(0.05)
    assert gpu.proc is None                                     # the sampler was stopped with the block
    s = gpu.summary()
    assert s["samples"] >= 4 and "reasons" in s                 # fell back to the older reason field
    assert s["sm_clock_mhz"]["max"] == 1980.0 and s["sm_clock_mhz"]["p10"] == 1410.0
    assert 0.4 <= s["reasons"]["sw_power_cap"] <= 0.6
    assert s["host_loadavg_1m"]["cpus"] >= 1


def test_sampler_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with gpu_state.GpuSampler() as gpu:
        pass
    assert gpu.summary() == {"samples": 0, "why": "nvidia-smi not found"}


def test_window_between_marks_keeps_only_whole_rows_sampled_there(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{Path(sys.executable).parent}:/usr/bin:/bin")

    def wait_rows(gpu, n):
        size = gpu.mark()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and gpu.mark() < size + n * 40:
            time.sleep(0.01)

    with gpu_state.GpuSampler(interval_ms=20) as gpu:
        wait_rows(gpu, 3)
        start = gpu.mark()
        wait_rows(gpu, 4)
        end = gpu.mark()
        wait_rows(gpu, 3)
    inside = gpu.window(start, end)
    assert 3 <= inside["samples"] < gpu.summary()["samples"]
    assert inside["samples"] == gpu.text[start:end].count("\n") - (gpu.text[start - 1] != "\n")
    assert gpu.window(0, len(gpu.text))["samples"] == gpu.summary()["samples"]
    # marks that cut rows: the pieces are left out, not read as rows
    gpu.text = "1980, 1980, 350, 55, 97, 0x0\n1410, 1980, 700, 70, 100, 0x4\n1500, 1980, 500, 60, 99, 0x4\n"
    cut = gpu.text.index("1410") + 2
    assert gpu.window(cut, len(gpu.text) - 3) == {"samples": 0}
    whole = gpu.window(gpu.text.index("1410"), len(gpu.text))
    assert whole["samples"] == 2 and whole["sm_clock_mhz"]["max"] == 1500.0
