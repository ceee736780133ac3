"""An sgl engine spanning nodes (inference.sglang.nnodes > 1): one sgl.Engine per node, node_rank r on node r,
all meeting at node 0's dist_init_addr; only node 0 serves. Run against the stand-in `sglang` of
tests/test_sglang_engine.py (which follows SGLang v0.5.10.post1's multi-node start as cited there), never a
real SGLang: what this cannot show is that real TP ranks on real nodes meet and agree."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from test_sglang_engine import FakeEngine, _cfg, _hf_records, _samples, fake_sglang  # noqa: F401 (fixture)
from torchspec.inference import sglang as sgl_engine
from torchspec.transfer.local import LocalStore

TESTS = Path(__file__).resolve().parent


def _two_node_cfg(target_dir):
    cfg = _cfg(target_dir)
    inf = cfg.inference
    inf.sglang.nnodes, inf.sglang.tp_size = 2, 2
    inf.inference_num_gpus, inf.inference_num_gpus_per_node = 2, 1
    return cfg


def test_each_node_gets_its_rank_and_the_same_address(fake_sglang, tiny_target_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(sgl_engine.NONZERO_RANK_RETURNS, raising=False)   # restored afterwards
    cfg, addr = _two_node_cfg(tiny_target_dir), "10.1.2.3:41234"
    store = LocalStore(root=tmp_path / "store")
    samples = _samples(512)
    want = _hf_records(tiny_target_dir, tmp_path, [0, 1, 2], samples)

    head = sgl_engine.build_node_engine(cfg, 0, addr, store, "cpu")
    assert os.environ.get(sgl_engine.NONZERO_RANK_RETURNS) is None   # node 0's sgl.Engine returns by itself
    other = sgl_engine.build_node_engine(cfg, 1, addr, store, "cpu")
    assert os.environ[sgl_engine.NONZERO_RANK_RETURNS] == "0"        # else node 1's would never return
    assert isinstance(head, sgl_engine.SGLangEngine) and isinstance(other, sgl_engine.SGLangNodeEngine)
    k0, k1 = (e.kwargs for e in FakeEngine.instances)
    for k, rank in ((k0, 0), (k1, 1)):
        assert (k["node_rank"], k["nnodes"], k["dist_init_addr"], k["tp_size"], k["base_gpu_id"]) == (rank, 2, addr,
                                                                                                      2, 0)
    # the rest is the same engine on both nodes (ports are each node's own)
    strip = lambda k: {n: v for n, v in k.items() if n not in ("node_rank", "port", "nccl_port")}  # noqa: E731
    assert strip(k0) == strip(k1) and k0["forward_hooks"] == sgl_engine.forward_hook_specs([0, 1, 2], "model.layers")

    # only node 0 serves; its records are the single-node engine's
    with pytest.raises(RuntimeError, match="only node_rank 0 of an engine serves generate"):
        other.generate(samples)
    stored = head.generate(samples)
    assert [s.key for s in stored] == [s.sample_id for s in samples]
    for s in samples:
        got = store.get(s.sample_id)
        torch.testing.assert_close(got["aux_hidden_states"], want[s.sample_id]["aux_hidden_states"], rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(got["final_hidden_states"], want[s.sample_id]["final_hidden_states"], rtol=1e-5,
                                   atol=1e-5)
    head.close(), other.close(), other.close()
    assert [e.shutdowns for e in FakeEngine.instances] == [1, 1]


def test_spanning_nodes_without_the_ray_launcher_is_refused(fake_sglang, tiny_target_dir, tmp_path):
    with pytest.raises(sgl_engine.SGLangEngineError, match=r"^inference.sglang.nnodes=2: .*inference.launcher=ray"):
        sgl_engine.build_engine(_two_node_cfg(tiny_target_dir), LocalStore(root=tmp_path / "store"), "cpu")
    cfg = _two_node_cfg(tiny_target_dir)
    cfg.inference.colocate = True
    with pytest.raises(sgl_engine.SGLangEngineError, match=r"inference.colocate=true"):
        sgl_engine.build_node_engine(cfg, 0, "10.1.2.3:41234", LocalStore(root=tmp_path / "store"), "cpu")
    assert FakeEngine.instances == []


def test_a_given_dist_init_addr_is_used_by_one_spanning_engine(tiny_target_dir, caplog):
    from torchspec.pipeline.launcher_ray import plan_ray, sgl_node_factory

    cfg = _two_node_cfg(tiny_target_dir)
    cfg.inference.sglang.dist_init_addr = "10.0.0.5:29500"
    one = sgl_node_factory(cfg, plan_ray(cfg, cluster_gpus=0))
    assert [one(r, "10.0.0.9:1234").args[1:3] for r in (0, 1)] == [(0, "10.0.0.5:29500"), (1, "10.0.0.5:29500")]
    cfg.inference.inference_num_gpus = 4   # two engines: one address cannot serve both
    two = sgl_node_factory(cfg, plan_ray(cfg, cluster_gpus=0))
    assert two(1, "10.0.0.9:1234").args[1:3] == (1, "10.0.0.9:1234")
    assert "inference.sglang.dist_init_addr='10.0.0.5:29500' ignored: 2 engines span nodes" in caplog.text
    cfg.inference.sglang.nnodes, cfg.inference.sglang.tp_size, cfg.inference.inference_num_gpus = 1, 1, 2
    assert sgl_node_factory(cfg, plan_ray(cfg, cluster_gpus=0)) is None   # engines of one node


def test_cpu_plan_spreads_an_engine_over_its_nodes(tmp_path, tiny_target_dir):
    from torchspec.pipeline.launcher_ray import plan_ray

    cfg = _two_node_cfg(tiny_target_dir)
    cfg.inference.inference_num_gpus = 4
    p = plan_ray(cfg, cluster_gpus=0)
    assert (p.num_engines, p.bundles, p.strategy) == (2, ({"CPU": 1},) * 2, "STRICT_SPREAD")
    cfg.inference.sglang.nnodes, cfg.inference.sglang.tp_size = 1, 1
    assert plan_ray(cfg, cluster_gpus=0).bundles == ({"CPU": 1},)


# -- the Ray launcher over a simulated 2-node cluster ------------------------------------------------------

try:
    import ray
except ImportError:
    ray = None

# A `sglang` package for Ray's worker processes: the stand-in engine, logging the kwargs of each node's engine.
STAND_IN = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {tests!r})
    import test_sglang_engine

    class Engine(test_sglang_engine.FakeEngine):
        def __init__(self, **kwargs):
            if kwargs.get("log_level") == f"fail-node-{{kwargs.get('node_rank')}}":
                raise RuntimeError("stand-in: this node's schedulers died")
            super().__init__(**kwargs)
            log = os.path.join(os.environ["STAND_IN_LOG"], f"{{kwargs['node_rank']}}.{{os.getpid()}}.json")
            with open(log, "w") as f:
                json.dump({{"kwargs": kwargs, "node": __import__("ray").get_runtime_context().get_node_id()}}, f)
''')


@pytest.fixture
def stand_in_cluster(tmp_path, monkeypatch):
    """A simulated 2-node Ray cluster whose workers import the stand-in `sglang` (PYTHONPATH)."""
    if ray is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    if ray.is_initialized():
        pytest.skip("a Ray connection is already open in this process")
    from ray_helpers import two_node_cluster

    pkg = tmp_path / "stand_in" / "sglang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(STAND_IN.format(tests=str(TESTS)))
    (tmp_path / "log").mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pkg.parent), os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("STAND_IN_LOG", str(tmp_path / "log"))
    monkeypatch.delenv(sgl_engine.NONZERO_RANK_RETURNS, raising=False)
    with two_node_cluster(2, 1) as nodes:   # head: engine node 0 or 1 + trainer rank 0; second: the other
        yield nodes, tmp_path / "log"


def _ray_cfg(tmp_path, target_dir):
    from pipeline_helpers import tiny_run_config

    cfg = tiny_run_config(tmp_path / "run", target_dir, engines=2, num_epochs=1, seed=5)
    cfg.inference.launcher = "ray"
    if hasattr(cfg.inference, "store"):   # one machine: the local store is shared by every actor
        cfg.inference.store = "local"
    cfg.inference.inference_engine_type = "sgl"
    cfg.inference.aux_hidden_states_layers = [0, 1, 2]
    cfg.inference.sglang.nnodes, cfg.inference.sglang.tp_size = 2, 2
    cfg.inference.inference_num_gpus_per_node = 1
    return cfg


def test_ray_launcher_runs_a_two_node_sgl_engine(stand_in_cluster, tmp_path, tiny_target_dir, monkeypatch, cpu_only):
    """One sgl engine over both nodes (node 0 and node 1 actors on distinct Ray nodes, one address), training
    every sample once; then a node 1 that fails to start is one line naming the engine and the node."""
    from pipeline_helpers import ids_by_epoch
    from torchspec.data.dataset import from_config, load_tokenizer
    from torchspec.pipeline.runner import run_training

    (head, second), log = stand_in_cluster
    cfg = _ray_cfg(tmp_path, tiny_target_dir)
    run = run_training(cfg, progress=False)

    logs = [json.loads(p.read_text()) for p in sorted(log.glob("*.json"))]
    assert sorted(r["kwargs"]["node_rank"] for r in logs) == [0, 1]
    assert {r["node"] for r in logs} == {head, second}                       # STRICT_SPREAD: one actor a node
    addrs = {r["kwargs"]["dist_init_addr"] for r in logs}
    assert len(addrs) == 1 and addrs.pop().startswith("127.0.0.1:")
    assert all((r["kwargs"]["nnodes"], r["kwargs"]["tp_size"], r["kwargs"]["base_gpu_id"]) == (2, 2, 0) for r in logs)
    all_ids = sorted(s.sample_id for s in from_config(cfg, load_tokenizer(cfg), progress=False))
    assert sorted(ids_by_epoch(run.trained)[0]) == all_ids
    assert run.store_put_bytes > 0 and run.store_bytes_end == 0
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())

    from torchspec.pipeline.launcher_ray import plan_ray_connected, start_ray_engines

    cfg2 = _ray_cfg(tmp_path / "2", tiny_target_dir)
    cfg2.inference.sglang.extra_args = {"log_level": "fail-node-1"}
    placement = plan_ray_connected(cfg2)
    with pytest.raises(RuntimeError) as e:
        start_ray_engines(cfg2, LocalStore(root=tmp_path / "store2"), placement)
    assert str(e.value).startswith("inference engine 0: its node 1 of 2 (sgl node_rank 1) failed to start: ")
    assert str(e.value).endswith("RuntimeError: stand-in: this node's schedulers died") and "\n" not in str(e.value)
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
