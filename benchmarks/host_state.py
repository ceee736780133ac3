"""What the host did during one window of a bench: the machine's CPU time by kind, the core clocks, memory
writes waiting for the disk, page faults and kernel memory work, and how often the calling thread was pushed
off its core.

A pipeline whose training thread is host-bound (it launches the GPU's work) slows down when its core is shared
or its memory is being moved, with no change in its own code. Two snapshots bound a window:

    a = snapshot()
    run_something()
    print(window(a, snapshot()))   # {"cpu_cores": {"user": 1.1, "system": 0.3, "iowait": 0.0, ...}, ...}

Linux only (/proc); elsewhere the window says so.
"""

from __future__ import annotations

import os
import resource
import time

CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
VMSTAT_KEYS = ("pgmajfault", "numa_hint_faults", "numa_pages_migrated", "thp_fault_alloc", "compact_stall",
               "pgsteal_kswapd", "pgsteal_direct")
MEMINFO_KEYS = ("Dirty", "Writeback")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_ticks(stat_text: str) -> dict[str, int]:
    """The machine's CPU time so far, in clock ticks by kind (the "cpu" line of /proc/stat)."""
    for line in stat_text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            return {k: int(v) for k, v in zip(CPU_FIELDS, parts[1:])}
    return {}


def keyed_numbers(text: str, keys: tuple[str, ...]) -> dict[str, int]:
    """`keys` from /proc/vmstat ("name value") or /proc/meminfo ("Name:   value kB") text."""
    out = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[0] in keys:
            out[parts[0]] = int(parts[1])
    return out


def cpu_mhz(cpuinfo_text: str) -> dict | None:
    """Mean and lowest core clock now, from /proc/cpuinfo's "cpu MHz" lines (None where it has none, as in
    some VMs): a host slowed by its clock, not by other work, shows here."""
    mhz = [float(line.split(":")[1]) for line in cpuinfo_text.splitlines() if line.startswith("cpu MHz")]
    return {"mean": round(sum(mhz) / len(mhz)), "min": round(min(mhz))} if mhz else None


def process_ticks() -> dict[int, tuple[str, int]]:
    """{pid: (command name, CPU ticks used so far)} of every process visible in /proc."""
    out = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit():
            continue
        text = _read(f"/proc/{name}/stat")
        if not text or ")" not in text:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()   # from field 3 (state) on: utime, stime are 14 and 15
        out[int(name)] = (comm, int(fields[11]) + int(fields[12]))
    return out


def snapshot() -> dict:
    """The host's counters now (call from the thread whose context switches count)."""
    stat, vmstat, meminfo = _read("/proc/stat"), _read("/proc/vmstat"), _read("/proc/meminfo")
    me, thread = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_THREAD)
    return {"t": time.perf_counter(), "linux": stat is not None,
            "cpu": cpu_ticks(stat or ""), "vmstat": keyed_numbers(vmstat or "", VMSTAT_KEYS),
            "meminfo_kb": keyed_numbers(meminfo or "", MEMINFO_KEYS),
            "process_faults": (me.ru_minflt, me.ru_majflt),
            "thread_switches": (thread.ru_nvcsw, thread.ru_nivcsw), "procs": process_ticks(),
            "cpu_mhz": cpu_mhz(_read("/proc/cpuinfo") or "")}


def window(a: dict, b: dict) -> dict:
    """What happened between two snapshots: CPU cores busy by kind over the whole machine (a core fully busy
    for the window is 1.0), kernel memory events, the memory writes pending at each end, this process's page
    faults and the thread's voluntary and forced (preempted) context switches, per second."""
    wall = b["t"] - a["t"]
    if not (a["linux"] and b["linux"]) or wall <= 0:
        return {"why": "no /proc (not Linux)" if not a["linux"] else "empty window"}
    hz = os.sysconf("SC_CLK_TCK")
    cores = {k: round((b["cpu"].get(k, 0) - a["cpu"].get(k, 0)) / hz / wall, 2) for k in CPU_FIELDS}
    per_s = lambda x, y: round((y - x) / wall, 1)  # noqa: E731
    return {"wall_s": round(wall, 2), "cpu_cores": cores, "cpus": os.cpu_count(),
            "vmstat_per_s": {k: per_s(a["vmstat"][k], b["vmstat"][k]) for k in a["vmstat"] if k in b["vmstat"]},
            "cpu_mhz": {"start": a["cpu_mhz"], "end": b["cpu_mhz"]},
            "pending_writes_mb": {"start": round(sum(a["meminfo_kb"].values()) / 1024),
                                  "end": round(sum(b["meminfo_kb"].values()) / 1024)},
            "process_faults_per_s": {"minor": per_s(a["process_faults"][0], b["process_faults"][0]),
                                     "major": per_s(a["process_faults"][1], b["process_faults"][1])},
            "thread_switches_per_s": {"voluntary": per_s(a["thread_switches"][0], b["thread_switches"][0]),
                                      "forced": per_s(a["thread_switches"][1], b["thread_switches"][1])},
            "busiest_other_processes": busiest(a["procs"], b["procs"], hz * wall)}


def busiest(a: dict, b: dict, ticks_per_core: float, n: int = 4) -> list[dict]:
    """The `n` processes other than this one that used the most CPU between two process_ticks() (cores)."""
    me = os.getpid()
    used = [(b[pid][1] - a.get(pid, (None, 0))[1], b[pid][0], pid) for pid in b if pid != me]
    top = [{"pid": pid, "comm": comm, "cores": round(t / ticks_per_core, 2)}
           for t, comm, pid in sorted(used, reverse=True)[:n]]
    return [x for x in top if x["cores"] >= 0.01]


def flush_pending_writes() -> dict:
    """Write the page cache's dirty pages out now (os.sync), so a bench's own set-up files (a 16 GB target just
    written) are not flushed by the kernel while a timed run is in progress. Returns how much was pending."""
    before = keyed_numbers(_read("/proc/meminfo") or "", MEMINFO_KEYS)
    t0 = time.perf_counter()
    os.sync()
    return {"pending_mb": round(sum(before.values()) / 1024), "sync_s": round(time.perf_counter() - t0, 1)}
