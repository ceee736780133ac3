"""Log noise at the default `logging.log_level: info` (issue 17, item 7): a Mooncake client (the driver's, and an
engine's / trainer rank's / Ray actor's that unpickles the store) prints no INFO lines and not the error-level
"Local segment descriptor not found" every healthy start prints, and torchspec logs one line for it; with
`logging.log_level: debug` Mooncake's own INFO log is back. Ray is initialised at WARNING unless debug."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from store_helpers import mooncake_missing
from torchspec.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

# One process owns the store (starts the master, mounts the segment), a second process unpickles it as an
# engine would and puts / gets a record: every line both write to stderr is returned.
SCRIPT = textwrap.dedent("""
    import logging, os, pickle, subprocess, sys
    import torch
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from torchspec.transfer.mooncake import MooncakeSettings, MooncakeStore
    verbose = sys.argv[2] == "1"
    if sys.argv[1] == "owner":
        s = MooncakeStore(MooncakeSettings(global_segment_size=16 << 20, local_buffer_size=4 << 20, verbose=verbose))
        with open(sys.argv[3], "wb") as f:
            pickle.dump(s, f)
        subprocess.run([sys.executable, __file__, "engine", sys.argv[2], sys.argv[3]], check=True)
        s.close()
    else:
        with open(sys.argv[3], "rb") as f:
            s = pickle.load(f)
        s.put("k", {"input_ids": torch.arange(4), "loss_mask": torch.ones(4, dtype=torch.uint8),
                    "aux_hidden_states": torch.zeros(4, 6), "final_hidden_states": torch.zeros(4, 2)})
        assert sorted(s.get("k")) == ["aux_hidden_states", "final_hidden_states", "input_ids", "loss_mask"]
        print("engine MC_LOG_LEVEL=" + os.environ["MC_LOG_LEVEL"], file=sys.stderr)
""")


def _run(tmp_path, verbose: bool) -> list[str]:
    script = tmp_path / "two_clients.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MC_", "GLOG_"))}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, str(script), "owner", "1" if verbose else "0", str(tmp_path / "store.pkl")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stderr.splitlines()


def test_mooncake_clients_are_one_line_each_at_info(tmp_path):
    reason = mooncake_missing()
    if reason:
        pytest.skip(reason)
    lines = _run(tmp_path, verbose=False)
    ours = [ln for ln in lines if ln.startswith("INFO torchspec.transfer: mooncake client")]
    assert len(ours) == 2, lines                                    # the driver's and the engine's
    assert "16777216 B segment mounted" in ours[0] and "mounted" not in ours[1]
    assert "engine MC_LOG_LEVEL=WARNING" in lines                   # what an engine / actor process runs with
    rest = [ln for ln in lines if ln not in ours and not ln.startswith("engine MC_LOG_LEVEL")]
    assert rest == [], rest                                         # no Mooncake INFO, no spurious E line

    verbose = _run(tmp_path, verbose=True)
    assert "engine MC_LOG_LEVEL=INFO" in verbose
    assert sum("Local segment descriptor not found" in ln for ln in verbose) == 2
    assert sum(ln.startswith("I") and "real_client.cpp" in ln for ln in verbose) >= 4


def test_log_level_key(tmp_path):
    from torchspec.pipeline.ray_placement import ray_init_quiet

    cfg = load_config([ROOT / "configs" / "hf_qwen3_8b.yaml"], ["logging.log_level=debug"])
    assert ray_init_quiet(cfg) == {"logging_level": 10}
    cfg.logging.log_level = "info"
    assert ray_init_quiet(cfg) == {"logging_level": 30}
    with pytest.raises(ConfigError, match=r"^logging.log_level='verbose': unknown value, expected one of info, debug"):
        load_config([ROOT / "configs" / "hf_qwen3_8b.yaml"], ["logging.log_level=verbose"])


def test_debug_reaches_the_mooncake_settings(monkeypatch):
    from torchspec.transfer import factory, mooncake

    made = []
    monkeypatch.setattr(mooncake, "MooncakeStore", lambda settings, capacity_bytes=None: made.append(settings))
    monkeypatch.setattr(factory, "check_store", lambda cfg: "mooncake")
    for level, verbose in (("debug", True), ("info", False)):
        cfg = load_config([ROOT / "configs" / "hf_qwen3_8b.yaml"], ["inference.store=mooncake",
                                                                    f"logging.log_level={level}"])
        factory.build_store(cfg, budget=None)
        assert made[-1].verbose is verbose
