"""Launcher selection: the local launcher (processes on this machine) or the Ray launcher (engine actors
on a Ray cluster), from `inference.launcher`; a run over several nodes always needs Ray.

`plan_placement(cfg)` -> a placement (`launcher_local.Placement` or `launcher_ray.RayPlacement`);
`start_engines(cfg, store, placement, engine_factory)` -> the controller's EngineGroup for it;
`start_trainer_ranks(cfg, spec, store, placement, workdir)` -> `TrainerRanks`: rank 0 in this
process either way, ranks 1.. spawned on this machine (local) or Ray actors on the training nodes (ray).
"""

from __future__ import annotations

import logging

from torchspec.pipeline import launcher_local
from torchspec.pipeline.launcher_local import PlacementError, TrainerRanks  # noqa: F401  (re-exported)

log = logging.getLogger("torchspec.pipeline")


def multi_node_reason(cfg) -> str | None:
    """Why this config spans several nodes (so needs Ray), or None when it fits on one machine."""
    from torchspec.config.validate import gpus_per_engine, gpus_per_engine_process

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


def select_launcher(cfg) -> str:
    """'local' or 'ray'; raises one clear error for an unknown launcher or a missing ray."""
    from torchspec.config.schema import LAUNCHERS

    launcher = cfg.inference.launcher
    if launcher not in LAUNCHERS:
        raise PlacementError(f"inference.launcher={launcher!r}: unknown launcher (expected local or ray)")
    reason = multi_node_reason(cfg)
    if launcher == "local" and reason is None:
        return "local"
    from torchspec.utils.optional import require

    try:
        require("ray", "ray")
    except ImportError as e:
        why = f"{reason}: a run over several nodes" if reason else "inference.launcher=ray"
        raise ImportError(f"{why} needs the Ray launcher: {e}") from None
    if launcher == "local":
        log.info("%s: several nodes, so the Ray launcher is used (inference.launcher=ray)", reason)
    return "ray"


def plan_placement(cfg):
    if select_launcher(cfg) == "local":
        return launcher_local.plan_local(cfg)
    from torchspec.pipeline.launcher_ray import plan_ray_connected

    return plan_ray_connected(cfg)


def start_engines(cfg, store, placement, engine_factory=None):
    from torchspec.pipeline.launcher_ray import RayPlacement, start_ray_engines

    if isinstance(placement, RayPlacement):
        return start_ray_engines(cfg, store, placement, engine_factory)
    return launcher_local.start_engines(cfg, store, placement, engine_factory)


def start_trainer_ranks(cfg, spec, store, placement, workdir) -> TrainerRanks:
    from torchspec.pipeline.launcher_ray import RayPlacement, start_ray_trainer_ranks

    if isinstance(placement, RayPlacement):
        return start_ray_trainer_ranks(cfg, spec, store, placement)
    return launcher_local.start_trainer_ranks(cfg, spec, store, placement.trainer_devices, workdir)
