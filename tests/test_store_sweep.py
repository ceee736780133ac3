"""A driver killed with SIGKILL cannot remove its local store (its records stay in /dev/shm); the next run's
store removes it at start, judged by the owner pid in the directory's name: the stores of live runs, of
other pid namespaces and of unknown owners stay."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pipeline_helpers import config_file, spawned_children, tiny_run_config
from torchspec.transfer import local


def _store_dirs(base: Path) -> set[Path]:
    return set(base.glob("torchspec-store-*"))


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _base() -> Path:
    return Path(local._shm_root() or __import__("tempfile").gettempdir())


def test_kill_9_driver_store_is_removed_at_the_next_start(tmp_path, tiny_target_dir, cpu_only):
    from torchspec.transfer.factory import build_store

    base = _base()
    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=2, num_epochs=100)
    config = config_file(cfg, tmp_path / "config")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # A store of a live run (another process), which the sweep must keep.
    live = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from torchspec.transfer.local import LocalStore
        s = LocalStore()
        print(s.root, flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    before = _store_dirs(base)
    proc = subprocess.Popen([sys.executable, "-m", "torchspec.train_entry", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        live_root = Path(live.stdout.readline().strip())
        assert live_root.is_dir()
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):   # steps run: records are stored
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        engines = spawned_children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15   # orphaned engines notice the driver is gone and stop
        while any(map(_running, engines)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engines and not any(map(_running, engines))
        new = _store_dirs(base) - before - {live_root}   # (other runs on this machine may have made some too)
        [leaked] = [d for d in new if f"-{proc.pid}-" in d.name]   # the killed driver's, named by its pid
        assert any(leaked.iterdir())   # records and the counter file: memory held until someone removes them

        store = build_store(cfg)   # the next run's start
        try:
            assert not leaked.exists()
            assert live_root.is_dir()   # a live run's store is kept
            assert store.root.is_dir() and store.root != leaked
        finally:
            store.close()
        assert not store.root.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        live.communicate("")
    assert not live_root.exists()   # its owner removed it when it ended


def test_sweep_judges_only_dead_owners(tmp_path):
    """Owner gone -> removed; alive (this process), pid reused by another process (same pid, other start
    time), another pid namespace, or no owner in the name (an older torchspec's) -> kept."""
    ns, me = local._pid_namespace(), os.getpid()
    started = local._start_time(me)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dirs = {
        "dead": f"torchspec-store-{ns}-{gone.pid}-123-abcd1234",
        "reused": f"torchspec-store-{ns}-{me}-{int(started) + 1}-abcd1234",
        "alive": f"torchspec-store-{ns}-{me}-{started}-abcd1234",
        "other_ns": f"torchspec-store-{int(ns) + 1}-{gone.pid}-123-abcd1234",
        "unknown": "torchspec-store-k2j3h4g5",
        "not_a_store": f"other-{ns}-{gone.pid}-123-abcd1234",
    }
    for name in dirs.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "rec").write_bytes(b"x" * 100)
    removed = local.sweep_stale_stores(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dirs["dead"], dirs["reused"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        dirs[k] for k in ("alive", "other_ns", "unknown", "not_a_store"))
