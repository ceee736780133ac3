"""benchmarks/host_state.py: the benches' record of what the host did during a timed window (CPU time by
kind over the machine, the busiest other processes, faults, forced context switches, pending writes)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import host_state  # noqa: E402


def test_proc_text_parsing():
    stat = "cpu  100 5 40 900 7 0 3 11 0 0\ncpu0 50 2 20 450 3 0 1 5 0 0\nintr 1 2\n"
    assert host_state.cpu_ticks(stat) == {"user": 100, "nice": 5, "system": 40, "idle": 900, "iowait": 7,
                                          "irq": 0, "softirq": 3, "steal": 11}
    meminfo = "MemTotal:  1000 kB\nDirty:        12 kB\nWriteback:     4 kB\n"
    assert host_state.keyed_numbers(meminfo, ("Dirty", "Writeback")) == {"Dirty": 12, "Writeback": 4}
    cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2000.000\nprocessor\t: 1\ncpu MHz\t\t: 3000.500\n"
    assert host_state.cpu_mhz(cpuinfo) == {"mean": 2500, "min": 2000}
    assert host_state.cpu_mhz("processor : 0\n") is None
    vmstat = "nr_dirty 3\npgmajfault 55\nnuma_hint_faults 0\n"
    assert host_state.keyed_numbers(vmstat, host_state.VMSTAT_KEYS) == {"pgmajfault": 55, "numa_hint_faults": 0}


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")
def test_window_names_a_busy_process_and_counts_the_machines_cpu():
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)   # it is running
        a = host_state.snapshot()
        time.sleep(1.0)
        b = host_state.snapshot()
    finally:
        spin.kill()
        spin.wait()
    w = host_state.window(a, b)
    assert 0.9 <= w["wall_s"] <= 2.0
    busiest = w["busiest_other_processes"][0]
    assert busiest["pid"] == spin.pid and busiest["cores"] >= 0.5, w["busiest_other_processes"]
    used = sum(v for k, v in w["cpu_cores"].items() if k != "idle")
    assert used >= 0.5 and used + w["cpu_cores"]["idle"] <= w["cpus"] + 0.2, w["cpu_cores"]
    assert set(w["pending_writes_mb"]) == {"start", "end"} and w["thread_switches_per_s"]["voluntary"] >= 0


def test_flush_reports_what_was_pending(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * (1 << 20))
    got = host_state.flush_pending_writes()
    assert set(got) == {"pending_mb", "sync_s"} and got["pending_mb"] >= 0 and got["sync_s"] >= 0
    assert host_state.window({"linux": False, "t": 0}, {"linux": False, "t": 1}) == {"why": "no /proc (not Linux)"}
