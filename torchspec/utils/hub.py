"""Hugging Face hub ids in a config become local paths, once, before anything reads them.

`resolve_hub_ids(cfg)` downloads (or, offline, finds in the hub cache) what the run needs and rewrites
`model.target_model_path`, `dataset.train_data_path` and `dataset.eval_data_path` to the local snapshot
folders, so every later reader (tokenizer, target config, target head, engines, dataset loader) sees a
local directory. Files go to `model_download_dir` (the hub cache layout, `models--org--name/...`); null
means huggingface_hub's own cache (`HF_HUB_CACHE`, `~/.cache/huggingface/hub`).

What is fetched of a model: its configs, tokenizer files and remote code always; the weights either in
full (`full_weights`, when an engine on this machine loads the target) or only the safetensors shards
holding `model.embedding_key`, `model.lm_head_key` and `model.norm_key` (found through the checkpoint's
index), which is all the trainer reads.

With `HF_HUB_OFFLINE=1` nothing touches the network; a file missing from the cache is one error line.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional, Sequence

from torchspec.config.errors import ConfigError

log = logging.getLogger("torchspec.hub")

# Everything of a model repo but its weights: config.json, generation_config.json, tokenizer.json /
# tokenizer_config.json / *.model / *.tiktoken, chat templates, and the code trust_remote_code runs.
MODEL_META_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.py")
WEIGHT_PATTERNS = ("*.safetensors",)
DATA_PATTERNS = ("*.jsonl", "*.json", "*.parquet")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(value: Optional[str]) -> bool:
    """`org/name` that names nothing on disk (the loader already made local-looking paths absolute)."""
    if not value or not isinstance(value, str) or os.path.exists(os.path.expanduser(value)):
        return False
    return bool(_HUB_ID.match(value)) and not value.endswith(_DATA_SUFFIXES) and ".." not in value


def check_model_dir(value: Optional[str], key: str = "model.target_model_path") -> Optional[str]:
    """`value`, when it is a hub id or a directory here; else one ConfigError naming the key (the start, before
    any reader, and the dry run: else the first reader, the tokenizer, blames a bad repo id)."""
    if not value or is_hub_id(value):
        return value
    path = os.path.expanduser(value)
    if not os.path.exists(path):
        raise ConfigError(f"{key}={value!r}: no such directory (and not a hub id of the form org/name)")
    if not os.path.isdir(path):
        raise ConfigError(f"{key}={value!r}: not a directory (a model dir holds config.json, the tokenizer "
                          "files and the weights)")
    return value


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def head_keys(cfg) -> list[str]:
    """The target tensors the trainer (and the vllm engine's final norm) read by name."""
    m = cfg.model
    return [k for k in (m.embedding_key, m.lm_head_key, m.norm_key) if k]


def _fail(key: str, repo_id: str, cache: Optional[str], e: BaseException) -> None:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    where = f" (model_download_dir={cache})" if cache else " (the default hub cache; set model_download_dir)"
    if isinstance(e, GatedRepoError):
        why = "the repository is gated: accept its terms on the hub and log in (`hf auth login`)"
    elif isinstance(e, RepositoryNotFoundError):
        why = "no such repository on the hub (or it is private: log in with `hf auth login`)"
    elif isinstance(e, LocalEntryNotFoundError) or offline():
        why = ("not in the hub cache" + where + " and the hub cannot be reached"
               + (" (HF_HUB_OFFLINE=1)" if offline() else "")
               + f": download it where there is network (`hf download {repo_id} --cache-dir DIR`) and point "
               "model_download_dir at DIR, or give a local directory")
        where = ""
    else:
        first = str(e).splitlines()[0] if str(e) else ""
        why = f"download failed: {type(e).__name__}: {first}"
    raise ConfigError(f"{key}={repo_id!r}: {why}{where}") from None


def _snapshot(key: str, repo_id: str, cache: Optional[str], patterns: Sequence[str], repo_type: str = "model") -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, cache_dir=cache,
                                      allow_patterns=list(patterns), local_files_only=offline()))
    except ConfigError:
        raise
    except Exception as e:   # every hub failure is the user's to fix (network, id, login, cache)
        _fail(key, repo_id, cache, e)


def _require(key: str, repo_id: str, folder: Path, names: Sequence[str], cache: Optional[str]) -> None:
    """Offline, a snapshot folder may hold only part of a repo: name the first file it lacks."""
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        where = f"model_download_dir={cache}" if cache else "the default hub cache"
        raise ConfigError(f"{key}={repo_id!r}: {missing[0]} is missing from its snapshot {folder} in {where}"
                          + (" (HF_HUB_OFFLINE=1: nothing is downloaded)" if offline() else ""))


def resolve_model(repo_id: str, cache: Optional[str], keys: Sequence[str], full_weights: bool,
                  key: str = "model.target_model_path") -> Path:
    """The local snapshot folder of model `repo_id` holding its configs, tokenizer and either every
    weight file or the shards that hold `keys`."""
    if full_weights:
        folder = _snapshot(key, repo_id, cache, MODEL_META_PATTERNS + WEIGHT_PATTERNS)
        _require(key, repo_id, folder, ["config.json"], cache)
        index = folder / INDEX_FILE
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            _require(key, repo_id, folder, shards, cache)
        elif not any(folder.glob("*.safetensors")):
            _require(key, repo_id, folder, [SINGLE_FILE], cache)
        return folder
    folder = _snapshot(key, repo_id, cache, MODEL_META_PATTERNS)   # configs, tokenizer, the index if sharded
    _require(key, repo_id, folder, ["config.json"], cache)
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({weight_map[k] for k in keys if k in weight_map})   # absent keys: the head reader names them
    else:
        shards = [SINGLE_FILE]
    folder = _snapshot(key, repo_id, cache, list(MODEL_META_PATTERNS) + shards)
    _require(key, repo_id, folder, shards, cache)
    return folder


def resolve_dataset(repo_id: str, cache: Optional[str], key: str) -> Path:
    """The local snapshot folder of dataset `repo_id` (its .jsonl / .json / .parquet files)."""
    return _snapshot(key, repo_id, cache, DATA_PATTERNS, repo_type="dataset")


def needs_full_weights(cfg) -> bool:
    """Whether an engine loads the target from this machine's copy (it does unless only the trainer runs)."""
    return not getattr(cfg.debug, "debug_train_only", False)


def resolve_hub_ids(cfg, full_weights: Optional[bool] = None) -> dict[str, str]:
    """Rewrite the config's hub ids to local snapshot folders, downloading what is missing; returns
    {key: "hub id -> local folder"} of what was resolved (empty when every path was local)."""
    cache = cfg.model_download_dir
    full = needs_full_weights(cfg) if full_weights is None else full_weights
    done: dict[str, str] = {}
    repo_id = cfg.model.target_model_path
    check_model_dir(repo_id)
    if is_hub_id(repo_id):
        log.info("model.target_model_path=%s: fetching %s into %s", repo_id,
                 "the full checkpoint" if full else "configs, tokenizer and the embed/lm_head/norm shards",
                 cache or "the default hub cache")
        folder = resolve_model(repo_id, cache, head_keys(cfg), full)
        cfg.model.target_model_path = str(folder)
        done["model.target_model_path"] = f"{repo_id} -> {folder}"
    for split in ("train", "eval"):
        key = f"dataset.{split}_data_path"
        repo_id = getattr(cfg.dataset, f"{split}_data_path")
        if is_hub_id(repo_id):
            log.info("%s=%s: fetching the dataset's files into %s", key, repo_id, cache or "the default hub cache")
            folder = resolve_dataset(repo_id, cache, key)
            setattr(cfg.dataset, f"{split}_data_path", str(folder))
            done[key] = f"{repo_id} -> {folder}"
    return done


def local_copy(value: Optional[str], cache: Optional[str], repo_type: str = "model") -> Optional[str]:
    """Where `value` can be read here without the network: itself when it is not a hub id, else its cached
    snapshot folder, else None."""
    if not is_hub_id(value):
        return value
    snap = cached_snapshot(value, cache, repo_type)
    return None if snap is None else str(snap)


def cached_snapshot(repo_id: str, cache: Optional[str], repo_type: str = "model") -> Optional[Path]:
    """The cached snapshot folder of `repo_id` at refs/main, or None; never touches the network."""
    from huggingface_hub import constants

    root = Path(cache) if cache else Path(constants.HF_HUB_CACHE)
    storage = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = storage / "refs" / "main"
    if not ref.is_file():
        return None
    folder = storage / "snapshots" / ref.read_text().strip()
    return folder if folder.is_dir() else None
