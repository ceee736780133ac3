"""The Ray launcher over several nodes, on a Ray cluster simulated on this machine
(`ray.cluster_utils.Cluster`: a head node and a second node, every server on 127.0.0.1):
trainer ranks on distinct nodes, engines on one, the same weights as the local launcher."""

import pytest

from pipeline_helpers import assert_same_training, ids_by_epoch, tiny_run_config, two_node_configs
from torchspec.pipeline.launcher_local import PlacementError

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install -e '.[ray]')")

HEAD_CPUS, NODE_CPUS = 3, 1   # head: two engines + trainer rank 0's slot; second node: trainer rank 1


@pytest.fixture(scope="module")
def two_nodes():
    """A head node (the driver's) and one more node, each its own raylet, all on 127.0.0.1."""
    from ray_helpers import two_nodes_or_skip

    yield from two_nodes_or_skip(HEAD_CPUS, NODE_CPUS)


@needs_ray
def test_two_nodes_trainer_ranks_spread_engines_on_one_weights_equal_local(tmp_path, tiny_target_dir, two_nodes,
                                                                           monkeypatch, cpu_only):
    """2 engines + trainer ranks 0 (driver, head node) and 1 (Ray actor, second node), gloo over a TCP
    store: every sample trained once per epoch, the store ends empty, and the final weights are bitwise
    those of the local launcher (2 spawned engines, 2 spawned ranks) with the same seed."""
    from ray_helpers import cpus_free, run_recording_placement
    from torchspec.pipeline.runner import run_training

    head, second = two_nodes
    cfg, local_cfg = two_node_configs(tmp_path, tiny_target_dir)
    if hasattr(cfg.inference, "store"):   # several nodes would pick mooncake; one machine may share memory
        cfg.inference.store = "local"
    ray_run, started, engine_files = run_recording_placement(cfg, tmp_path / "engines", monkeypatch)

    # rank 1's node as its actor reported it: the second node; rank 0 is the driver, on the head
    [(rank_nodes, init_method)] = started
    assert rank_nodes == [head, second]
    assert init_method.startswith("tcp://127.0.0.1:")
    # both engines built inside actors on one node: the head (the second node's CPU holds rank 1)
    assert [p.read_text() for p in engine_files] == [head, head]

    from torchspec.data.dataset import from_config, load_tokenizer
    all_ids = sorted(s.sample_id for s in from_config(cfg, load_tokenizer(cfg), progress=False))
    epochs = ids_by_epoch(ray_run.trained)
    assert sorted(epochs) == [0, 1] and all(sorted(epochs[e]) == all_ids for e in (0, 1))
    assert not ray_run.interrupted and ray_run.global_step == 6           # 12 samples / (2 ranks x 2), 2 epochs
    assert ray_run.store_put_bytes > 0 and ray_run.store_bytes_end == 0
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    assert cpus_free(ray, HEAD_CPUS + NODE_CPUS)

    # the local launcher, same seed and world size (spawned engines and rank 1, file:// rendezvous)
    assert_same_training(ray_run, run_training(local_cfg, progress=False))


@needs_ray
def test_cluster_too_small_is_one_line_naming_the_keys(tmp_path, tiny_target_dir, two_nodes):
    from torchspec.pipeline.launcher import plan_placement

    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=2, training_num_nodes=3)
    cfg.inference.launcher = "ray"
    with pytest.raises(PlacementError, match=r"^training.training_num_nodes=3 x training.training_num_gpus_per_node=1: "
                                             r"needs 3 distinct node\(s\) with 1 CPU each; the Ray cluster has CPU "
                                             r"per node \[3.0, 1.0\]; fix: restart each training node with `ray start "
                                             r"--num-cpus=N` so Ray offers at least 1 CPU \(each engine and each "
                                             r"trainer rank holds 1 CPU\), or run fewer engines "
                                             r"\(inference.inference_num_gpus\) or trainer ranks "
                                             r"\(training.training_num_nodes, training.training_num_gpus_per_node\)$"):
        plan_placement(cfg)
    cfg.training.training_num_nodes, cfg.training.training_num_gpus_per_node = 2, 2
    with pytest.raises(PlacementError, match=r"needs 2 distinct node\(s\) with 2 CPU each"):
        plan_placement(cfg)
    cfg.training.training_num_gpus_per_node, cfg.inference.inference_num_gpus = 1, 3
    with pytest.raises(PlacementError, match=r"^inference.inference_num_gpus \(3 CPU for 3 engine\(s\)\) \+ "
                                             r"training.training_num_nodes x training.training_num_gpus_per_node "
                                             r"\(2\) = 5 CPU, but the Ray cluster has CPU per node \[3.0, 1.0\] "
                                             r"\(4 in all\); fix: restart the nodes with `ray start --num-cpus=N` so "
                                             r"Ray offers 1 more CPU in all \(each engine and each trainer rank "
                                             r"holds 1 CPU\), or run fewer engines \(inference.inference_num_gpus\) "
                                             r"or trainer ranks"):
        plan_placement(cfg)
    cfg.inference.inference_num_gpus = 2
    assert len(plan_placement(cfg).trainer_devices) == 2   # what the other test runs fits


@needs_ray
def test_local_store_refused_for_ranks_on_another_machine(tmp_path, tiny_target_dir, two_nodes, monkeypatch):
    """The second node faked onto another IP: the trainer-rank actors are refused before they join the
    process group, with the mooncake hint, and their placement group is removed."""
    from ray_helpers import cpus_free
    from torchspec.pipeline import launcher_ray, ray_placement
    from torchspec.pipeline.launcher import plan_placement
    from torchspec.transfer.local import LocalStore

    head, second = two_nodes
    real = ray_placement.node_ips   # check_local_store looks node_ips up in ray_placement
    monkeypatch.setattr(ray_placement, "node_ips",
                        lambda ids: {n: ("10.0.0.2" if n == second else ip) for n, ip in real(ids).items()})
    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=2, training_num_nodes=2)
    cfg.inference.launcher = "ray"
    store = LocalStore()
    try:
        with pytest.raises(PlacementError, match=r"^Ray placed trainer ranks on another machine \(10.0.0.2\) than the "
                                                 r"driver's \(127.0.0.1\); .* needs the mooncake store "
                                                 r"\(inference.store=mooncake\)$"):
            launcher_ray.RayPeers(cfg, None, store, plan_placement(cfg))
    finally:
        store.close()
    assert cpus_free(ray, HEAD_CPUS + NODE_CPUS)


def test_store_setting_local_over_several_machines_is_refused(tmp_path, tiny_target_dir):
    """inference.store=local (the setting, where it exists) with a run over several nodes of a cluster on
    several machines; on one machine (a simulated cluster) it is allowed."""
    from torchspec.pipeline.launcher_ray import check_store_config

    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=2, training_num_nodes=2)
    one_machine = [{"NodeID": "a", "NodeManagerAddress": "127.0.0.1"}, {"NodeID": "b", "NodeManagerAddress": "127.0.0.1"}]
    two_machines = [{"NodeID": "a", "NodeManagerAddress": "10.0.0.1"}, {"NodeID": "b", "NodeManagerAddress": "10.0.0.2"}]
    setattr(cfg.inference, "store", "local")
    check_store_config(cfg, one_machine)
    with pytest.raises(PlacementError, match=r"^inference.store=local: this run spans several nodes \(training."
                                             r"training_num_nodes=2\) of a Ray cluster on 2 machines, .*set "
                                             r"inference.store=mooncake$"):
        check_store_config(cfg, two_machines)
    setattr(cfg.inference, "store", "mooncake")
    check_store_config(cfg, two_machines)


def test_dry_run_layout_names_each_node(tmp_path, tiny_target_dir):
    from torchspec.config.plan import format_plan, make_plan

    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=2, training_num_nodes=2, training_num_gpus_per_node=8)
    cfg.inference.inference_num_gpus = 16
    out = format_plan(cfg, make_plan(cfg))
    assert ("  layout:\n"
            "    node 0 (driver): trainer ranks 0-7 (rank 0 in the driver process, the others Ray actors)\n"
            "    node 1: trainer ranks 8-15 (Ray actors)\n"
            "    node 2: engines 0-7 (1 GPU(s) each)\n"
            "    node 3: engines 8-15 (1 GPU(s) each)\n") in out
    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=2, training_num_gpus_per_node=2)
    assert ("    node 0 (driver): engines 0-1 (1 GPU(s) each); trainer ranks 0-1 (rank 0 in the driver "
            "process, the others spawned processes)\n") in format_plan(cfg, make_plan(cfg))


def test_gpu_cluster_checks_name_the_keys(tmp_path, tiny_target_dir):
    """check_cluster on GPU nodes as ray.nodes() reports them (no Ray needed)."""
    from torchspec.pipeline.launcher_ray import check_cluster, plan_ray

    def node(i, gpus):
        return {"NodeID": f"n{i}", "Alive": True, "Resources": {"CPU": 64, **({"GPU": gpus} if gpus else {})}}

    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=8, training_num_nodes=2, training_num_gpus_per_node=8)
    cfg.inference.launcher = "ray"
    p = plan_ray(cfg, cluster_gpus=24)
    assert (p.trainer_bundles, p.trainer_strategy, p.trainer_devices) == (({"GPU": 8},) * 2, "STRICT_SPREAD",
                                                                         ("cuda",) * 16)
    check_cluster(p, [node(0, 8), node(1, 8), node(2, 8)], "n0")          # fits: 2 training nodes + 8 engine GPUs
    with pytest.raises(PlacementError, match=r"^inference.inference_num_gpus \(8 GPU for 8 engine\(s\)\) \+ training"
                                             r"\.training_num_nodes x training.training_num_gpus_per_node \(16\) = "
                                             r"24 GPU, but the Ray cluster has GPU per node \[8, 8, 4\] \(20 in all\); "
                                             r"fix: add nodes \(`ray start --address=<head-ip>:<port>` on each\) to "
                                             r"get 4 more GPU in all, or run fewer engines "
                                             r"\(inference.inference_num_gpus\) or trainer ranks"):
        check_cluster(p, [node(0, 8), node(1, 8), node(2, 4)], "n0")
    with pytest.raises(PlacementError, match=r"^training.training_num_nodes=2 x training.training_num_gpus_per_node=8: "
                                             r"needs 2 distinct node\(s\) with 8 GPU each"):
        check_cluster(p, [node(0, 8), node(1, 4), node(2, 4), node(3, 4)], "n0")
    with pytest.raises(PlacementError, match=r"^training.training_num_gpus_per_node=8: trainer rank 0 runs in the "
                                             r"driver, so the driver's node needs 8 GPU.*; fix: start the run on a node with 8 "
                                             r"GPU \(the driver's node is node 0\), or run fewer engines"):
        check_cluster(p, [node(0, 0), node(1, 8), node(2, 8), node(3, 8)], "n0")   # driver on a CPU-only head
