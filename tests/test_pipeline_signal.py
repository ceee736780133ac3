"""Ctrl-C on a real run with engine processes: workers stop, a checkpoint is written, the store is emptied."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    from pathlib import Path
    from pipeline_helpers import tiny_run_config
    from torchspec.pipeline.runner import run_training

    if __name__ == "__main__":
        cfg = tiny_run_config(Path({tmp!r}), {target!r}, engines=2, num_epochs=100, save_interval=2)
        r = run_training(cfg, progress=False)
        print("RESULT " + json.dumps({{"interrupted": r.interrupted, "step": r.global_step,
                                       "store_bytes_end": r.store_bytes_end, "store_root": str(r.store_root),
                                       "checkpoints": [p.name for p in r.checkpoints]}}))
""")


def test_ctrl_c_stops_workers_saves_and_empties_store(tmp_path, tiny_target_dir, cpu_only):
    tests = Path(__file__).resolve().parent
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(tests), root=str(tests.parent), tmp=str(tmp_path),
                                    target=str(tiny_target_dir)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    first_ckpt = tmp_path / "out" / "checkpoints" / "step_00000002"
    deadline = time.monotonic() + 90
    while not first_ckpt.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)          # a terminal's Ctrl-C reaches the whole process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert result["interrupted"]
    assert result["store_bytes_end"] == 0
    assert not Path(result["store_root"]).exists()           # the shared-memory directory is gone
    last = f"step_{result['step']:08d}"
    assert result["checkpoints"][-1] == last                 # a checkpoint of the step it stopped at
    assert (tmp_path / "out" / "checkpoints" / last / "meta.json").is_file()
    # No process of the run's group outlives it (one that is still exiting gets a few seconds).
    deadline = time.monotonic() + 10
    while (left := _group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left


def _group_members(pgid: int) -> list[tuple[str, str, bytes]]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if os.getpgid(int(d.name)) == pgid and state != "Z":   # zombies are dead already
                    found.append((d.name, state, (d / "cmdline").read_bytes()[:200]))
            except (ProcessLookupError, FileNotFoundError):
                pass
    return found
