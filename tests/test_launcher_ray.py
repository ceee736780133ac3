"""The Ray launcher on a local, CPU-only Ray cluster (127.0.0.1): the full pipeline with engine actors."""

import os
import re
import sys
from pathlib import Path

import pytest

from pipeline_helpers import ids_by_epoch, tiny_run_config
from ray_helpers import cpus_free, loopback_only
from torchspec.pipeline.launcher import plan_placement, select_launcher
from torchspec.pipeline.launcher_local import PlacementError, plan_local
from torchspec.pipeline.runner import run_training
from torchspec.utils.optional import install_hint

try:
    import ray
except ImportError:   # the Ray-cluster tests skip; the launcher-selection tests still run
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install -e '.[ray]')")


@needs_ray
def test_run_starts_and_stops_its_own_ray(tmp_path, tiny_target_dir, monkeypatch):
    """No Ray connection and no RAY_ADDRESS: the run starts a Ray of this machine and shuts it down.
    (First in the file: the module's shared Ray below is not up yet.)"""
    if ray.is_initialized():
        pytest.skip("a Ray connection is already open in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with loopback_only():
        result = run_training(_ray_config(tmp_path, tiny_target_dir, engines=1, num_epochs=1), progress=False)
    assert result.global_step == 6 and result.store_bytes_end == 0
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def local_ray():
    """A Ray cluster of this machine alone, every server on 127.0.0.1, no usage reporting; 3 CPUs: two
    engines and trainer rank 0's slot."""
    with loopback_only():
        ray.init(address="local", num_cpus=3, num_gpus=0, include_dashboard=False,
                 object_store_memory=80 << 20, log_to_driver=False)
        try:
            assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
            yield ray
        finally:
            ray.shutdown()


class _RecordingEngine:
    """The config's engine; appends the ids it generated to a file named by its process id."""

    def __init__(self, engine, path: Path):
        self.engine, self.path = engine, path

    def generate(self, samples):
        with open(self.path, "a") as f:
            f.writelines(f"{s.sample_id}\n" for s in samples)
        return self.engine.generate(samples)

    def close(self):
        self.engine.close()


class _RecordingFactory:
    """Builds the config's engine where Ray runs it; leaves `<pid>.built` (actor id, device) per engine."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg, out_dir

    def __call__(self, store, device):
        from torchspec.inference.factory import build_engine

        actor_id = ray.get_runtime_context().get_actor_id()
        (self.out_dir / f"{os.getpid()}.built").write_text(f"{actor_id} {device}")
        return _RecordingEngine(build_engine(self.cfg, store, device), self.out_dir / f"{os.getpid()}.ids")


def _bad_target_factory(store, device):
    from torchspec.config.errors import ConfigError

    raise ConfigError("model.target_model_path=/nowhere: no such directory (command line)")


def _ray_config(tmp_path, target_dir, engines: int, **kw):
    cfg = tiny_run_config(tmp_path, target_dir, engines=engines, **kw)
    cfg.inference.launcher = "ray"
    return cfg


@needs_ray
def test_two_ray_engine_actors_every_sample_once_per_epoch(tmp_path, tiny_target_dir, local_ray):
    cfg = _ray_config(tmp_path, tiny_target_dir, engines=2, num_epochs=2)
    placement = plan_placement(cfg)
    assert (placement.num_engines, placement.bundles, placement.strategy) == (2, ({"CPU": 1},), "STRICT_PACK")
    (tmp_path / "engines").mkdir()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the factory class travels by value
    result = run_training(cfg, engine_factory=_RecordingFactory(cfg, tmp_path / "engines"), progress=False)
    # two engines, each built inside its own Ray actor (another process), on CPU
    built = {int(p.stem): p.read_text().split() for p in (tmp_path / "engines").glob("*.built")}
    assert len(built) == 2 and os.getpid() not in built
    assert len({a for a, _ in built.values()}) == 2 and all(a != "None" and d == "cpu" for a, d in built.values())
    # both actors generated, and between them every sample exactly once per epoch
    ids_files = {pid: tmp_path / "engines" / f"{pid}.ids" for pid in built}
    assert all(f.is_file() for f in ids_files.values()), "an engine actor never generated"
    generated = {pid: f.read_text().split() for pid, f in ids_files.items()}

    from torchspec.data.dataset import from_config, load_tokenizer
    all_ids = sorted(s.sample_id for s in from_config(cfg, load_tokenizer(cfg), progress=False))
    epochs = ids_by_epoch(result.trained)
    assert sorted(epochs) == [0, 1]
    for e in (0, 1):
        assert sorted(epochs[e]) == all_ids             # every id exactly once per epoch
    assert sorted(sum(generated.values(), [])) == sorted(all_ids * 2)
    assert not result.interrupted and result.global_step == 12
    assert result.pool_sizes and max(result.pool_sizes) <= cfg.inference.max_sample_pool_size
    # the actors' puts are accounted in the driver's store counters: all bytes released, none leaked
    assert result.store_put_bytes > 0 and result.store_bytes_end == 0
    assert not list(result.store_root.parent.glob(result.store_root.name))   # the store directory is gone
    assert all(loss == loss and loss > 0 for _, loss in result.losses)
    # the placement groups are gone afterwards, and the actors' CPUs free again
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    assert cpus_free(ray, 3)


@needs_ray
@pytest.mark.parametrize("defer", [False, True])
def test_ray_engine_losses_bitwise_equal_local_engine(tmp_path, tiny_target_dir, local_ray, defer):
    """One engine each (Ray actor vs spawned process): same sample order and bitwise-equal losses. With
    several engines the pool's order depends on which engine finishes first, under either launcher.
    With defer_tokenization the actor tokenizes the record bytes it is sent, to the same samples."""
    cfg = _ray_config(tmp_path / "ray", tiny_target_dir, engines=1, num_epochs=1, seed=5)
    cfg.dataset.defer_tokenization = defer
    ray_run = run_training(cfg, progress=False)
    local_run = run_training(tiny_run_config(tmp_path / "local", tiny_target_dir, engines=1, num_epochs=1, seed=5),
                             progress=False)
    assert len(ray_run.losses) == 6
    assert [x[2] for x in ray_run.trained] == [x[2] for x in local_run.trained]
    assert ray_run.losses == local_run.losses            # floats compared exactly
    assert ray_run.store_bytes_end == local_run.store_bytes_end == 0


def test_missing_ray_is_one_clear_error(tmp_path, tiny_target_dir, monkeypatch):
    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=1, training_num_nodes=2)
    monkeypatch.setitem(sys.modules, "ray", None)       # `import ray` now fails
    with pytest.raises(ImportError, match=r"training.training_num_nodes=2: a run over several nodes needs the "
                                          r"Ray launcher: .*" + re.escape(install_hint("ray"))):
        select_launcher(cfg)
    cfg.training.training_num_nodes = 1
    assert select_launcher(cfg) == "local"
    cfg.inference.inference_num_gpus, cfg.inference.inference_num_gpus_per_node = 16, 8   # engines on 2 nodes
    with pytest.raises(ImportError, match=r"inference.inference_num_gpus=16 > inference.inference_num_gpus_per_node"
                                          r"=8: a run over several nodes needs the Ray launcher"):
        select_launcher(cfg)
    cfg.inference.inference_num_gpus = 8   # 8 engine GPUs + 1 trainer GPU do not fit one 8-GPU machine
    with pytest.raises(ImportError, match=r"inference.inference_num_gpus=8 \+ training.training_num_gpus_per_node=1 "
                                          r"> inference.inference_num_gpus_per_node=8 \(one machine\): a run over"):
        select_launcher(cfg)
    cfg.inference.inference_num_gpus = 7
    assert select_launcher(cfg) == "local"
    cfg.inference.launcher = "ray"
    with pytest.raises(ImportError, match=r"inference.launcher=ray needs the Ray launcher"):
        select_launcher(cfg)
    cfg.inference.launcher = "slurm"
    with pytest.raises(PlacementError, match=r"inference.launcher='slurm': unknown launcher"):
        select_launcher(cfg)


def test_gpu_placement_bundles(tmp_path, tiny_target_dir):
    from torchspec.pipeline.launcher_ray import plan_ray

    cfg = _ray_config(tmp_path, tiny_target_dir, engines=4, training_num_gpus_per_node=2)
    p = plan_ray(cfg, cluster_gpus=8)
    assert (p.num_engines, p.bundles, p.strategy, p.actor_gpus) == (4, ({"GPU": 1},), "STRICT_PACK", 1)
    # the trainer's GPUs are reserved by its own placement group: one bundle on one node
    assert p.trainer_devices == ("cuda", "cuda")
    assert (p.trainer_bundles, p.trainer_strategy) == (({"GPU": 2},), "STRICT_PACK")
    # sglang engines of 16 GPUs over 2 nodes of 8: one bundle per node, spread over distinct nodes
    cfg.inference.inference_engine_type = "sgl"
    cfg.inference.sglang.nnodes, cfg.inference.sglang.tp_size = 2, 16
    cfg.inference.inference_num_gpus, cfg.inference.inference_num_gpus_per_node = 32, 8
    p = plan_ray(cfg, cluster_gpus=40)
    assert (p.num_engines, p.bundles, p.strategy, p.actor_gpus) == (2, ({"GPU": 8},) * 2, "STRICT_SPREAD", 8)
    # trainer ranks over 2 nodes: one bundle per node, on distinct nodes
    cfg.training.training_num_nodes, cfg.training.training_num_gpus_per_node = 2, 8
    p = plan_ray(cfg, cluster_gpus=48)
    assert (p.trainer_bundles, p.trainer_strategy, p.ranks_per_node) == (({"GPU": 8},) * 2, "STRICT_SPREAD", 8)
    assert len(p.trainer_devices) == 16
    cfg.training.training_num_nodes = 1
    # the hf engine has no tensor parallelism: one message, the same under both launchers
    cfg.inference.inference_engine_type, cfg.inference.inference_num_gpus_per_engine = "hf", 2
    with pytest.raises(PlacementError, match=r"^inference.inference_num_gpus_per_engine=2: the hf engine runs on "
                                             r"one GPU per engine; .* or the vllm or sgl engine for tensor parallelism"):
        plan_ray(cfg, cluster_gpus=40)
    with pytest.raises(PlacementError, match=r"^inference.inference_num_gpus_per_engine=\d+: the hf engine"):
        plan_local(cfg, num_gpus=8)
    cfg.inference.inference_engine_type, cfg.inference.inference_num_gpus_per_engine = "sgl", 1
    cfg.inference.colocate = True
    with pytest.raises(PlacementError, match="inference.colocate=true"):
        plan_ray(cfg, cluster_gpus=40)


@needs_ray
def test_local_store_refuses_engines_off_the_driver_node(tmp_path, tiny_target_dir, local_ray, monkeypatch):
    """Placement groups placed on another node (faked): a clear error before any actor starts, and the
    placement groups are removed again."""
    import importlib

    from torchspec.pipeline.launcher_ray import RayEngines, plan_ray
    from torchspec.transfer.local import LocalStore

    rpg = importlib.import_module("ray.util.placement_group")   # (the package attribute is the function)
    real_table = rpg.placement_group_table

    def elsewhere(pg=None):
        t = real_table(pg)
        return {**t, "bundles_to_node_id": {i: "f" * 56 for i in t["bundles_to_node_id"]}}

    monkeypatch.setattr(rpg, "placement_group_table", elsewhere)
    cfg = _ray_config(tmp_path, tiny_target_dir, engines=2)
    store = LocalStore()
    try:
        with pytest.raises(PlacementError, match=r"Ray placed inference engines on another machine \(unknown\) than "
                                                 r"the driver's \(127.0.0.1\); the local hidden-state store is shared "
                                                 r"memory of one machine: .* needs the mooncake store"):
            RayEngines(lambda s, d: None, store, plan_ray(cfg, cluster_gpus=0))
    finally:
        store.close()
    assert cpus_free(ray, 3)


@needs_ray
def test_engine_config_error_in_actor_is_one_line(tmp_path, tiny_target_dir, local_ray):
    """A user error raised while an actor builds its engine reaches the driver as the same one-line
    ConfigError (no Ray traceback), and the actors and placement groups are cleaned up."""
    from torchspec.config.errors import ConfigError
    from torchspec.pipeline.launcher_ray import RayEngines, plan_ray
    from torchspec.transfer.local import LocalStore

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    store = LocalStore()
    try:
        with pytest.raises(ConfigError) as e:
            RayEngines(_bad_target_factory, store, plan_ray(_ray_config(tmp_path, tiny_target_dir, engines=2), 0))
    finally:
        store.close()
    assert str(e.value) == "model.target_model_path=/nowhere: no such directory (command line)"
    assert cpus_free(ray, 3)


def test_launcher_is_validated_with_the_config(tmp_path, tiny_target_dir):
    from torchspec.config.errors import ConfigError
    from torchspec.config.loader import load_config

    cfg_file = tmp_path / "c.yaml"
    train = tmp_path / "train.jsonl"
    train.write_text("")
    cfg_file.write_text(f"model:\n  target_model_path: {tiny_target_dir}\n"
                        f"dataset:\n  train_data_path: {train}\ninference:\n  launcher: rey\n")
    with pytest.raises(ConfigError, match=r"inference.launcher.*expected one of local, ray.*c.yaml"):
        load_config([cfg_file])
    assert load_config([cfg_file], ["inference.launcher=ray"]).inference.launcher == "ray"
