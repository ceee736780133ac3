"""Build the engine that `inference.inference_engine_type` names (backends imported lazily)."""

from __future__ import annotations

import torch


def build_engine(cfg, store, device: str | torch.device = "cpu"):
    kind = cfg.inference.inference_engine_type
    if kind == "hf":
        from torchspec.inference.hf import HFEngine

        return HFEngine.from_config(cfg, store, device=device)
    if kind in ("sgl", "vllm"):
        import importlib

        module = {"sgl": "torchspec.inference.sglang", "vllm": "torchspec.inference.vllm"}[kind]
        try:
            backend = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise RuntimeError(f"inference.inference_engine_type={kind!r} is not available in this build "
                               f"({e.name} missing)") from None
        return backend.build_engine(cfg, store, device=device)
    raise ValueError(f"inference.inference_engine_type={kind!r}: unknown engine (expected hf, sgl or vllm)")


ENGINE_START_TIMEOUT_S = 600.0   # how long a launcher waits for hf / vllm engines to load their target


def engine_start_timeout(cfg) -> tuple[float, str]:
    """(seconds a launcher waits for the engines to be ready, the config key that sets it, or "")."""
    if cfg.inference.inference_engine_type == "sgl":
        return float(cfg.inference.sglang.init_timeout), "inference.sglang.init_timeout"
    return ENGINE_START_TIMEOUT_S, ""


def engine_starts_processes(cfg) -> bool:
    """Whether the configured engine starts child processes of its own (sgl.Engine's scheduler and
    detokenizer; vLLM's workers when tp > 1). The local launcher then runs it in a non-daemonic process,
    since a daemonic one may not have children."""
    kind = cfg.inference.inference_engine_type
    return kind == "sgl" or (kind == "vllm" and int(cfg.inference.vllm.tp_size) > 1)
