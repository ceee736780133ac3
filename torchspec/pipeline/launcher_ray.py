"""The Ray launcher: inference engines and trainer ranks as Ray actors, placed by placement groups
built from the config. Three modules (the other two import `ray_placement`, not each other):
- `ray_placement`: the plan (`plan_ray`; `plan_ray_connected` with the connected cluster's resources)
  -> `RayPlacement`, the cluster checks (resources per node, node IPs for the local store, the store
  setting), placement-group layout, and connecting to Ray (the cluster RAY_ADDRESS names, else a Ray of
  this machine started for the run and shut down once the engines and the trainer ranks closed).
- `ray_engines`: one Ray actor per engine replica (one per node for an sgl engine spanning nodes):
  `start_ray_engines` -> `RayEngines`, the controller's EngineGroup.
- `ray_ranks`: trainer rank 0 in the driver, ranks 1.. as Ray actors on the training nodes:
  `start_ray_trainer_ranks` -> `ranks.TrainerRanks` over `RayPeers`.

This module re-exports their public names. The code looks names up in the module that defines them, so
patch them there (e.g. `ray_placement.node_ips`, `ray_ranks.RayPeers`).
"""

from torchspec.pipeline.ray_engines import RayEngines, sgl_node_factory, start_ray_engines
from torchspec.pipeline.ray_placement import (RayPlacement, check_cluster, check_local_store, check_store_config,
                                              node_ips, plan_ray, plan_ray_connected)
from torchspec.pipeline.ray_ranks import RayPeers, start_ray_trainer_ranks

__all__ = ["RayEngines", "RayPeers", "RayPlacement", "check_cluster", "check_local_store", "check_store_config",
           "node_ips", "plan_ray", "plan_ray_connected", "sgl_node_factory", "start_ray_engines",
           "start_ray_trainer_ranks"]
