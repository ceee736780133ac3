"""`preflight(cfg)`: the checks a run's start makes, without starting anything, for `--dry-run`.

Each check calls the same function the start calls (so the two cannot disagree) and collects its
one-line error instead of stopping at the first. Not checked here: the GPUs and the Ray cluster (the
dry run is meant for a machine without them; the start checks them before placing anything).
What cannot be checked yet (a hub id not in the cache: downloaded at start) is listed as pending.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Preflight:
    problems: list[str] = field(default_factory=list)   # what a real start would reject, one line each
    pending: list[str] = field(default_factory=list)    # what is only known at start (downloads)
    store: list[str] = field(default_factory=list)      # the store's bytes: per record, at the peak

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = []
        if self.store:
            lines.append("hidden-state store:")
            lines += [f"  {x}" for x in self.store]
        if self.pending:
            lines.append("still to provide / checked only at start:")
            lines += [f"  - {p}" for p in self.pending]
        if self.problems:
            lines.append(f"dry run: {len(self.problems)} problem(s) a real start would reject:")
            lines += [f"  - {p}" for p in self.problems]
        else:
            lines.append("dry run: OK (a real start accepts this config, given the GPUs and nodes it asks for)")
        return "\n".join(lines)


def _local_path(cfg, key: str, value, kind: str, out: Preflight):
    """The local path to check `value` at: itself, its cached snapshot (hub id), or None (pending/problem)."""
    from torchspec.utils.hub import is_hub_id, local_copy, offline

    path = local_copy(value, cfg.model_download_dir, kind)
    if path is not None or not is_hub_id(value):   # a local path (or none given), or a cached hub id
        return path
    where = cfg.model_download_dir or "the default hub cache"
    if offline():
        out.problems.append(f"{key}={value!r}: not in the hub cache ({where}) and HF_HUB_OFFLINE=1: "
                            "nothing can be downloaded")
    else:
        out.pending.append(f"{key}={value!r}: a hub id, downloaded into {where} at start "
                           "(the checks that read it are skipped)")
    return None


def _check(out: Preflight, fn, *args):
    from torchspec.config.errors import ConfigError
    from torchspec.data.errors import DataError

    try:
        return fn(*args)
    except (ConfigError, DataError) as e:
        out.problems.append(str(e))
    except ImportError as e:   # an install hint (mooncake, ray, ...)
        out.problems.append(f"missing dependency: {e}")
    return None


def _check_store_bytes(cfg, kind: str | None, target, out: Preflight) -> None:
    """The bytes of a record at training.max_seq_length and the store's peak (the lines the dry run prints), and
    the start's checks: the store's budget holds a step, and the `mooncake` keys (`capacity.check_mooncake`)."""
    from torchspec.transfer.capacity import check_hidden_dim, check_store_capacity, store_budget, store_plan

    tr = cfg.training
    dtype = _record_dtype(cfg)
    ranks = tr.training_num_nodes * tr.training_num_gpus_per_node
    budget = store_budget(cfg, kind or "local", "cuda" if _engines_on_gpu(cfg) else None)
    args = (cfg, target.hidden_size, len(target.aux_layers), dtype, ranks, budget)
    out.store.extend(store_plan(*args))
    _check(out, check_store_capacity, *args)
    if kind == "mooncake":   # mooncake.hidden_dim, max_seq_len, and the clients' staging buffer
        _check_mooncake_buffer(cfg, target.hidden_size, len(target.aux_layers), out)
    else:
        _check(out, check_hidden_dim, cfg, target.hidden_size)


def _engines_on_gpu(cfg) -> bool:
    """Whether the engines run on GPUs here (CUDA, or under Ray): where the memory store's budget is measured."""
    import torch

    return torch.cuda.is_available() or cfg.inference.launcher == "ray"


def _record_dtype(cfg):
    """The engines' compute dtype on their device, the records' dtype: sgl and vllm engines run on GPUs only."""
    from torchspec.inference.base import compute_dtype

    gpu = _engines_on_gpu(cfg) or cfg.inference.inference_engine_type in ("sgl", "vllm")
    return compute_dtype("cuda" if gpu else "cpu")


def _check_mooncake_buffer(cfg, hidden_size: int, num_aux_layers: int, out: Preflight) -> None:
    """The start's check of the Mooncake clients' staging buffer (mooncake.max_batch_size records of
    mooncake.max_seq_len tokens must fit mooncake.local_buffer_size)."""
    from torchspec.transfer.capacity import check_mooncake

    _check(out, check_mooncake, cfg, hidden_size, num_aux_layers, _record_dtype(cfg))


def _check_target(cfg, target_path: str, out: Preflight, kind: str | None = None) -> None:
    """Target config, draft config, the head tensors the trainer reads, tokenizer and chat template, and
    that tokenizer and target agree on the vocabulary."""
    import copy

    from torchspec.config.target import TargetInfo
    from torchspec.data.dataset import load_tokenizer
    from torchspec.data.templates import get_template
    from torchspec.models.target_head import check_head_keys
    from torchspec.pipeline.build import draft_config_for
    from torchspec.utils.hub import check_model_dir

    if _check(out, check_model_dir, target_path) is None:   # the start's check (resolve_hub_ids)
        return
    local = copy.deepcopy(cfg)
    local.model.target_model_path = target_path
    target = _check(out, TargetInfo.from_config, local)
    if target is not None:
        _check(out, draft_config_for, local, target.config)
        _check(out, _check_store_bytes, local, kind, target, out)
    _check(out, check_head_keys, local)
    tok = _check(out, load_tokenizer, local)
    if tok is None:
        return
    _check(out, get_template, cfg.dataset.chat_template, tok)
    if target is not None and len(tok) > target.vocab_size:
        out.problems.append(f"model.target_model_path={cfg.model.target_model_path!r}: its tokenizer has "
                            f"{len(tok)} tokens but the target's vocabulary is {target.vocab_size}: they do not "
                            "belong together")


def preflight(cfg) -> Preflight:
    from torchspec.data.formats import resolve_files
    from torchspec.training.checkpoint import check_output_dir, resolve_checkpoint
    from torchspec.transfer.factory import check_store

    out = Preflight()
    if cfg.output_dir:
        _check(out, check_output_dir, cfg.output_dir, cfg.training.load_path)
    if cfg.training.load_path:   # there, a checkpoint dir (or a run's), complete as its meta.json lists it
        _check(out, resolve_checkpoint, cfg.training.load_path)
    kind = _check(out, check_store, cfg)
    if kind == "mooncake" and cfg.mooncake.master_server_address:
        from torchspec.transfer.mooncake_master import check_reachable

        _check(out, check_reachable, cfg.mooncake.master_server_address)
    target_path = _local_path(cfg, "model.target_model_path", cfg.model.target_model_path, "model", out)
    if target_path is None and cfg.model.draft_model_config:   # the target is not read yet: the draft's values are
        from torchspec.models.draft_config import DraftConfig

        _check(out, DraftConfig.from_json, cfg.model.draft_model_config)
    if target_path is not None:
        _check_target(cfg, target_path, out, kind)
    elif kind == "mooncake" and cfg.mooncake.hidden_dim:   # the target is not read yet: mooncake.hidden_dim is H
        from torchspec.config.target import DEFAULT_NUM_AUX_LAYERS

        layers = cfg.inference.aux_hidden_states_layers
        _check_mooncake_buffer(cfg, cfg.mooncake.hidden_dim, len(layers) if layers else DEFAULT_NUM_AUX_LAYERS, out)
    for split in ("train", "eval"):
        key = f"dataset.{split}_data_path"
        path = _local_path(cfg, key, getattr(cfg.dataset, f"{split}_data_path"), "dataset", out)
        if path is not None:
            _check(out, resolve_files, path, key)
    return out
