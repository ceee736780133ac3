"""An sgl engine spanning nodes (inference.sglang.nnodes > 1): on every node, the engine runs that node's TP ranks
of SGLang's ModelRunner (global rank node_rank * tp/N + i on GPU base + i), all meeting at node 0's
dist_init_addr; every batch reaches every node; global rank 0 (node 0) alone puts the records, as tensors. Run
against the stand-in sglang.srt classes of tests/test_sglang_engine.py (its ranks meet through torch.distributed,
gloo on CPU, at 127.0.0.1:<port> as dist_init_addr), never a real SGLang, a GPU or a real second node."""

import logging
import os
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from test_sglang_engine import (TOL, FakeEngine, FakeModelRunner, _cfg, _float_tolist_spy, _hf_records,  # noqa: F401
                                _samples, fake_sglang, tp_ranks)
from torchspec.inference import sglang as sgl_engine
from torchspec.transfer.local import LocalStore
from torchspec.utils.net import free_port

TESTS = Path(__file__).resolve().parent


def _two_node_cfg(target_dir):
    cfg = _cfg(target_dir)
    inf = cfg.inference
    inf.sglang.nnodes, inf.sglang.tp_size = 2, 2
    inf.inference_num_gpus, inf.inference_num_gpus_per_node = 2, 1
    return cfg


def _both_nodes(fn, *per_node):
    """fn(node 0's args), fn(node 1's args) at once (each node's TP rank waits for the other's in a collective)."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(fn, *args) for args in per_node]
        return [f.result() for f in futures]


def test_each_node_runs_its_tp_ranks_and_rank_0_puts(tp_ranks, tiny_target_dir, tmp_path, monkeypatch, caplog):
    """Node r starts only its TP rank (global rank r of 2, GPU base + 0), both meet at the same dist_init_addr; a
    batch run on both nodes gives records equal to the hf engine's, put by global rank 0 alone, as tensors; no
    process builds a float list; sgl.Engine never starts; no warning."""
    cfg, addr = _two_node_cfg(tiny_target_dir), f"127.0.0.1:{free_port()}"
    store = LocalStore(root=tmp_path / "store")
    samples = _samples(512)
    want = _hf_records(tiny_target_dir, tmp_path, [0, 1, 2], samples)
    lists = _float_tolist_spy(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="torchspec"):
        head, other = _both_nodes(sgl_engine.build_node_engine, *[(cfg, r, addr, store, "cpu") for r in (0, 1)])
        try:
            assert isinstance(head, sgl_engine.SGLangEngine) and isinstance(other, sgl_engine.SGLangNodeEngine)
            assert [head.runner.ranks, other.engine.runner.ranks] == [[0], [1]]
            stored, nothing = _both_nodes(lambda e, b: e.generate(b), (head, samples[:4]), (other, samples[:4]))
            more, _ = _both_nodes(lambda e, b: e.generate(b), (head, samples[4:]), (other, samples[4:]))
        finally:
            _both_nodes(lambda e: e.close(), (head,), (other,))
    assert [r.levelname for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert nothing == [] and [s.key for s in stored + more] == [s.sample_id for s in samples]
    log = tp_ranks()
    runners = {int(ln[1]): (int(ln[2]), int(ln[3])) for ln in log if ln[0] == "runner"}
    assert sorted(runners.values()) == [(0, 0), (1, 0)] and os.getpid() not in runners   # (rank, gpu)
    assert sorted((int(ln[2]), ln[3]) for ln in log if ln[0] == "meet") == [(0, addr), (1, addr)]
    rank0 = next(pid for pid, (rank, _) in runners.items() if rank == 0)
    puts = [ln for ln in log if ln[0] == "put"]
    assert [ln[2] for ln in puts] == [s.sample_id for s in samples] and {int(ln[1]) for ln in puts} == {rank0}
    assert [ln for ln in log if ln[0] == "tolist"] == [] and lists == []
    assert FakeEngine.instances == [] and FakeModelRunner.instances == []   # nothing ran in this process
    for s in samples:
        g, w = store.get(s.sample_id), want[s.sample_id]
        assert torch.equal(g["input_ids"], w["input_ids"])
        for key in ("aux_hidden_states", "final_hidden_states"):
            assert g[key].dtype == w[key].dtype and g[key].shape == w[key].shape
            torch.testing.assert_close(g[key], w[key], **TOL)


def test_spanning_nodes_without_the_ray_launcher_is_refused(fake_sglang, tiny_target_dir, tmp_path):
    with pytest.raises(sgl_engine.SGLangEngineError, match=r"^inference.sglang.nnodes=2: .*inference.launcher=ray"):
        sgl_engine.build_engine(_two_node_cfg(tiny_target_dir), LocalStore(root=tmp_path / "store"), "cpu")
    cfg = _two_node_cfg(tiny_target_dir)
    cfg.inference.colocate = True
    with pytest.raises(sgl_engine.SGLangEngineError, match=r"inference.colocate=true"):
        sgl_engine.build_node_engine(cfg, 0, "10.1.2.3:41234", LocalStore(root=tmp_path / "store"), "cpu")
    assert FakeEngine.instances == []


def test_a_given_dist_init_addr_is_used_by_one_spanning_engine(tiny_target_dir):
    from torchspec.config import ConfigError
    from torchspec.config.validate import validate_config
    from torchspec.pipeline.launcher_ray import plan_ray, sgl_node_factory

    cfg = _two_node_cfg(tiny_target_dir)
    cfg.inference.sglang.dist_init_addr = "10.0.0.5:29500"
    one = sgl_node_factory(cfg, plan_ray(cfg, cluster_gpus=0))
    assert [one(r, "10.0.0.9:1234").args[1:3] for r in (0, 1)] == [(0, "10.0.0.5:29500"), (1, "10.0.0.5:29500")]
    cfg.inference.sglang.dist_init_addr = None   # none given: the address picked on node 0
    assert sgl_node_factory(cfg, plan_ray(cfg, cluster_gpus=0))(1, "10.0.0.9:1234").args[1:3] == (1, "10.0.0.9:1234")
    cfg.inference.inference_num_gpus, cfg.inference.inference_num_gpus_per_engine = 4, 2
    validate_config(cfg)   # two engines spanning nodes, each meeting at its own address
    cfg.inference.sglang.dist_init_addr = "10.0.0.5:29500"   # one address cannot serve both: refused at load
    with pytest.raises(ConfigError, match=r"^inference.sglang.dist_init_addr=\S+: is where the TP ranks of ONE "
                                          r"engine meet, but this config starts 2 engines"):
        validate_config(cfg)
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

# A `sglang` package for Ray's worker processes and the TP rank processes they spawn: the stand-in's sglang.srt
# classes, the put / float-tolist spies logging to $STANDIN_TP_LOG, and an sgl.Engine that must never start.
STAND_IN = textwrap.dedent('''
    import sys
    sys.path.insert(0, {tests!r})
    import test_sglang_engine

    sys.modules.update(test_sglang_engine._srt_modules())
    test_sglang_engine.install_rank_spies()
    test_sglang_engine.FakeModelRunner.POOL_TOKENS = 4096   # the pipeline's batches are larger than the unit tests'

    class Engine:
        def __init__(self, **kwargs):
            raise AssertionError("stand-in: sgl.Engine started for training records")
''')


@pytest.fixture
def stand_in_cluster(tmp_path, monkeypatch):
    """A simulated 2-node Ray cluster whose workers import the stand-in `sglang` (PYTHONPATH) -> (nodes, read the
    rank log)."""
    if ray is None:
        pytest.skip("ray is not installed (pip install -e '.[ray]')")
    if ray.is_initialized():
        pytest.skip("a Ray connection is already open in this process")
    from ray_helpers import two_node_cluster

    pkg = tmp_path / "stand_in" / "sglang"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(STAND_IN.format(tests=str(TESTS)))
    log = tmp_path / "ranks.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pkg.parent), os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("STANDIN_TP_LOG", str(log))
    with two_node_cluster(2, 1) as nodes:   # head: engine node 0 or 1 + trainer rank 0; second: the other
        yield nodes, lambda: [ln.split() for ln in log.read_text().splitlines()] if log.exists() else []


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


def test_ray_launcher_runs_a_two_node_sgl_engine(stand_in_cluster, tmp_path, tiny_target_dir, caplog, cpu_only):
    """One sgl engine over both nodes (a node 0 and a node 1 actor on distinct Ray nodes, one address): every batch
    reaches both nodes' TP ranks, which meet at that address; global rank 0 alone puts, no float list anywhere, every
    sample trained once, no warning. Then a TP rank of node 1 failing in a forward is one line naming the engine and
    the node, and nothing hangs."""
    import time

    from pipeline_helpers import ids_by_epoch
    from torchspec.data.dataset import from_config, load_tokenizer
    from torchspec.pipeline.failures import WorkerFailure
    from torchspec.pipeline.runner import run_training

    _, ranks_log = stand_in_cluster
    cfg = _ray_cfg(tmp_path, tiny_target_dir)
    with caplog.at_level(logging.WARNING, logger="torchspec"):
        run = run_training(cfg, progress=False)
    assert [r.getMessage() for r in caplog.records if "sgl" in r.getMessage()] == []

    log = ranks_log()
    runners = {int(ln[1]): (int(ln[2]), int(ln[3])) for ln in log if ln[0] == "runner"}
    assert sorted(runners.values()) == [(0, 0), (1, 0)]   # (global rank, gpu): one rank a node
    meets = {ln[3] for ln in log if ln[0] == "meet"}
    assert len(meets) == 1 and meets.pop().startswith("127.0.0.1:")
    rank0 = next(pid for pid, (rank, _) in runners.items() if rank == 0)
    puts = [ln for ln in log if ln[0] == "put"]
    assert puts and {int(ln[1]) for ln in puts} == {rank0} and [ln for ln in log if ln[0] == "tolist"] == []
    all_ids = sorted(s.sample_id for s in from_config(cfg, load_tokenizer(cfg), progress=False))
    assert sorted(ids_by_epoch(run.trained)[0]) == all_ids and sorted(ln[2] for ln in puts) == all_ids
    assert run.store_put_bytes > 0 and run.store_bytes_end == 0
    assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())

    node1 = "inference engine 0: its node 1 of 2 (sgl node_rank 1) failed: RuntimeError: sgl engine: TP rank 1 of 2 "
    for how, cause in (("raise", r"failed: ValueError: stand-in ModelRunner: rank 1 fails at forward"),
                       ("exit", r"\(process \d+\) exited with code 3")):   # a rank that dies on node 1
        cfg2 = _ray_cfg(tmp_path / how, tiny_target_dir)
        cfg2.inference.sglang.extra_args = {"log_level": f"standin-fail:1:forward:{how}"}
        t0 = time.monotonic()
        with pytest.raises(WorkerFailure) as e:
            run_training(cfg2, progress=False)
        assert re.fullmatch(re.escape(node1) + cause + "; no checkpoint had been written", str(e.value)), str(e.value)
        assert time.monotonic() - t0 < 240   # node 0's rank, left in a collective, did not hang the run
        assert all(pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
