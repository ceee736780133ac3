"""inference.sglang.init_timeout is how long the launcher waits for sgl engines to come up (hf and vllm engines:
the launcher's own 600 s); an engine that is not ready by then stops the start with one error naming the key."""

import time

import pytest

from torchspec.config.schema import Config
from torchspec.inference.factory import ENGINE_START_TIMEOUT_S, engine_start_timeout
from torchspec.pipeline.launcher_local import plan_local, start_engines


def never_ready_factory(store, device):   # module level: the spawned engine process unpickles it
    time.sleep(120)


def test_timeout_follows_the_engine_type():
    cfg = Config()
    assert engine_start_timeout(cfg) == (ENGINE_START_TIMEOUT_S, "")
    cfg.inference.inference_engine_type = "sgl"
    cfg.inference.sglang.init_timeout = 1800
    assert engine_start_timeout(cfg) == (1800.0, "inference.sglang.init_timeout")


def test_sgl_engine_not_ready_within_init_timeout(tmp_path):
    from torchspec.transfer.local import LocalStore

    cfg = Config()
    cfg.inference.inference_engine_type = "sgl"
    cfg.inference.sglang.init_timeout = 3
    store = LocalStore(root=tmp_path / "store")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"not ready within 3 s \(inference.sglang.init_timeout\)"):
        start_engines(cfg, store, plan_local(cfg, num_gpus=0), engine_factory=never_ready_factory)
    assert time.monotonic() - t0 < 60
    store.close()
