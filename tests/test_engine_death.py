"""An engine process that dies under the real CLI (`python -m torchspec.train_entry`, local launcher, two
engines): the driver stops dispatching to it at once, prints one line naming it, exits with code 1 and
leaves no process behind, also when the dead engine's prompt queue holds more than a pipe's worth of
unread prompts (the case where multiprocessing's queue feeder thread blocks for good and, unless its
join is cancelled, the driver hangs at exit after printing its error).

The engine is first stopped (SIGSTOP) so the driver fills its queue up to `inference_buffer_threshold`
samples (64 samples of up to 512 tokens: well over the 64 KiB of a Linux pipe) while the other engine
keeps the run going, then SIGKILLed.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pipeline_helpers import config_file, spawned_children, tiny_run_config

EXIT_BOUND_S = 20.0   # from the kill to the driver's exit, clean-up included (measured: ~2-4 s on 2 busy CPUs)
ERROR_BOUND_S = 10.0  # from the kill to the error line


def _config_file(tmp_path: Path, target_dir) -> Path:
    cfg = tiny_run_config(tmp_path, target_dir, n_conversations=40, engines=2, num_epochs=100)
    cfg.training.max_seq_length = 512
    cfg.training.training_num_gpus_per_node = 1
    inf = cfg.inference
    inf.inference_batch_size = 4
    inf.inference_buffer_threshold = 64   # the bound of each engine's queue, in samples
    inf.max_sample_pool_size = 160
    return config_file(cfg, tmp_path / "config")


def _group_members(pgid: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if os.getpgid(int(d.name)) == pgid and state != "Z":
                    found.append(int(d.name))
            except (ProcessLookupError, FileNotFoundError):
                pass
    return found


def test_killed_engine_with_a_full_queue_ends_the_driver(tmp_path, tiny_target_dir, cpu_only):
    config = _config_file(tmp_path, tiny_target_dir)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "torchspec.train_entry", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), ln) for ln in proc.stderr), daemon=True)
    reader.start()
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):   # engines up, steps running
            assert proc.poll() is None, "".join(ln for _, ln in lines)[-3000:]
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        engines = spawned_children(proc.pid)
        assert len(engines) == 2, engines
        victim = engines[0]
        os.kill(victim, signal.SIGSTOP)   # it reads no more prompts: the driver fills its queue
        time.sleep(3.0)
        assert proc.poll() is None        # the other engine keeps the run going
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            proc.wait(timeout=EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the driver did not exit within {EXIT_BOUND_S} s of the engine's death; "
                                 "stderr:\n" + "".join(ln for _, ln in lines)[-3000:]) from None
        exited_after = time.monotonic() - killed_at
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = "".join(ln for _, ln in lines)
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [(t, ln.rstrip("\n")) for t, ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    at, line = errors[0]
    assert re.match(rf"error: inference engine [01] \(process {victim}\) was killed by SIGKILL \(exit code -9\); "
                    r"(the latest checkpoint is \S+/step_\d+ \(resume: training.load_path=\S+\)"
                    r"|no checkpoint had been written)$", line), line
    assert at - killed_at < ERROR_BOUND_S
    # no process of the run outlives it (one still exiting gets a few seconds)
    deadline = time.monotonic() + 10
    while (left := _group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left
    print(f"error line {at - killed_at:.1f} s, exit {exited_after:.1f} s after the kill")


def test_a_failure_stops_the_surviving_engine_after_the_batch_it_is_on(tmp_path):
    """Engine 1 has 20 batches queued (0.3 s each) when engine 0 dies: the failure's close drops engine 1's queue,
    so engine 1 ends after the batch it is on (before: it read its stop only after its whole backlog, 6 s here,
    up to 64 queued samples in a real run, all inside the driver's error path)."""
    import functools

    import pytest
    import torch
    from test_pipeline_controller import fake_factory

    from torchspec.data.sample import Sample
    from torchspec.pipeline.failures import WorkerFailure
    from torchspec.pipeline.launcher_local import ProcessEngines
    from torchspec.transfer.local import LocalStore

    samples = [Sample(f"id{i}", torch.arange(3) + i, torch.ones(3, dtype=torch.uint8)) for i in range(20)]
    store = LocalStore(root=tmp_path / "s")
    engines = ProcessEngines(functools.partial(fake_factory, delay=0.3), store, ["cpu", "cpu"])
    try:
        for s in samples:
            engines.submit(1, [s])
        deadline = time.monotonic() + 30
        while not engines.wait(0.5):   # engine 1 is working through its queue
            assert time.monotonic() < deadline
        victim = engines.procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        before, t0 = len(store.keys()), time.monotonic()
        with pytest.raises(WorkerFailure, match=r"^inference engine 0 "):
            engines.wait(0.0)
        took = time.monotonic() - t0
        assert not engines.procs[1].is_alive()
        done = len(store.keys())
        # the batch it was on, and at most one it took while its queue was being emptied
        assert done <= before + 2, f"engine 1 ran {done - before} more of its 20 queued batches before it stopped"
        print(f"engine 1 stopped {took:.2f} s after the failure, {done} of 20 batches done ({before} before it)")
    finally:
        engines.close()
        store.close()


def test_a_dead_engine_gets_no_more_work_and_is_reported_at_once(tmp_path):
    """With engine 0 dead and engine 1 still delivering: a submission to either raises at once (before: it
    went into a queue nobody reads), and so does a wait(0) (before: results of engine 1 kept coming and
    the death was only noticed once a blocking wait found the queue empty for a whole second)."""
    import functools

    import pytest
    import torch
    from test_pipeline_controller import fake_factory

    from torchspec.data.sample import Sample
    from torchspec.pipeline.failures import WorkerFailure
    from torchspec.pipeline.launcher_local import ProcessEngines
    from torchspec.transfer.local import LocalStore

    samples = [Sample(f"id{i}", torch.arange(3) + i, torch.ones(3, dtype=torch.uint8)) for i in range(4)]
    store = LocalStore(root=tmp_path / "s")
    engines = ProcessEngines(functools.partial(fake_factory, delay=0.0), store, ["cpu", "cpu"])
    try:
        engines.submit(1, samples[:2])
        deadline = time.monotonic() + 30
        while not (done := engines.wait(0.5)):   # engine 1 delivers
            assert time.monotonic() < deadline
        assert done[0][0] == 1
        engines.submit(1, samples[2:])           # its next result is on the way while engine 0 dies
        victim = engines.procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        with pytest.raises(WorkerFailure, match=rf"^inference engine 0 \(process {victim.pid}\) was killed by SIGKILL"):
            engines.submit(0, samples[:1])
        with pytest.raises(WorkerFailure, match=r"^inference engine 0 "):
            engines.wait(0.0)
        assert not any(p.is_alive() for p in engines.procs)   # the failure stopped the other engine too
    finally:
        engines.close()
        store.close()
