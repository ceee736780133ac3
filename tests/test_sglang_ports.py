"""inference.sglang.port / additional_ports: with port set, each sgl engine takes its ports (ServerArgs port,
nccl_port, and node 0's dist_init_addr port for an engine spanning nodes) from its own block, port + slot x
(1 + additional_ports), instead of free ports; a port of the block in use is one error line. Real sockets on
127.0.0.1; no sglang needed (the kwargs are built without importing it)."""

import socket
from pathlib import Path

import pytest

from torchspec.config import ConfigError, load_config
from torchspec.config.schema import Config
from torchspec.inference import sglang as sgl_engine
from torchspec.utils.net import taken_ports

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _base(span: int = 40) -> int:
    """A first port with `span` free ports after it (the blocks the tests use)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + span < 65536 and not taken_ports(range(first, first + span)):
            return first
    pytest.skip("no run of free ports on 127.0.0.1")


def _cfg(port=None, additional=4) -> Config:
    cfg = Config()
    cfg.model.target_model_path = "unused"
    cfg.inference.inference_engine_type = "sgl"
    cfg.inference.sglang.tp_size = 1
    cfg.inference.sglang.port, cfg.inference.sglang.additional_ports = port, additional
    return cfg


def _kwargs(cfg, device):
    return sgl_engine.build_engine_kwargs(cfg, device, [0, 1, 2], layers_prefix="model.layers")


def test_null_port_picks_free_ports():
    kw = _kwargs(_cfg(), "cpu")
    assert kw["port"] != kw["nccl_port"]
    assert not taken_ports([kw["port"], kw["nccl_port"]])


def test_each_engine_takes_its_own_block(monkeypatch):
    base = _base()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = _cfg(base, additional=4)
    got = {d: (k["port"], k["nccl_port"]) for d in ("cpu", "cuda:0", "cuda:2") for k in [_kwargs(cfg, d)]}
    assert got == {"cpu": (base, base + 1), "cuda:0": (base, base + 1), "cuda:2": (base + 10, base + 11)}
    # a Ray actor sees its GPUs as cuda:0..: the block follows the machine's GPU (CUDA_VISIBLE_DEVICES)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,4")
    k = _kwargs(cfg, "cuda:0")
    assert (k["port"], k["nccl_port"]) == (base + 15, base + 16)
    # the same config gives the same ports every time (nothing random)
    assert _kwargs(cfg, "cuda:0")["port"] == base + 15


def test_a_port_in_use_is_one_error_line(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    base = _base()
    cfg = _cfg(base, additional=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 3))   # engine on cuda:1's nccl_port (block 1 = base + 2, base + 3)
        s.listen(1)
        with pytest.raises(sgl_engine.SGLangEngineError) as e:
            _kwargs(cfg, "cuda:1")
        assert str(e.value) == (
            f"inference.sglang.port={base}: the engine on cuda:1 (block 1) takes ports {base + 2}-{base + 3} of its "
            f"block (port + slot x (1 + inference.sglang.additional_ports=1)), but {base + 3} (nccl_port) is in use "
            "on 127.0.0.1; choose another inference.sglang.port, or null for free ports")
        assert _kwargs(cfg, "cuda:0")["nccl_port"] == base + 1   # block 0 is free: engine 0 starts
        # the dry run shows the block without asking the machine
        assert sgl_engine.build_engine_kwargs(cfg, "cuda:1", [0], layers_prefix="model.layers",
                                              check_ports=False)["nccl_port"] == base + 3


def test_block_size_is_checked_with_the_config():
    sgl = ["model.target_model_path=Qwen/Qwen3-8B", "dataset.train_data_path=x.jsonl"]
    with pytest.raises(ConfigError) as e:
        load_config([CONFIGS / "sglang_qwen3_8b.yaml"], [*sgl, "inference.sglang.port=30000",
                                                         "inference.sglang.additional_ports=0"])
    assert str(e.value) == (
        "inference.sglang.additional_ports=0: each engine's block of inference.sglang.port=30000 holds 1 + "
        "additional_ports ports and an engine takes 2 (port and nccl_port): it must be >= 1 (command line)")
    # an engine spanning nodes also takes node 0's dist_init_addr port from its block
    with pytest.raises(ConfigError, match=r"additional_ports=1: .* an engine takes 3 \(port, nccl_port and node 0's "
                                          r"dist_init_addr port\): it must be >= 2"):
        load_config([CONFIGS / "sglang_kimi_k25_3node.yaml"], ["inference.sglang.port=30000",
                                                               "inference.sglang.additional_ports=1"])
    with pytest.raises(ConfigError, match=r"^inference.sglang.additional_ports=-1: must be >= 0"):
        load_config([CONFIGS / "sglang_qwen3_8b.yaml"], ["inference.sglang.additional_ports=-1"])
    with pytest.raises(ConfigError, match=r"^inference.sglang.port=70000: must be a TCP port, 1 to 65534"):
        load_config([CONFIGS / "sglang_qwen3_8b.yaml"], ["inference.sglang.port=70000"])
    cfg = load_config([CONFIGS / "sglang_kimi_k25_3node.yaml"], ["inference.sglang.port=30000"])
    from torchspec.pipeline.ray_engines import dist_init_port

    assert dist_init_port(cfg) == 30002   # block 0's third port
    cfg.inference.sglang.port = None
    assert dist_init_port(cfg) is None     # null: a free port on node 0, as before


def test_dist_init_address_from_the_block(monkeypatch):
    import ray

    from torchspec.pipeline.ray_engines import _free_address

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    base = _base()
    assert _free_address(base) == (f"127.0.0.1:{base}", False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", base))
        s.listen(1)
        assert _free_address(base) == (f"127.0.0.1:{base}", True)
    addr, taken = _free_address()
    assert not taken and int(addr.rpartition(":")[2]) > 0


def test_a_port_left_in_time_wait_by_a_finished_run_is_free_one_listened_on_is_taken():
    """The check binds as the servers that take the ports do (SO_REUSEADDR): a port whose last connection is in
    TIME_WAIT (a run that just ended, the same config started again) is free; one a process listens on is not."""
    import time

    def reusing_socket():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return s

    server = reusing_socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()          # the server side closes first: its end of the connection stays in TIME_WAIT
    time.sleep(0.1)
    client.close()
    server.close()
    time.sleep(0.1)
    assert taken_ports([port]) == []
    with reusing_socket() as listener:
        listener.bind(("127.0.0.1", port))
        listener.listen(1)
        assert taken_ports([port]) == [port]
