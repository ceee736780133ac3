"""Checks on a merged `Config` that types alone cannot express.

Every failure is one `ConfigError` line naming the key, its value, and the file (or the
command line) that set it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from torchspec.config import schema as S
from torchspec.config.errors import ConfigError
from torchspec.config.schema import Config
from torchspec.config.target import AUX_LAYERS_KEY, aux_layers_problem
from torchspec.config.topology import (gpus_per_engine, gpus_per_engine_process,  # noqa: F401  (re-exported)
                                       sglang_ports_needed)


def validate_config(cfg: Config) -> None:
    _check_choices(cfg)
    _check_positive(cfg)
    _check_ranges(cfg)
    _check_inference_topology(cfg)
    _check_aux_layers(cfg)
    _check_gpu_direct(cfg)
    _check_files(cfg)


# ---------------------------------------------------------------- helpers


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _fail(cfg: Config, key: str, message: str) -> None:
    from torchspec.config.origins import origin_of

    src = origin_of(cfg, key)
    where = f" ({src})" if src else " (schema default)"
    raise ConfigError(f"{key}={_get(cfg, key)!r}: {message}{where}")


def _one_of(cfg: Config, key: str, choices: Iterable[str], optional: bool = False) -> None:
    value = _get(cfg, key)
    if optional and value is None:
        return
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        _fail(cfg, key, f"unknown value, expected one of {', '.join(choices)}{hint}")


# ---------------------------------------------------------------- checks


def _check_choices(cfg: Config) -> None:
    _one_of(cfg, "inference.inference_engine_type", S.INFERENCE_ENGINE_TYPES)
    _one_of(cfg, "inference.launcher", S.LAUNCHERS)
    _one_of(cfg, "training.attention_backend", S.TRAINING_ATTENTION_BACKENDS)
    _one_of(cfg, "training.loss_mask_alignment", S.LOSS_MASK_ALIGNMENTS)
    _one_of(cfg, "dataset.chat_template", S.CHAT_TEMPLATES)
    _one_of(cfg, "dataset.on_bad_record", S.ON_BAD_RECORD)
    _one_of(cfg, "training.parallel_mode", S.PARALLEL_MODES)
    _one_of(cfg, "training.lr_decay_style", S.LR_DECAY_STYLES)
    _one_of(cfg, "logging.report_to", S.REPORT_TO)
    _one_of(cfg, "logging.log_level", S.LOG_LEVELS)
    _one_of(cfg, "mooncake.protocol", S.MOONCAKE_PROTOCOLS)
    _one_of(cfg, "inference.store", S.STORE_TYPES)
    _one_of(cfg, "model.target_model_backend", S.TARGET_MODEL_BACKENDS, optional=True)
    _one_of(cfg, "dataset.generation.on_truncated", S.ON_TRUNCATED)
    backend = cfg.model.target_model_backend
    engine = cfg.inference.inference_engine_type
    if backend is not None and {"sglang": "sgl"}.get(backend, backend) != engine:
        import logging

        logging.getLogger(__name__).warning(
            "model.target_model_backend=%r is the original TorchSpec's field and is not used; "
            "the engine is inference.inference_engine_type=%r",
            backend,
            engine,
        )


_POSITIVE = (
    "training.learning_rate",
    "training.max_grad_norm",
    "training.micro_batch_size",
    "training.draft_accumulation_steps",
    "training.num_epochs",
    "training.max_seq_length",
    "training.ttt_length",
    "training.training_num_nodes",
    "training.training_num_gpus_per_node",
    "training.distributed_timeout_minutes",
    "training.max_concurrent_batches",
    "training.save_interval",
    "dataset.eval_interval",
    "dataset.eval_num_draft_steps",
    "dataset.eval_max_new_tokens",
    "inference.inference_num_gpus",
    "inference.inference_num_gpus_per_engine",
    "inference.inference_num_gpus_per_node",
    "inference.inference_batch_size",
    "inference.inference_fetch_batch",
    "inference.inference_buffer_threshold",
    "inference.max_sample_pool_size",
    "inference.sglang.tp_size",
    "inference.sglang.nnodes",
    "inference.sglang.dist_timeout",
    "inference.sglang.init_timeout",
    "inference.vllm.tp_size",
    "mooncake.global_segment_size",
    "mooncake.local_buffer_size",
    "mooncake.max_batch_size",
    "mooncake.max_seq_len",
    "dataset.generation.max_new_tokens",
    "dataset.generation.batch_size",
)
_POSITIVE_IF_SET = (
    "training.lr_total_steps",
    "training.num_train_steps",
    "training.draft_vocab_size",
    "training.max_checkpoints",
    "inference.sglang.context_length",
    "mooncake.gpu_buffer_size",
    "mooncake.hidden_dim",
    "dataset.num_proc",   # null = every core
)
_NON_NEGATIVE = ("training.min_lr", "training.weight_decay", "training.seed", "training.prefetch_depth",
                 "inference.sglang.additional_ports",
                 "dataset.generation.temperature", "dataset.generation.top_k", "dataset.generation.seed")
_NON_NEGATIVE_IF_SET = ("training.gradient_checkpointing_steps",)


def _check_positive(cfg: Config) -> None:
    for key in _POSITIVE:
        if not _get(cfg, key) > 0:
            _fail(cfg, key, "must be > 0")
    for key in _POSITIVE_IF_SET:
        value = _get(cfg, key)
        if value is not None and not value > 0:
            _fail(cfg, key, "must be > 0 (or null)")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            _fail(cfg, key, "must be >= 0")
    for key in _NON_NEGATIVE_IF_SET:
        value = _get(cfg, key)
        if value is not None and value < 0:
            _fail(cfg, key, "must be >= 0 (or null)")


def _check_ranges(cfg: Config) -> None:
    if not 0.0 <= cfg.training.warmup_ratio <= 1.0:
        _fail(cfg, "training.warmup_ratio", "must be between 0 and 1")
    if cfg.training.min_lr > cfg.training.learning_rate:
        _fail(cfg, "training.min_lr", f"must not exceed training.learning_rate={cfg.training.learning_rate}")
    for key in ("inference.sglang.mem_fraction_static", "inference.vllm.mem_fraction_static"):
        if not 0.0 < _get(cfg, key) <= 1.0:
            _fail(cfg, key, "must be in (0, 1]")
    sg = cfg.inference.sglang
    if str(sg.log_level).lower() not in S.SGLANG_LOG_LEVELS:
        _fail(cfg, "inference.sglang.log_level", f"unknown level, expected one of {', '.join(S.SGLANG_LOG_LEVELS)}")
    if sg.log_requests_level not in S.SGLANG_REQUEST_LOG_LEVELS:
        _fail(cfg, "inference.sglang.log_requests_level", "must be 0, 1, 2 or 3 (detail of inference.sglang."
              "log_requests' lines)")
    if cfg.inference.sglang.pp_size != 1:
        _fail(cfg, "inference.sglang.pp_size", "pipeline parallelism is not supported; it must be 1")
    if not 0.0 < cfg.dataset.generation.top_p <= 1.0:
        _fail(cfg, "dataset.generation.top_p", "must be in (0, 1] (1 = off)")
    if cfg.debug.debug_inference_only and cfg.debug.debug_train_only:
        _fail(cfg, "debug.debug_train_only", "cannot be combined with debug.debug_inference_only")
    if cfg.training.gradient_checkpointing_steps is not None and not cfg.training.gradient_checkpointing:
        _fail(cfg, "training.gradient_checkpointing_steps", "limits the checkpointing of "
              "training.gradient_checkpointing to the first N TTT steps, which is off; set "
              "training.gradient_checkpointing=true, or leave this null")
    if cfg.training.continual_training and not cfg.training.load_path:
        _fail(cfg, "training.continual_training", "starts from the weights of the checkpoint in training.load_path, "
              "which is not set; set training.load_path, or leave this false")
    for mode in ("debug_inference_only", "debug_train_only"):
        if getattr(cfg.debug, mode) and not cfg.debug.save_debug_train_data:
            _fail(cfg, f"debug.{mode}", "needs debug.save_debug_train_data: the directory the hidden-state "
                  + ("records are written to" if mode == "debug_inference_only" else "records are read from"))


def _check_gpu_direct(cfg: Config) -> None:
    """mooncake.enable_gpu_direct / gpu_buffer_size: GPU-direct puts (device memory registered with Mooncake's
    transfer engine) are not built; records are copied to host memory first. Refused, never ignored."""
    if cfg.mooncake.enable_gpu_direct:
        _fail(cfg, "mooncake.enable_gpu_direct", "GPU-direct transfer is not built in this store (records are "
              "copied to host memory before a put); set it to false (the default)")
    if cfg.mooncake.gpu_buffer_size is not None:
        _fail(cfg, "mooncake.gpu_buffer_size", "sizes the device buffer of mooncake.enable_gpu_direct, which this "
              "store does not have; set it to null (the default)")


def _check_inference_topology(cfg: Config) -> None:
    inf = cfg.inference
    engine = inf.inference_engine_type
    if engine == "sgl":
        sg = inf.sglang
        per = gpus_per_engine_process(cfg)
        per_key = (
            "inference.inference_num_gpus_per_node" if sg.nnodes > 1 else "inference.inference_num_gpus_per_engine"
        )
        if sg.tp_size != sg.nnodes * per:
            _fail(
                cfg,
                "inference.sglang.tp_size",
                f"must equal nnodes x gpus_per_engine = {sg.nnodes} x {per} = {sg.nnodes * per} "
                f"(inference.sglang.nnodes={sg.nnodes}, {per_key}={per})",
            )
        if sg.nnodes > 1 and inf.inference_num_gpus_per_engine != sg.nnodes * per:
            # an engine spanning nodes takes inference_num_gpus_per_node GPUs on each of them; this key then names
            # the whole engine (as the original TorchSpec's multi-node configs write it), never anything else
            _fail(
                cfg,
                "inference.inference_num_gpus_per_engine",
                f"with inference.sglang.nnodes={sg.nnodes} one engine spans {sg.nnodes} nodes of "
                f"inference.inference_num_gpus_per_node={per} GPUs, so it must be {sg.nnodes} x {per} = "
                f"{sg.nnodes * per}",
            )
        engines = inf.inference_num_gpus // max(gpus_per_engine(cfg), 1)
        if sg.dist_init_addr and engines > 1:
            _fail(cfg, "inference.sglang.dist_init_addr", f"is where the TP ranks of ONE engine meet, but this config "
                  f"starts {engines} engines (inference.inference_num_gpus={inf.inference_num_gpus}, "
                  f"{gpus_per_engine(cfg)} per engine), which would all try to meet there; leave it null: each engine "
                  "then meets at an address of its own (127.0.0.1:<its nccl_port> on one node, a free port on its "
                  "node 0 when it spans nodes)")
        if sg.port is not None:
            need = sglang_ports_needed(cfg)
            if not 1 <= sg.port <= 65536 - need:
                _fail(cfg, "inference.sglang.port", f"must be a TCP port, 1 to {65536 - need} (an engine takes "
                      f"{need} ports from it), or null for free ports")
            if sg.additional_ports < need - 1:
                what = ("port, nccl_port and node 0's dist_init_addr port" if need == 3 else "port and nccl_port")
                _fail(cfg, "inference.sglang.additional_ports", f"each engine's block of inference.sglang.port="
                      f"{sg.port} holds 1 + additional_ports ports and an engine takes {need} ({what}): it must be "
                      f">= {need - 1}")
    elif engine == "vllm":
        if inf.vllm.tp_size != inf.inference_num_gpus_per_engine:
            _fail(
                cfg,
                "inference.vllm.tp_size",
                f"must equal inference.inference_num_gpus_per_engine={inf.inference_num_gpus_per_engine}",
            )
    if gpus_per_engine_process(cfg) > inf.inference_num_gpus_per_node:
        _fail(
            cfg,
            "inference.inference_num_gpus_per_engine",
            f"an engine on one node cannot use more than inference.inference_num_gpus_per_node="
            f"{inf.inference_num_gpus_per_node} GPUs (use inference.sglang.nnodes > 1 to span nodes)",
        )
    from torchspec.config.topology import multi_node_reason, uses_ray

    if inf.colocate and uses_ray(cfg):
        why = ("inference.launcher=ray" if inf.launcher == "ray"
               else f"{multi_node_reason(cfg)}: the run spans nodes, so the Ray launcher")
        _fail(cfg, "inference.colocate",
              f"runs the target inside each trainer process, which only the local launcher does; {why} runs the "
              "engines as Ray actors (set inference.colocate=false, or inference.launcher=local on one machine)")
    size = gpus_per_engine(cfg)
    if inf.inference_num_gpus % size:
        _fail(
            cfg,
            "inference.inference_num_gpus",
            f"not divisible into engines of {size} GPUs each",
        )


def _check_aux_layers(cfg: Config) -> None:
    """The one aux-layer check (torchspec.config.target), without the target's layer count: the engines
    check the ids against the target when they read its config."""
    layers = cfg.inference.aux_hidden_states_layers
    if layers is None:
        return
    problem = aux_layers_problem(layers)
    if problem:
        _fail(cfg, AUX_LAYERS_KEY, f"{problem} (or null for the default)")


def _check_files(cfg: Config) -> None:
    path = cfg.model.draft_model_config
    if path is None:
        return
    if not Path(path).is_file():
        _fail(cfg, "model.draft_model_config", "file not found")
    import json

    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        _fail(cfg, "model.draft_model_config", f"not valid JSON: line {e.lineno}: {e.msg}")
    if not isinstance(data, dict):
        _fail(cfg, "model.draft_model_config", "must hold a JSON object (a config.json)")
