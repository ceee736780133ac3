"""`--dry-run` runs the checks a real start makes: it says OK only when the start would accept the config."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from torchspec.pipeline.preflight import preflight
from torchspec.train_entry import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(autouse=True)
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("name", ["sglang_kimi_k25_2node.yaml", "sglang_kimi_k25_3node.yaml"])
def test_kimi_configs_dry_run_names_the_missing_mooncake_master(name, capsys, tmp_path):
    rc = main(["--config", str(CONFIGS / name), f"output_dir={tmp_path / 'out'}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 2
    assert "dry run: 1 problem(s) a real start would reject:" in out
    assert "mooncake.master_server_address is null, but" in out and "spans several nodes" in out
    assert "model.target_model_path='moonshotai/Kimi-K2.5': a hub id, downloaded into" in out   # pending, not a problem
    # the same config with a master that answers: OK, and OK means the start's store check passes
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        addr = f"127.0.0.1:{srv.getsockname()[1]}"
        rc = main(["--config", str(CONFIGS / name), f"output_dir={tmp_path / 'out'}",
                   f"mooncake.master_server_address={addr}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "dry run: OK" in out
    rc = main(["--config", str(CONFIGS / name), f"output_dir={tmp_path / 'out'}",
               "mooncake.master_server_address=127.0.0.1:1", "--dry-run"])   # nothing listens on port 1
    assert rc == 2 and "the Mooncake master is unreachable" in capsys.readouterr().out


def test_store_check_is_the_one_the_start_makes():
    """build_store refuses exactly what preflight reports (one function, check_store, behind both)."""
    from torchspec.config.errors import ConfigError
    from torchspec.config.loader import load_config
    from torchspec.transfer.factory import build_store

    cfg = load_config([str(CONFIGS / "sglang_kimi_k25_3node.yaml")], [])
    problems = preflight(cfg).problems
    with pytest.raises(ConfigError) as e:
        build_store(cfg)
    assert str(e.value) in problems


def _cfg(tmp_path, target):
    from tests.pipeline_helpers import tiny_run_config

    return tiny_run_config(tmp_path, target)


def test_local_tiny_config_is_ok_and_every_problem_is_listed(tmp_path, tiny_target_dir):
    cfg = _cfg(tmp_path, tiny_target_dir)
    assert preflight(cfg).ok, preflight(cfg).format()
    cfg.model.lm_head_key = "lm_head.weights"
    cfg.dataset.eval_data_path = str(tmp_path / "missing.jsonl")
    cfg.dataset.chat_template = "qwen4"
    problems = preflight(cfg).problems
    assert len(problems) == 3, problems   # all of them, not just the first
    assert any(p.startswith("model.lm_head_key='lm_head.weights': no such tensor in the target checkpoint")
               and "'lm_head.weight'" in p for p in problems)
    assert any("dataset.eval_data_path: no such file or folder" in p for p in problems)
    assert any("dataset.chat_template: unknown template 'qwen4'" in p for p in problems)


def test_norm_key_is_checked_for_the_vllm_engine(tmp_path, tiny_target_dir):
    cfg = _cfg(tmp_path, tiny_target_dir)
    cfg.model.norm_key = "model.final_norm.weight"
    assert preflight(cfg).ok   # the hf engine applies the target's own norm: the key is not read
    cfg.inference.inference_engine_type = "vllm"
    problems = preflight(cfg).problems
    assert problems == [f"model.norm_key='model.final_norm.weight': no such tensor in the target checkpoint "
                        f"{tiny_target_dir}; tensors with a similar name: ['model.norm.weight']"]


def test_tokenizer_and_target_must_agree(tmp_path, tiny_target_dir):
    from torchspec.utils.tiny import train_tokenizer

    target = tmp_path / "target"
    shutil.copytree(tiny_target_dir, target)
    big = train_tokenizer(tmp_path / "tok", vocab_size=1024)
    big.save_pretrained(str(target))
    problems = preflight(_cfg(tmp_path, target)).problems
    assert len(problems) == 1 and f"its tokenizer has {len(big)} tokens but the target's vocabulary is 512" in problems[0]


def test_used_output_dir_and_offline_hub_id(tmp_path, tiny_target_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_target_dir)
    Path(cfg.output_dir).mkdir(parents=True)
    (Path(cfg.output_dir) / "metrics.jsonl").write_text("{}\n")
    cfg.model.target_model_path = "acme/not-cached"
    cfg.model_download_dir = str(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problems = preflight(cfg).problems
    assert len(problems) == 2
    assert problems[0].startswith(f"output_dir={cfg.output_dir}") or "already holds a training run" in problems[0]
    assert problems[1] == (f"model.target_model_path='acme/not-cached': not in the hub cache ({tmp_path / 'hub'}) "
                           "and HF_HUB_OFFLINE=1: nothing can be downloaded")


def test_mooncake_keys_are_checked_against_the_target_and_the_staging_buffer(tmp_path, tiny_target_dir):
    """mooncake.hidden_dim must be the target's hidden size (64 here); with inference.store=mooncake,
    training.max_seq_length must fit mooncake.max_seq_len and mooncake.max_batch_size records of max_seq_len
    tokens must fit mooncake.local_buffer_size. Each is one line naming the keys, before anything starts."""
    import torch

    from tests.store_helpers import small_mooncake
    from torchspec.transfer.capacity import record_bytes

    cfg = _cfg(tmp_path, tiny_target_dir)
    cfg.mooncake.hidden_dim = 64
    assert preflight(cfg).ok, preflight(cfg).format()
    cfg.mooncake.hidden_dim = 7168
    assert preflight(cfg).problems == [
        f"mooncake.hidden_dim=7168 but the target's hidden size is 64 (model.target_model_path={tiny_target_dir}); "
        "set mooncake.hidden_dim=64 or null (null = the target's)"]

    cfg = small_mooncake(_cfg(tmp_path, tiny_target_dir))
    cfg.inference.store = "mooncake"
    assert preflight(cfg).ok, preflight(cfg).format()
    cfg.mooncake.hidden_dim = 32   # also checked with the mooncake store (once)
    assert [p for p in preflight(cfg).problems if "mooncake.hidden_dim=32" in p] == preflight(cfg).problems
    assert len(preflight(cfg).problems) == 1
    cfg.mooncake.hidden_dim = None
    cfg.mooncake.max_seq_len = cfg.training.max_seq_length - 1
    assert preflight(cfg).problems == [
        f"training.max_seq_length=128 is longer than mooncake.max_seq_len=127, the longest record the Mooncake "
        "clients' buffers are sized for; raise mooncake.max_seq_len to at least 128 or lower training.max_seq_length"]
    cfg.mooncake.max_seq_len = 128
    one = record_bytes(128, 64, 3, torch.float32)   # the CPU engines' records: fp32
    fit = cfg.mooncake.local_buffer_size // one
    cfg.mooncake.max_batch_size = fit
    assert preflight(cfg).ok
    cfg.mooncake.max_batch_size = fit + 1
    [p] = preflight(cfg).problems
    assert p.startswith(f"mooncake.local_buffer_size=4.0 MB cannot hold mooncake.max_batch_size={fit + 1} records "
                        "of mooncake.max_seq_len=128 tokens (")
    assert f"or lower mooncake.max_batch_size (to {fit} it fits) or mooncake.max_seq_len" in p
    cfg.inference.store = "local"   # the staging buffer is Mooncake's: not checked for the local store
    assert preflight(cfg).ok


def test_kimi_mooncake_buffer_is_checked_with_hidden_dim_before_the_target_is_downloaded(tmp_path, monkeypatch):
    """A hub-id target is not read by the dry run: mooncake.hidden_dim (7168 in the Kimi files) sizes the records
    (bf16: sgl engines run on GPUs)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problems = preflight(_kimi(tmp_path, "mooncake.max_batch_size=16")).problems
    assert any(p.startswith("mooncake.local_buffer_size=16384.0 MB cannot hold mooncake.max_batch_size=16 records "
                            "of mooncake.max_seq_len=20000 tokens (1093.9 MB each: hidden size 7168, 3 aux layers")
               and "(to 14 it fits)" in p for p in problems), problems
    assert not any("local_buffer_size" in p for p in preflight(_kimi(tmp_path)).problems)   # the file as shipped


def _kimi(tmp_path, *overrides):
    from torchspec.config.loader import load_config

    return load_config([str(CONFIGS / "sglang_kimi_k25_2node.yaml")],
                       [f"output_dir={tmp_path / 'out'}", "mooncake.master_server_address=127.0.0.1:1", *overrides])


@pytest.mark.parametrize("override, message", [
    ({"hidden_dim": 7168}, "mooncake.hidden_dim=7168 but the target's hidden size is 64"),
    ({"max_seq_len": 64}, "training.max_seq_length=128 is longer than mooncake.max_seq_len=64"),
    ({"max_batch_size": 1000}, "mooncake.local_buffer_size=4.0 MB cannot hold mooncake.max_batch_size=1000 records"),
])
def test_the_start_refuses_the_mooncake_keys_the_dry_run_reports(tmp_path, tiny_target_dir, override, message):
    """The run's start makes the same checks (capacity.check_mooncake) before the store or any engine starts."""
    from tests.store_helpers import small_mooncake
    from torchspec.config.errors import ConfigError
    from torchspec.pipeline.runner import run_training

    cfg = small_mooncake(_cfg(tmp_path, tiny_target_dir))
    cfg.inference.store = "mooncake"
    for key, value in override.items():
        setattr(cfg.mooncake, key, value)
    [problem] = preflight(cfg).problems
    with pytest.raises(ConfigError) as e:
        run_training(cfg, progress=False)
    assert str(e.value) == problem and message in problem
