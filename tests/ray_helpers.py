"""Shared set-up of the tests that start Ray on this machine."""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def loopback_only():
    """Ray's "no cluster" mode (servers on 127.0.0.1 only) and no usage reporting, for Rays started inside."""
    from ray._private import ray_constants

    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    saved_flag, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cpus_free(ray, n: float, timeout: float = 10.0) -> bool:
    """True once Ray has all n CPUs free again (placement groups are removed asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU") != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextmanager
def simulated_cluster(head_cpus: int, node_cpus: int, object_store_memory: int = 80 << 20):
    """A simulated 2-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head node, the driver's,
    and a second node, each its own raylet, every server on 127.0.0.1), connected; yields (head id, the second
    node's `ray._private.node.Node`: `.node_id`, `.all_processes`)."""
    import ray
    from ray.cluster_utils import Cluster

    with loopback_only():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": head_cpus, "num_gpus": 0, "include_dashboard": False,
            "object_store_memory": object_store_memory})
        try:
            second = cluster.add_node(num_cpus=node_cpus, num_gpus=0, object_store_memory=object_store_memory)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False)
            head = ray.get_runtime_context().get_node_id()
            assert {n["NodeID"] for n in ray.nodes()} == {head, second.node_id}
            assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
            yield head, second
        finally:
            ray.shutdown()
            cluster.shutdown()


@contextmanager
def two_node_cluster(head_cpus: int, node_cpus: int, object_store_memory: int = 80 << 20):
    """`simulated_cluster`, yielding (head id, second id)."""
    with simulated_cluster(head_cpus, node_cpus, object_store_memory) as (head, second):
        yield head, second.node_id


def raylet_process(node):
    """The raylet (subprocess.Popen) of a `ray._private.node.Node`, e.g. to kill its node."""
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process


def live_actors(ray) -> list[dict]:
    """Actors of the connected cluster that are not DEAD (from the GCS; needs no dashboard)."""
    from ray._private.state import actors

    return [a for a in actors().values() if a["State"] != "DEAD"]


def two_nodes_or_skip(head_cpus: int, node_cpus: int):
    """The body of a module fixture `two_nodes`: yields (head id, second id) of `two_node_cluster`, or skips
    the tests when this process already holds a Ray connection."""
    import ray
    import pytest

    if ray.is_initialized():
        pytest.skip("a Ray connection is already open in this process")
    with two_node_cluster(head_cpus, node_cpus) as nodes:
        yield nodes


class NodeRecordingFactory:
    """The config's engine, built where Ray runs it; leaves `<pid>.node` = the Ray node id of the actor."""

    def __init__(self, cfg, out_dir):
        self.cfg, self.out_dir = cfg, out_dir

    def __call__(self, store, device):
        import ray

        from torchspec.inference.factory import build_engine

        (self.out_dir / f"{os.getpid()}.node").write_text(ray.get_runtime_context().get_node_id())
        return build_engine(self.cfg, store, device)


def run_recording_placement(cfg, engines_dir, monkeypatch):
    """run_training(cfg) (a Ray-launched config) with its engines built by NodeRecordingFactory into
    `engines_dir` and the trainer ranks' start recorded; returns (the run, [(rank nodes, init_method)] of
    each start, the engines' `<pid>.node` files). start_trainer_ranks is the real one again afterwards."""
    import sys

    import ray

    from torchspec.pipeline import runner
    from torchspec.pipeline.runner import run_training

    started, start_ranks = [], runner.start_trainer_ranks

    def recording_ranks(*args):
        ranks = start_ranks(*args)
        started.append((list(ranks.peers.nodes), ranks.peers.init_method))
        return ranks

    monkeypatch.setattr(runner, "start_trainer_ranks", recording_ranks)
    engines_dir.mkdir()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the factory class travels by value
    try:
        run = run_training(cfg, engine_factory=NodeRecordingFactory(cfg, engines_dir), progress=False)
    finally:
        monkeypatch.setattr(runner, "start_trainer_ranks", start_ranks)
    return run, started, list(engines_dir.glob("*.node"))
