"""The Ray + Mooncake path on loopback (the CPU-minutes rung of the testing ladder): the full pipeline on a
Ray cluster of two simulated nodes (`ray.cluster_utils.Cluster`, every server on 127.0.0.1) with
inference.store left at auto, so the Mooncake store is chosen because the run spans nodes, and a
mooncake_master the test starts, given as mooncake.master_server_address as a user with a cluster would.

Needs ray and mooncake (pip install -e '.[ray,mooncake]'); without either the test skips, unless
TORCHSPEC_REQUIRE_MOONCAKE=1 (then a missing mooncake fails it).
"""

import os
import time

import pytest

from pipeline_helpers import assert_same_training, child_pids, ids_by_epoch, tiny_run_config, two_node_configs
from store_helpers import alive, mooncake_missing, small_mooncake

HEAD_CPUS, NODE_CPUS = 3, 1   # head: two engines + trainer rank 0's slot; second node: trainer rank 1


def _missing() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray is not installed (pip install -e '.[ray]')"
    return mooncake_missing()


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def two_nodes():
    from ray_helpers import two_nodes_or_skip

    yield from two_nodes_or_skip(HEAD_CPUS, NODE_CPUS)


@pytest.fixture
def master():
    """A mooncake_master of our own on 127.0.0.1 (as a cluster's user would run one where all nodes reach it)."""
    from torchspec.transfer.mooncake_master import start_master

    m = start_master()
    yield m
    m.stop()


def test_two_nodes_auto_store_is_mooncake_weights_equal_local(tmp_path, tiny_target_dir, two_nodes, master,
                                                              monkeypatch, cpu_only):
    """2 engines (Ray actors) + trainer ranks 0 (driver, head node) and 1 (Ray actor, second node), hidden
    states through Mooncake over TCP: every sample trained once per epoch, no record or key left in the
    master (which stays up: it is ours), no actor, placement group or process of the run left, and the
    weights bitwise those of the local launcher with the local store and the same seed."""
    import ray

    import torchspec.transfer.factory as factory
    from ray_helpers import live_actors, run_recording_placement
    from torchspec.data.dataset import from_config, load_tokenizer
    from torchspec.pipeline.runner import run_training
    from torchspec.transfer.mooncake import MooncakeStore
    from torchspec.transfer.mooncake_master import http_get

    head, second = two_nodes
    cfg, local_cfg = two_node_configs(tmp_path, tiny_target_dir)
    assert cfg.inference.store == "auto"          # left at its default: the run spans nodes -> mooncake
    cfg.mooncake.master_server_address = master.rpc_address
    cfg.mooncake.master_metrics_port = int(master.admin_url.rpartition(":")[2])
    small_mooncake(cfg)

    built, build_store = [], factory.build_store
    monkeypatch.setattr(factory, "build_store", lambda c, *a: built.append(build_store(c, *a)) or built[-1])
    children = child_pids()                       # the Ray cluster's processes and our master
    t0 = time.monotonic()
    ray_run, started, engine_files = run_recording_placement(cfg, tmp_path / "engines", monkeypatch)
    ray_s = time.monotonic() - t0

    [store] = built
    assert isinstance(store, MooncakeStore) and store.master_address == master.rpc_address
    [(rank_nodes, init_method)] = started
    assert rank_nodes == [head, second] and init_method.startswith("tcp://127.0.0.1:")
    assert [p.read_text() for p in engine_files] == [head, head]

    all_ids = sorted(s.sample_id for s in from_config(cfg, load_tokenizer(cfg), progress=False))
    epochs = ids_by_epoch(ray_run.trained)
    assert len(all_ids) == 12 and sorted(epochs) == [0, 1]
    assert all(sorted(epochs[e]) == all_ids for e in (0, 1))   # every sample exactly once per epoch
    assert not ray_run.interrupted and ray_run.global_step == 6
    assert ray_run.store_put_bytes > 0 and ray_run.store_bytes_end == 0 and ray_run.store_root is None

    # the master is ours: still up, and it holds nothing of the run (records, put ledgers)
    assert master.alive()
    assert [k for k in http_get(master.admin_url + "/get_all_keys").decode().split("\n") if k.strip()] == []
    # nothing the run started is left: actors, placement groups, engine processes, children of this process
    assert live_actors(ray) == []
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    assert not any(alive(int(p.stem)) for p in engine_files)
    assert child_pids() <= children

    # the local launcher with the local store, same seed and world size
    local_run = run_training(local_cfg, progress=False)
    assert type(built[-1]).__name__ == "LocalStore"
    assert_same_training(ray_run, local_run)
    print(f"ray+mooncake run {ray_s:.1f}s")


def _two_node_run(tmp_path, target, master):
    """2 engines + 2 trainer ranks (one per node) through the Mooncake store of `master`, a checkpoint every step."""
    cfg = tiny_run_config(tmp_path, target, engines=2, num_epochs=1, seed=11, save_interval=1,
                          training_num_nodes=2, training_num_gpus_per_node=1)
    cfg.training.distributed_timeout_minutes = 1
    cfg.inference.launcher = "ray"
    cfg.mooncake.master_server_address = master.rpc_address
    cfg.mooncake.master_metrics_port = int(master.admin_url.rpartition(":")[2])
    small_mooncake(cfg)
    return cfg


def test_rank_killed_mid_run_leaves_the_master_empty(tmp_path, tiny_target_dir, two_nodes, master, monkeypatch,
                                                    cpu_only):
    """Trainer rank 1 (second node) SIGKILLed after step 2: the run stops within seconds with one error naming
    it and the step-2 checkpoint; the master (ours) is still up and holds nothing of the run; no actor,
    placement group or process of the run is left."""
    import signal

    import ray

    from ray_helpers import cpus_free, live_actors
    from torchspec.pipeline import runner
    from torchspec.pipeline.failures import WorkerFailure
    from torchspec.pipeline.runner import run_training
    from torchspec.transfer.mooncake_master import http_get

    head, second = two_nodes
    cfg = _two_node_run(tmp_path, tiny_target_dir, master)
    ranks, start_ranks = [], runner.start_trainer_ranks
    monkeypatch.setattr(runner, "start_trainer_ranks", lambda *a: ranks.append(start_ranks(*a)) or ranks[-1])
    killed_at = []

    def on_step(step, _metrics):
        if step == 2:
            os.kill(ranks[0].peers.pids[1], signal.SIGKILL)
            killed_at.append(time.monotonic())

    children = child_pids()
    with pytest.raises(WorkerFailure, match=rf"^trainer rank 1 \(Ray actor, pid \d+, node {second[:8]}\) died: .*; "
                                            r"the latest checkpoint is \S+/step_00000002 \(resume: "):
        run_training(cfg, on_step=on_step, progress=False)
    took = time.monotonic() - killed_at[0]
    assert took < 20, f"the run noticed rank 1's death after {took:.1f}s"
    assert master.alive()
    assert [k for k in http_get(master.admin_url + "/get_all_keys").decode().split("\n") if k.strip()] == []
    assert live_actors(ray) == [] and cpus_free(ray, HEAD_CPUS + NODE_CPUS)
    assert child_pids() <= children
    print(f"rank killed: error {took:.1f}s after the kill")


def test_master_lost_mid_run_is_one_line_naming_it_and_the_checkpoint(tmp_path, tiny_target_dir, two_nodes,
                                                                     monkeypatch, cpu_only):
    """The mooncake_master SIGTERMed after step 2 (engines on the head, trainer rank 1 on the second node): the
    run stops within seconds with one WorkerFailure naming the master's address, what failed and the step-2
    checkpoint; the clean-up raises nothing more and still closes the engines, the trainer ranks and the store
    (no actor, placement group or process of the run left)."""
    import signal

    import ray

    from ray_helpers import cpus_free, live_actors
    from torchspec.pipeline import runner
    from torchspec.pipeline.failures import WorkerFailure
    from torchspec.pipeline.runner import run_training
    from torchspec.transfer.mooncake_master import start_master

    master = start_master()
    try:
        cfg = _two_node_run(tmp_path, tiny_target_dir, master)
        peers, start_ranks = [], runner.start_trainer_ranks

        def recording_ranks(*a):
            ranks = start_ranks(*a)
            peers.append(ranks.peers)
            return ranks

        monkeypatch.setattr(runner, "start_trainer_ranks", recording_ranks)
        engines, start_engines = [], runner.start_engines
        monkeypatch.setattr(runner, "start_engines", lambda *a: engines.append(start_engines(*a)) or engines[-1])
        killed_at = []

        def on_step(step, _metrics):
            if step == 2:
                master.proc.send_signal(signal.SIGTERM)
                master.proc.wait()
                killed_at.append(time.monotonic())

        children = child_pids()
        addr = master.rpc_address.replace(".", r"\.")
        with pytest.raises(WorkerFailure, match=rf"^(inference engine \d: |trainer rank \d: )?the Mooncake master at "
                                                rf"{addr} \(mooncake.master_server_address; admin http://\S+\) stopped "
                                                r"answering: .+ failed.*; the latest checkpoint is \S+/step_00000002 "
                                                r"\(resume: training.load_path=\S+/out\)$") as err:
            run_training(cfg, on_step=on_step, progress=False)
        took = time.monotonic() - killed_at[0]
        assert "\n" not in str(err.value)
        assert took < 20, f"the run noticed the master's loss after {took:.1f}s"
        # the clean-up ran to its end: ranks and engines closed, no actor, placement group or process left
        assert peers[0].actors == {} and engines[0].actors == []
        assert live_actors(ray) == [] and cpus_free(ray, HEAD_CPUS + NODE_CPUS)
        assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
        pids = engines[0].pids + list(peers[0].pids.values())
        deadline = time.monotonic() + 15   # Ray reports an actor dead before its worker process has exited
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(p) for p in pids)
        assert child_pids() <= children
        print(f"master lost: error {took:.1f}s after the kill: {err.value}")
    finally:
        master.stop()
