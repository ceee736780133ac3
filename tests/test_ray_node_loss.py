"""A Ray node that dies mid-run (its raylet SIGKILLed), on a Ray cluster simulated on this machine (a head node,
the driver's, and a second node holding both engines, every server on 127.0.0.1): the run stops within seconds
with one error naming an engine on that node and the checkpoint to resume from, and no actor process of the
dead node is left (each actor dies with its raylet: `ray_placement.guard_parent`).

Before the guard, the engines' processes outlived their raylet (parent pid 1), kept serving the driver's calls
and the run finished as if nothing had happened, leaving them behind."""

import os
import signal
import time

import pytest

from pipeline_helpers import child_pids, kill_after_step_2, tiny_run_config
from store_helpers import alive

try:
    import ray
except ImportError:
    ray = None

pytestmark = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install -e '.[ray]')")

HEAD_CPUS, NODE_CPUS = 1, 2   # head: trainer rank 0's slot; second node: the two engines


@pytest.fixture(scope="module")
def cluster():
    from ray_helpers import simulated_cluster

    if ray.is_initialized():
        pytest.skip("a Ray connection is already open in this process")
    with simulated_cluster(HEAD_CPUS, NODE_CPUS) as nodes:
        yield nodes


def test_dead_node_stops_the_run_and_leaves_no_actor_process(tmp_path, tiny_target_dir, cluster, monkeypatch,
                                                               cpu_only):
    from ray_helpers import raylet_process
    from torchspec.pipeline.failures import WorkerFailure
    from torchspec.pipeline.runner import run_training

    head, second = cluster
    # many epochs: the run must still be going when the node's death is seen (Ray marks a node dead only after
    # missed health checks, seconds after the kill; a short run could finish on what the pool already holds)
    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=2, num_epochs=60, save_interval=1)
    cfg.inference.launcher = "ray"
    cfg.inference.store = "local"   # every node is this machine
    def kill_the_node(group):
        assert group.nodes == [second.node_id] * 2   # both engines on the node we kill
        raylet = raylet_process(second)
        os.kill(raylet.pid, signal.SIGKILL)
        raylet.wait()

    on_step, steps, killed_at, engines = kill_after_step_2(monkeypatch, kill_the_node)

    children = child_pids()
    node = second.node_id[:8]
    with pytest.raises(WorkerFailure, match=rf"^(inference engine \d \(Ray actor, pid \d+, node {node}\) died: .*"
                                            rf"|Ray node {node} \(127\.0\.0\.1\) is dead; on it: inference engine 0 "
                                            rf"\(pid \d+\), inference engine 1 \(pid \d+\)); the latest checkpoint is "
                                            r"\S+/step_\d{8} \(resume: training.load_path=\S+/out\)$") as err:
        run_training(cfg, on_step=on_step, progress=False)
    took = time.monotonic() - killed_at[0]
    assert took < 20, f"the run noticed the dead node after {took:.1f}s"
    assert "\n" not in str(err.value)
    # the engine processes died with their raylet (ray.kill could not reach them)
    deadline = time.monotonic() + 5
    while any(alive(p) for p in engines[0].pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in engines[0].pids), "an engine actor outlived its node's raylet"
    assert child_pids() <= children
    print(f"dead node: error {took:.1f}s after the raylet's kill: {err.value}")
