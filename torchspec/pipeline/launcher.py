"""Launcher selection: the local launcher (processes on this machine) or the Ray launcher (engine actors
on a Ray cluster), from `inference.launcher`; a run over several nodes always needs Ray.

`plan_placement(cfg)` -> a placement (`launcher_local.Placement` or `ray_placement.RayPlacement`);
`start_engines(cfg, store, placement, engine_factory)` -> the controller's EngineGroup for it;
`start_trainer_ranks(cfg, spec, store, placement, workdir)` -> `TrainerRanks`: rank 0 in this
process either way, ranks 1.. spawned on this machine (local) or Ray actors on the training nodes (ray).
"""

from __future__ import annotations

import logging

from torchspec.config.topology import multi_node_reason  # noqa: F401  (re-exported)
from torchspec.pipeline import launcher_local
from torchspec.pipeline.launcher_local import PlacementError, TrainerRanks  # noqa: F401  (re-exported)

log = logging.getLogger("torchspec.pipeline")


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
    from torchspec.pipeline.ray_placement import plan_ray_connected

    return plan_ray_connected(cfg)


def engine_side(placement) -> tuple:
    """(the dtype of the records the engines put, how many engines) of a local or Ray placement."""
    from torchspec.inference.base import compute_dtype

    if placement.colocate:
        return compute_dtype(placement.trainer_devices[0]), 1
    if hasattr(placement, "num_engines"):   # Ray
        return compute_dtype("cuda" if placement.actor_gpus else "cpu"), placement.num_engines
    return compute_dtype(placement.engine_devices[0]), len(placement.engine_devices)


def start_engines(cfg, store, placement, engine_factory=None, record_tokenizer=None):
    """record_tokenizer: see launcher_local.start_engines (the engines tokenize deferred records)."""
    from torchspec.pipeline.ray_engines import start_ray_engines
    from torchspec.pipeline.ray_placement import RayPlacement

    if isinstance(placement, RayPlacement):
        return start_ray_engines(cfg, store, placement, engine_factory, record_tokenizer)
    return launcher_local.start_engines(cfg, store, placement, engine_factory, record_tokenizer=record_tokenizer)


def start_trainer_ranks(cfg, spec, store, placement, workdir) -> TrainerRanks:
    from torchspec.pipeline.ray_placement import RayPlacement
    from torchspec.pipeline.ray_ranks import start_ray_trainer_ranks

    if isinstance(placement, RayPlacement):
        return start_ray_trainer_ranks(cfg, spec, store, placement)
    return launcher_local.start_trainer_ranks(cfg, spec, store, placement.trainer_devices, workdir)
