"""Whether a config spans several machines: the one rule the dry-run plan, the launcher choice (Ray) and the
store choice (Mooncake) all follow; the store and launcher a run resolves to; GPUs per engine."""

from __future__ import annotations


def multi_node_reason(cfg) -> str | None:
    """Why this config spans several nodes (so needs Ray), or None when it fits on one machine."""
    if cfg.training.training_num_nodes > 1:
        return f"training.training_num_nodes={cfg.training.training_num_nodes}"
    inf = cfg.inference
    if not inf.colocate and inf.inference_num_gpus > inf.inference_num_gpus_per_node:
        return (f"inference.inference_num_gpus={inf.inference_num_gpus} > "
                f"inference.inference_num_gpus_per_node={inf.inference_num_gpus_per_node}")
    world = cfg.training.training_num_gpus_per_node
    if not inf.colocate and inf.inference_num_gpus + world > inf.inference_num_gpus_per_node:
        # (the dry-run plan's rule too: engines and trainer share a machine only when both fit on it)
        return (f"inference.inference_num_gpus={inf.inference_num_gpus} + training.training_num_gpus_per_node="
                f"{world} > inference.inference_num_gpus_per_node={inf.inference_num_gpus_per_node} (one machine)")
    if gpus_per_engine(cfg) > gpus_per_engine_process(cfg):
        return (f"one engine spans {gpus_per_engine(cfg) // gpus_per_engine_process(cfg)} nodes "
                f"(inference.sglang.nnodes={cfg.inference.sglang.nnodes})")
    return None


def resolved_store(cfg) -> str:
    """The store the run uses: `inference.store`, or for `auto`: memory when colocated, mooncake when the run
    spans nodes, else local (transfer.factory builds exactly this one)."""
    kind = cfg.inference.store
    if kind != "auto":
        return kind
    if cfg.inference.colocate:
        return "memory"
    return "local" if multi_node_reason(cfg) is None else "mooncake"


def uses_ray(cfg) -> bool:
    """Whether the Ray launcher runs this config: asked for, or the config spans nodes (pipeline.launcher)."""
    return cfg.inference.launcher == "ray" or multi_node_reason(cfg) is not None


def gpus_per_engine_process(cfg) -> int:
    """GPUs of one engine process on one node.

    With sglang nnodes > 1 one process per node spans inference_num_gpus_per_node GPUs;
    otherwise an engine is one process of inference_num_gpus_per_engine GPUs.
    """
    inf = cfg.inference
    if inf.inference_engine_type == "sgl" and inf.sglang.nnodes > 1:
        return inf.inference_num_gpus_per_node
    return inf.inference_num_gpus_per_engine


def gpus_per_engine(cfg) -> int:
    """All GPUs of one engine replica (over its nodes)."""
    inf = cfg.inference
    nnodes = inf.sglang.nnodes if inf.inference_engine_type == "sgl" else 1
    return nnodes * gpus_per_engine_process(cfg)


def sglang_ports_needed(cfg) -> int:
    """Ports of one sgl engine's block when inference.sglang.port is set (inference/sglang.py PORT_NAMES): its
    ServerArgs port and nccl_port, plus node 0's dist_init_addr port when it spans nodes and no
    inference.sglang.dist_init_addr is given."""
    sg = cfg.inference.sglang
    return 3 if sg.nnodes > 1 and not sg.dist_init_addr else 2
