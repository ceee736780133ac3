"""The keyword arguments we pass to `sgl.Engine`, built from the config (pure; no sglang import).

Three layers, later ones winning:
  1. the essential fields of `inference.sglang` (under sgl.Engine's own names) plus the keys
     derived from other sections (model_path, trust_remote_code);
  2. `inference.sglang.extra_args`, forwarded as-is, EXCEPT the protected keys below, which
     are dropped with one warning each;
  3. the keys TorchSpec manages itself: spec-training invariants and the per-engine runtime
     values the launcher picks (base_gpu_id, node_rank, ports, dist_init_addr, ...).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping, Optional

from torchspec.config.schema import Config

logger = logging.getLogger(__name__)

# sgl.Engine keys that extra_args may not set, and where the user sets them instead.
PROTECTED_EXTRA_ARGS: dict[str, str] = {
    # topology
    "tp_size": "inference.sglang.tp_size",
    "pp_size": "inference.sglang.pp_size",
    "base_gpu_id": "chosen by the launcher",
    "nnodes": "inference.sglang.nnodes",
    "node_rank": "chosen by the launcher",
    # ports: free ones picked by us, or inference.sglang.port's block
    "port": "inference.sglang.port (null: free ports)",
    "nccl_port": "inference.sglang.port (null: free ports)",
    # networking
    "dist_init_addr": "inference.sglang.dist_init_addr",
    "dist_timeout": "inference.sglang.dist_timeout",
    # spec-training invariants
    "disable_radix_cache": "always true for spec training",
    "enable_return_hidden_states": "always true for spec training",
    "enable_aux_hidden_states": "managed by the engine",
    "enable_spec_training_mooncake": "managed by the engine",
    "chunked_prefill_size": "managed by the engine",
    "disable_cuda_graph": "managed by the engine",
    # derived from other sections
    "model_path": "model.target_model_path",
    "trust_remote_code": "model.trust_remote_code",
    "mem_fraction_static": "inference.sglang.mem_fraction_static",
}

# Set on every engine: hidden states must be computed for every token of every prompt
# (a radix-cache hit would skip the cached prefix), and we only prefill, so no decode graphs.
SPEC_TRAINING_INVARIANTS: dict[str, Any] = {
    "disable_radix_cache": True,
    "enable_return_hidden_states": True,
    "disable_cuda_graph": True,
}

# Essential fields passed under the same name (None = leave SGLang's own default).
_ESSENTIAL = (
    "tp_size",
    "pp_size",
    "nnodes",
    "mem_fraction_static",
    "context_length",
    "attention_backend",
    "quantization",
    "kv_cache_dtype",
    "moe_runner_backend",
    "model_loader_extra_config",
    "disable_flashinfer_autotune",
    "enable_multimodal",
    "enable_metrics",
    "dist_init_addr",
    "dist_timeout",
    "log_level",
    "log_requests",
    "log_requests_level",
)


def filter_extra_args(
    extra_args: Mapping[str, Any], warn: Optional[Callable[[str], None]] = None
) -> dict[str, Any]:
    """extra_args without the protected keys; one warning per dropped key."""
    warn = warn or logger.warning
    kept = {}
    for key, value in extra_args.items():
        if key in PROTECTED_EXTRA_ARGS:
            warn(
                f"inference.sglang.extra_args.{key}={value!r} dropped: '{key}' is managed by "
                f"TorchSpec ({PROTECTED_EXTRA_ARGS[key]})"
            )
        else:
            kept[key] = value
    return kept


def build_sglang_engine_kwargs(
    cfg: Config,
    managed: Optional[Mapping[str, Any]] = None,
    warn: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Final `sgl.Engine(**kwargs)` for one engine of this config.

    `managed`: the keys the caller controls for this engine (base_gpu_id, node_rank, port,
    nccl_port, a negotiated dist_init_addr, enable_aux_hidden_states, ...); they win over
    everything else.
    """
    sg = cfg.inference.sglang
    kwargs: dict[str, Any] = {
        "model_path": cfg.model.target_model_path,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    for name in _ESSENTIAL:
        value = getattr(sg, name)
        if value is not None:
            kwargs[name] = value
    kwargs.update(filter_extra_args(sg.extra_args, warn))
    kwargs.update(SPEC_TRAINING_INVARIANTS)
    kwargs.update(managed or {})
    # sgl.Engine takes this one as a JSON string.
    if isinstance(kwargs.get("model_loader_extra_config"), dict):
        kwargs["model_loader_extra_config"] = json.dumps(kwargs["model_loader_extra_config"])
    return kwargs
