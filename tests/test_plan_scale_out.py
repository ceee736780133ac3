"""The dry-run plan for scale-out (issue 17, item 8): the store line names the store the run will use, the ports it
will use are listed, and `inference.colocate: true` under the Ray launcher is refused by config validation, before
anything is tokenised or connected."""

from pathlib import Path

import pytest

from torchspec.config import ConfigError, load_config
from torchspec.config.plan import format_plan, make_plan
from torchspec.train_entry import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ONE_BOX = [CONFIGS / "sglang_qwen3_8b.yaml"]
TWO_NODES = [CONFIGS / "sglang_kimi_k25_2node.yaml"]


def _plan(files, overrides):
    cfg = load_config(files, overrides)
    return format_plan(cfg, make_plan(cfg)).splitlines()


def _section(lines, title):
    i = lines.index(f"  {title}:")
    out = []
    for line in lines[i + 1:]:
        if not line.startswith("    "):
            break
        out.append(line.strip())
    return out


def test_store_line_is_the_store_the_run_uses(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # the case: one machine, but inference.store=mooncake (the plan said "local (one machine)")
    lines = _plan(ONE_BOX, ["inference.store=mooncake"])
    assert ("  hidden-state store: mooncake (records go through a Mooncake master: engines and ranks may run on "
            "any node)") in lines
    assert ("  hidden-state store: local (shared memory of the driver's machine: every engine and rank must run "
            "on it) [inference.store=auto]") in _plan(ONE_BOX, [])
    assert ("  hidden-state store: memory (records stay on the device inside each trainer process: colocated) "
            "[inference.store=auto]") in _plan(ONE_BOX, ["inference.colocate=true"])
    assert "  hidden-state store: mooncake (records go through a Mooncake master: engines and ranks may run on " \
           "any node) [inference.store=auto]" in _plan(TWO_NODES, [])


def test_ports_the_run_uses(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    ports = _section(_plan(TWO_NODES, ["mooncake.master_server_address=10.0.0.1:50051",
                                       "mooncake.master_metrics_port=9553"]), "ports")
    assert ports == [
        "Ray: the cluster at RAY_ADDRESS=127.0.0.1:6379",
        "Mooncake master: 10.0.0.1:50051 (mooncake.master_server_address), admin http 10.0.0.1:9553 "
        "(mooncake.master_metrics_port)",
        "Mooncake transfer engine: one port per process, picked by Mooncake at start (tcp; peer-to-peer handshake, "
        "no metadata server)",
        "trainer rendezvous: tcp://<driver's IP>:<a free port picked at start>",
    ]
    monkeypatch.delenv("RAY_ADDRESS")
    ports = _section(_plan(ONE_BOX, ["inference.launcher=ray", "inference.store=mooncake"]), "ports")
    assert ports[0] == "Ray: none given (RAY_ADDRESS unset): a Ray of this machine alone is started for the run"
    assert ports[1] == "Mooncake master: started by the run on 127.0.0.1, two free ports (one machine only)"
    assert _section(_plan(ONE_BOX, []), "ports") == ["trainer rendezvous: a file:// store in the run's directory "
                                                      "(no port)"]
    assert _section(_plan(ONE_BOX, ["training.training_num_gpus_per_node=1"]), "ports") == [
        "none (one machine, no network service)"]


def test_colocate_under_ray_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^inference.colocate=True: runs the target inside each trainer process, "
                                          r"which only the local launcher does; inference.launcher=ray runs the "
                                          r"engines as Ray actors \(set inference.colocate=false, or "
                                          r"inference.launcher=local on one machine\) \(command line\)$"):
        load_config(ONE_BOX, ["inference.launcher=ray", "inference.colocate=true"])
    # the Ray launcher chosen by the config's shape: refused the same way, naming why Ray is used
    with pytest.raises(ConfigError, match=r"inference.colocate=True: .*; training.training_num_nodes=2: the run "
                                          r"spans nodes, so the Ray launcher runs the engines as Ray actors"):
        load_config(ONE_BOX, ["training.training_num_nodes=2", "inference.colocate=true"])


def test_colocate_under_ray_stops_the_cli_before_anything_starts(tmp_path, capsys):
    """One line, exit 2, and nothing written: the refusal comes from loading the config."""
    out = tmp_path / "run"
    rc = main(["--config", str(ONE_BOX[0]), f"output_dir={out}", "inference.launcher=ray", "inference.colocate=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "inference.colocate=True: runs the target inside" in err[0]
    assert not out.exists()


def test_the_guides_plan_is_the_plan(monkeypatch):
    """docs/scale-out.md section 4 shows the plan of its dry-run command as this code prints it."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    guide = (CONFIGS.parent / "docs" / "scale-out.md").read_text()
    block = guide.split("The end of its output", 1)[1].split("```\n", 2)[1]
    shown = block[block.index("placement plan:"):].splitlines()
    plan = _plan(TWO_NODES, ["inference.launcher=ray", "inference.store=mooncake",
                             "mooncake.master_server_address=10.0.0.1:50051"])
    assert shown[:len(plan)] == plan
