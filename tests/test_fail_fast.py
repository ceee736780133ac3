"""A trainer rank or an inference engine that dies stops the run within seconds (not at
training.distributed_timeout_minutes) with one error naming it and how it ended, after the clean-up:
store emptied, the checkpoints of completed steps kept, no process or actor of the run left.

Under the local launcher (spawned processes) and the Ray launcher (a simulated 2-node Ray cluster on
127.0.0.1, rank 1 on the second node). A rank is SIGKILLed by the driver either right after it is
started (before the rendezvous) or right after rank 0 sent it step 3's "train" message (rank 0 then
meets a dead peer inside its gradient all-reduce); an engine is SIGKILLed after step 2.
"""

import os
import signal
import time
from pathlib import Path

import pytest

from pipeline_helpers import child_pids, kill_after_step_2, tiny_run_config
from torchspec.pipeline.failures import WorkerFailure

BOUND_S = 20.0   # from the kill to the error, everything cleaned up
SIGKILL = r"was killed by SIGKILL \(exit code -9\)"
# How Ray words a killed actor: a call in flight gets the death report ("died ... Worker exit type") when it comes
# within Ray's wait for it (timeout_ms_task_wait_for_death_info, 1 s), else "unavailable" (a loaded machine)
RAY_DEATH = r"(The actor died .*Worker exit type.*|its connection broke mid-call, before Ray reported why \(Ray: .*)"


def _resume(completed: int) -> str:
    """The end of the error: where to resume from."""
    if not completed:
        return "; no checkpoint had been written$"
    return rf"; the latest checkpoint is \S+/checkpoints/step_{completed:08d} \(resume: training.load_path=\S+/out\)$"

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install -e '.[ray]')")


def _config(tmp_path: Path, tiny_target_dir, **training):
    training = {"training_num_gpus_per_node": 2, "num_epochs": 1, **training}
    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=1, save_interval=1, **training)
    cfg.training.distributed_timeout_minutes = 1   # a regression fails in about a minute, not ten
    return cfg


class _Killer:
    """Wraps a launcher's Peers class: SIGKILLs rank 1 once `when` happens ("start": right after the ranks are
    started; ("train", n): right after rank 0 sent the n-th train message). `pid_of(peers)` = rank 1's pid."""

    def __init__(self, base, pid_of, when):
        killer = self
        self.killed_at = None

        class Peers(base):
            def __init__(self, *args, **kw):
                super().__init__(*args, **kw)
                self.trains = 0
                if when == "start":
                    killer.kill(pid_of(self))

            def send(self, messages):
                super().send(messages)
                if messages[0][0] == "train":
                    self.trains += 1
                    if when == ("train", self.trains):
                        killer.kill(pid_of(self))

        self.cls = Peers

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)
        self.killed_at = time.monotonic()


def _run_expecting_failure(cfg, match: str, monkeypatch, **kw):
    """run_training must raise WorkerFailure matching `match`; returns (error, the store it used, s from start)."""
    import torchspec.transfer.factory as factory
    from torchspec.pipeline.runner import run_training

    built, build_store = [], factory.build_store
    monkeypatch.setattr(factory, "build_store", lambda c, *a: built.append(build_store(c, *a)) or built[-1])
    t0 = time.monotonic()
    with pytest.raises(WorkerFailure, match=match) as err:
        run_training(cfg, progress=False, **kw)
    [store] = built
    return err.value, store, time.monotonic() - t0


# The engine tests run several epochs: the engine must still owe data when it is killed after step 2. In one
# 3-step epoch the pool (plus the batch in flight) could already hold step 3, and the run would end cleanly
# before the death is seen (a Ray engine's death is seen when a call pending on it fails; with none left, never).
ENGINE_TEST_EPOCHS = 4


def _kill_engine_after_step_2(monkeypatch, pid_of):
    """SIGKILLs engine 0 (`pid_of(engines)`) right after step 2: (on_step, the steps seen, [the kill's time])."""
    on_step, steps, killed_at, _ = kill_after_step_2(
        monkeypatch, lambda engines: os.kill(pid_of(engines), signal.SIGKILL))
    return on_step, steps, killed_at


def _assert_cleaned_up(store, cfg, children_before: set, completed_steps: int):
    from torchspec.training.checkpoint import CheckpointManager

    assert child_pids() <= children_before                   # no engine or rank process left
    assert store.root is not None and not Path(store.root).exists()   # the local store emptied and removed
    latest = CheckpointManager(Path(cfg.output_dir), cfg.training.max_checkpoints).latest()
    if completed_steps:
        assert latest is not None and latest.name == f"step_{completed_steps:08d}"
    else:
        assert latest is None


# -- the local launcher ----------------------------------------------------------------------------

def _local_pid(peers):
    return peers.procs[0].pid


@pytest.mark.parametrize("when, completed", [("start", 0), (("train", 3), 2)], ids=["before_rendezvous", "mid_run"])
def test_local_rank_killed(tmp_path, tiny_target_dir, monkeypatch, cpu_only, when, completed):
    from torchspec.pipeline import launcher_local

    killer = _Killer(launcher_local.ProcessPeers, _local_pid, when)
    monkeypatch.setattr(launcher_local, "ProcessPeers", killer.cls)
    cfg = _config(tmp_path, tiny_target_dir)
    children = child_pids()
    err, store, _ = _run_expecting_failure(cfg, rf"^trainer rank 1 \(process \d+\) {SIGKILL}" + _resume(completed),
                                           monkeypatch)
    took = time.monotonic() - killer.killed_at
    assert took < BOUND_S, f"the run noticed rank 1's death after {took:.1f}s"
    _assert_cleaned_up(store, cfg, children, completed)
    print(f"local {when}: error {took:.1f}s after the kill: {err}")


def test_local_engine_killed(tmp_path, tiny_target_dir, monkeypatch, cpu_only):
    on_step, steps, killed_at = _kill_engine_after_step_2(monkeypatch, lambda engines: engines.procs[0].pid)
    cfg = _config(tmp_path, tiny_target_dir, training_num_gpus_per_node=1, num_epochs=ENGINE_TEST_EPOCHS)
    children = child_pids()
    err, store, _ = _run_expecting_failure(cfg, rf"^inference engine 0 \(process \d+\) {SIGKILL}; the latest ",
                                           monkeypatch, on_step=on_step)
    took = time.monotonic() - killed_at[0]
    assert took < BOUND_S
    assert steps[-1] >= 2                           # the pool may hold a step's worth made before the kill
    assert str(err).endswith(f"checkpoints/step_{steps[-1]:08d} (resume: training.load_path={cfg.output_dir})")
    _assert_cleaned_up(store, cfg, children, steps[-1])
    print(f"local engine: error {took:.1f}s after the kill: {err}")


# -- the Ray launcher, two simulated nodes ---------------------------------------------------------

@pytest.fixture(scope="module")
def two_nodes():
    from ray_helpers import two_nodes_or_skip

    yield from two_nodes_or_skip(head_cpus=2, node_cpus=1)   # head: the engine + rank 0; second: rank 1


def _ray_pid(peers):
    return peers.pids[1]


@needs_ray
@pytest.mark.parametrize("when, completed", [("start", 0), (("train", 3), 2)], ids=["before_rendezvous", "mid_run"])
def test_ray_rank_killed(tmp_path, tiny_target_dir, monkeypatch, cpu_only, two_nodes, when, completed):
    from ray_helpers import cpus_free, live_actors
    from torchspec.pipeline import ray_ranks

    head, second = two_nodes
    killer = _Killer(ray_ranks.RayPeers, _ray_pid, when)
    monkeypatch.setattr(ray_ranks, "RayPeers", killer.cls)   # start_ray_trainer_ranks looks it up in ray_ranks
    cfg = _config(tmp_path, tiny_target_dir, training_num_nodes=2, training_num_gpus_per_node=1)
    cfg.inference.launcher = "ray"
    cfg.inference.store = "local"   # one machine: shared memory works (tests/test_ray_mooncake_multinode.py: mooncake)
    children = child_pids()
    err, store, _ = _run_expecting_failure(
        cfg, rf"^trainer rank 1 \(Ray actor, pid \d+, node {second[:8]}\) died: {RAY_DEATH}"
        + _resume(completed), monkeypatch)
    took = time.monotonic() - killer.killed_at
    assert took < BOUND_S, f"the run noticed rank 1's death after {took:.1f}s"
    assert "\n" not in str(err)
    _assert_cleaned_up(store, cfg, children, completed)
    assert live_actors(ray) == [] and cpus_free(ray, 3)
    print(f"ray {when}: error {took:.1f}s after the kill: {err}")


@needs_ray
def test_ray_engine_killed(tmp_path, tiny_target_dir, monkeypatch, cpu_only, two_nodes):
    from ray_helpers import cpus_free, live_actors

    on_step, steps, killed_at = _kill_engine_after_step_2(monkeypatch, lambda engines: engines.pids[0])
    cfg = _config(tmp_path, tiny_target_dir, training_num_nodes=2, training_num_gpus_per_node=1,
                  num_epochs=ENGINE_TEST_EPOCHS)
    cfg.inference.launcher = "ray"
    cfg.inference.store = "local"
    children = child_pids()
    err, store, _ = _run_expecting_failure(
        cfg, rf"^inference engine 0 \(Ray actor, pid \d+, node \w{{8}}\) died: {RAY_DEATH}$", monkeypatch,
        on_step=on_step)
    took = time.monotonic() - killed_at[0]
    assert took < BOUND_S and "\n" not in str(err)
    assert steps[-1] >= 2
    assert str(err).endswith(f"checkpoints/step_{steps[-1]:08d} (resume: training.load_path={cfg.output_dir})")
    _assert_cleaned_up(store, cfg, children, steps[-1])
    assert live_actors(ray) == [] and cpus_free(ray, 3)
    print(f"ray engine: error {took:.1f}s after the kill: {err}")


def test_how_a_worker_ended_is_one_line():
    from torchspec.pipeline.failures import exit_text, ray_death_text

    assert exit_text(3) == "exited with code 3"
    assert exit_text(-9) == "was killed by SIGKILL (exit code -9)"
    assert exit_text(-11) == "was killed by SIGSEGV (exit code -11)"
    assert exit_text(None) == "is gone"
    ray_text = ("The actor died unexpectedly before finishing this task.\n\tclass_name: _TrainerRankActor\n\t"
                "actor_id: 1f2e\n\tpid: 42\nThe actor is dead because its worker process has died. Worker exit "
                "type: SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2. "
                "End of file. Some common causes include: (1) the process was killed by the OOM killer")
    assert ray_death_text(ray_text) == ("The actor died unexpectedly before finishing this task. Worker exit type: "
                                        "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a "
                                        "connection error code 2. End of file.")
    assert ray_death_text("The actor was killed by ray.kill. Nothing else.") == "The actor was killed by ray.kill."
    unavailable = ("The actor 4594138cdd8a6f65350aa77401000000 is unavailable: The actor is temporarily unavailable: "
                   "RpcError: RPC error: recvmsg:Connection reset by peer rpc_code: 14")
    assert ray_death_text(unavailable) == ("its connection broke mid-call, before Ray reported why (Ray: " + unavailable
                                           + ").")


def _store_lost():
    from torchspec.transfer.base import StoreUnavailable

    return StoreUnavailable("the Mooncake master at 10.0.0.1:50051 stopped answering: delete of 'k' failed")


@pytest.mark.parametrize("error", [
    lambda: WorkerFailure("trainer rank 1 (process 4242) was killed by SIGKILL (exit code -9)"),
    _store_lost,   # a lost store that reaches train_entry outside the training loop
], ids=["dead_worker", "lost_store"])
def test_train_entry_reports_a_failure_in_one_line(tmp_path, monkeypatch, capsys, error):
    import sys
    import types

    from torchspec.train_entry import main

    def run_training(cfg):
        raise error()

    fake = types.ModuleType("torchspec.pipeline.runner")
    fake.run_training = run_training
    monkeypatch.setitem(sys.modules, "torchspec.pipeline.runner", fake)
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert main(["--config", str(configs / "hf_qwen3_8b.yaml"), f"output_dir={tmp_path / 'run'}"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {error()}"]
