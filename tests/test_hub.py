"""Hub ids resolve to local snapshot folders up front, offline from a pre-populated hub cache.

The cache is built here by hand in huggingface_hub's layout (models--org--name/snapshots/<rev>/...,
refs/main), from the tiny local target; HF_HUB_OFFLINE=1 throughout, so nothing touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from torchspec.config.errors import ConfigError
from torchspec.utils.hub import resolve_hub_ids, resolve_model

REV = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo_id: str, source: Path, kind: str = "models", skip=()) -> Path:
    storage = cache / f"{kind}--{repo_id.replace('/', '--')}"
    snap = storage / "snapshots" / REV
    snap.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, snap / f.name)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(REV)
    return snap


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sharded_target(tmp_path_factory, tiny_target_dir):
    """The tiny target saved in several safetensors shards with an index (as large checkpoints are)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(tiny_target_dir).save_pretrained(d, max_shard_size="60KB")
    AutoTokenizer.from_pretrained(tiny_target_dir).save_pretrained(d)
    return d


def _head_shards(target: Path) -> set[str]:
    wm = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    return {wm[k] for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")}


def test_full_weights_and_tokenizer_from_the_cache(tmp_path, tiny_target_dir, offline):
    from transformers import AutoTokenizer

    snap = _cache_repo(tmp_path / "hub", "acme/tiny", tiny_target_dir)
    folder = resolve_model("acme/tiny", str(tmp_path / "hub"), ["lm_head.weight"], full_weights=True)
    assert folder == snap
    assert len(AutoTokenizer.from_pretrained(folder)) == len(AutoTokenizer.from_pretrained(tiny_target_dir))


def test_head_only_reads_just_the_shards_holding_embed_lm_head_norm(tmp_path, sharded_target, offline):
    """A cache holding only the index and the head's shards serves the trainer, not an engine."""
    from torchspec.models.target_head import TargetHead

    all_shards = set(json.loads((sharded_target / "model.safetensors.index.json").read_text())["weight_map"].values())
    head = _head_shards(sharded_target)
    assert len(all_shards) > len(head) >= 1   # the test means something only if some shard is left out
    _cache_repo(tmp_path / "hub", "acme/sharded", sharded_target, skip=all_shards - head)
    keys = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    folder = resolve_model("acme/sharded", str(tmp_path / "hub"), keys, full_weights=False)
    th = TargetHead.from_pretrained(folder, "lm_head.weight", "model.embed_tokens.weight")
    assert th.lm_head.shape[0] == th.embed_tokens.shape[0] > 0
    with pytest.raises(ConfigError) as e:   # an engine needs every shard: one line naming the missing one
        resolve_model("acme/sharded", str(tmp_path / "hub"), keys, full_weights=True)
    msg = str(e.value)
    assert "\n" not in msg and "model.target_model_path='acme/sharded'" in msg
    assert sorted(all_shards - head)[0] in msg and "HF_HUB_OFFLINE=1" in msg


def test_not_cached_offline_is_one_line(tmp_path, offline):
    with pytest.raises(ConfigError) as e:
        resolve_model("acme/absent", str(tmp_path / "hub"), [], full_weights=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.target_model_path='acme/absent': not in the hub cache")
    assert "HF_HUB_OFFLINE=1" in msg and "model_download_dir" in msg


def test_config_hub_ids_become_local_paths(tmp_path, tiny_target_dir, offline):
    from tests.pipeline_helpers import tiny_run_config, write_conversations

    cfg = tiny_run_config(tmp_path, tiny_target_dir)
    snap = _cache_repo(tmp_path / "hub", "acme/tiny", tiny_target_dir)
    data = tmp_path / "data_src"
    data.mkdir()
    write_conversations(data / "train.jsonl", 4)
    data_snap = _cache_repo(tmp_path / "hub", "acme/chats", data, kind="datasets")
    cfg.model.target_model_path, cfg.dataset.train_data_path = "acme/tiny", "acme/chats"
    cfg.model_download_dir = str(tmp_path / "hub")
    done = resolve_hub_ids(cfg)
    assert cfg.model.target_model_path == str(snap) and cfg.dataset.train_data_path == str(data_snap)
    assert set(done) == {"model.target_model_path", "dataset.train_data_path"}
    cfg.model.target_model_path = str(tiny_target_dir)   # a local path is left alone
    assert resolve_hub_ids(cfg) == {}


def _hub_run_config(tmp_path, tiny_target_dir, n_conversations: int, **kw):
    """A tiny run's config naming its target `acme/tiny` and data `acme/chats`, both only in the hub cache
    model_download_dir = tmp_path/hub."""
    from tests.pipeline_helpers import tiny_run_config, write_conversations

    cfg = tiny_run_config(tmp_path, tiny_target_dir, n_conversations=n_conversations, **kw)
    _cache_repo(tmp_path / "hub", "acme/tiny", tiny_target_dir)
    data = tmp_path / "data_src"
    data.mkdir()
    write_conversations(data / "train.jsonl", n_conversations)
    _cache_repo(tmp_path / "hub", "acme/chats", data, kind="datasets")
    cfg.model.target_model_path, cfg.dataset.train_data_path = "acme/tiny", "acme/chats"
    cfg.model_download_dir = str(tmp_path / "hub")
    return cfg


def test_a_run_with_hub_ids_trains_offline(tmp_path, tiny_target_dir, offline):
    """model_download_dir is read: the run finds the target and data there by hub id, with no network."""
    from torchspec.pipeline.runner import run_training

    cfg = _hub_run_config(tmp_path, tiny_target_dir, 4, num_epochs=1)
    result = run_training(cfg, progress=False)
    assert len(result.trained) == 4 and result.export_dir is not None
    assert cfg.model.target_model_path.startswith(str(tmp_path / "hub"))   # every component saw the local path
    cfg.model.target_model_path, cfg.dataset.train_data_path = "acme/tiny", "acme/chats"
    cfg.model_download_dir = str(tmp_path / "elsewhere")   # were the key ignored, this run would succeed too
    cfg.output_dir = str(tmp_path / "out2")
    with pytest.raises(ConfigError, match="not in the hub cache"):
        run_training(cfg, progress=False)


def test_the_offline_regeneration_job_reads_hub_ids_from_model_download_dir(tmp_path, tiny_target_dir, offline):
    """`python -m torchspec.regenerate` resolves hub ids as a training run does: target and data found by hub id
    in model_download_dir, no network; another model_download_dir is refused in one line."""
    from torchspec.inference.regenerate_job import run_regeneration

    cfg = _hub_run_config(tmp_path, tiny_target_dir, 3)
    cfg.dataset.regenerate, cfg.dataset.generation.max_new_tokens = True, 4
    counts = run_regeneration(cfg, device="cpu", progress=False)
    assert counts["written"] == 3 and counts["generated_tokens"] > 0
    assert cfg.model.target_model_path.startswith(str(tmp_path / "hub"))
    cfg.model.target_model_path, cfg.dataset.train_data_path = "acme/tiny", "acme/chats"
    cfg.model_download_dir, cfg.output_dir = str(tmp_path / "elsewhere"), str(tmp_path / "out2")
    with pytest.raises(ConfigError, match="not in the hub cache"):
        run_regeneration(cfg, device="cpu", progress=False)
