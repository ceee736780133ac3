"""The Ray launcher: inference engines as Ray actors, placed by placement groups built from the config.

Placement (`plan_ray`): `inference_num_gpus / gpus_per_engine` engine replicas, each one Ray actor
wrapping the same engine class the local launcher uses (`build_engine`: hf today, sglang/vllm the
same way), reserved by its own placement group:
- GPU cluster: an engine on one node is one bundle `{"GPU": gpus_per_engine}` (STRICT_PACK); an
  engine spanning nodes (sglang `nnodes > 1`) is one bundle `{"GPU": inference_num_gpus_per_node}`
  per node (STRICT_SPREAD, one bundle a node); the actor runs in bundle 0.
- CPU-only cluster: one bundle `{"CPU": 1}` per engine (STRICT_PACK).
Trainer ranks stay on the driver's node (`TrainerRanks`), on the GPUs after the engines' there.

Ray: unless the caller already connected, the cluster RAY_ADDRESS names is joined (`auto` = the one
`ray start` made on this machine); without RAY_ADDRESS a Ray of this machine alone is started for the
run (GPUs: all but the trainer ranks') and shut down when the engines close. On a cluster, start the
driver node's Ray with `--num-gpus` excluding the trainer's GPUs (checked: an engine given one of them
is an error).

Hidden states: the embedded local store (shared memory) works only when every actor runs on the
driver's node; that is checked once the placement groups are placed. Across machines the store
must be Mooncake. Actors get the store object itself (pickled); its capacity counters live in a
file in the store's directory, so processes Ray started account puts and deletes in the same
counters as the driver.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch

from torchspec.inference.base import StoredSample
from torchspec.pipeline.launcher_local import PlacementError, _from_wire, _to_wire


# -- placement --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayPlacement:
    num_engines: int
    bundles: tuple[dict, ...]          # one engine replica's placement-group bundles
    strategy: str                      # STRICT_PACK (one node) or STRICT_SPREAD (one bundle a node)
    actor_gpus: int                    # GPUs of the actor (bundle 0); 0 on a CPU-only cluster
    trainer_devices: tuple[str, ...]   # one per trainer rank, on the driver's node
    colocate: bool = False

    def describe(self) -> str:
        where = f"{self.actor_gpus} GPU(s) each" if self.actor_gpus else "CPU"
        return (f"{self.num_engines} Ray engine actor(s) ({where}; placement group {self.strategy} "
                f"{list(self.bundles)} per engine); {len(self.trainer_devices)} trainer rank(s) on the "
                f"driver's node on {', '.join(self.trainer_devices)}")


def plan_ray(cfg, cluster_gpus: float, local_gpus: int | None = None) -> RayPlacement:
    """The placement for a cluster with `cluster_gpus` GPUs in all (0: CPU-only) and `local_gpus` on
    the driver's node (default: torch's count)."""
    from torchspec.config.validate import gpus_per_engine, gpus_per_engine_process

    inf, tr = cfg.inference, cfg.training
    if inf.colocate:
        raise PlacementError("inference.launcher=ray runs the engines as Ray actors; inference.colocate=true "
                             "(target inside the trainer process) needs inference.launcher=local")
    if tr.training_num_nodes > 1:
        raise PlacementError(f"training.training_num_nodes={tr.training_num_nodes}: trainer ranks on several nodes "
                             "are not supported yet; the Ray launcher spreads the inference engines over the "
                             "cluster and runs the trainer ranks on the driver's node (training_num_nodes=1)")
    per_engine, per_process = gpus_per_engine(cfg), gpus_per_engine_process(cfg)
    if inf.inference_engine_type == "hf" and per_engine != 1:
        raise PlacementError(f"inference.inference_num_gpus_per_engine={per_engine}: the hf engine runs on one GPU "
                             "per engine; use more engines (inference.inference_num_gpus) or sglang/vllm for TP")
    n_engines = inf.inference_num_gpus // per_engine
    if n_engines < 1:
        raise PlacementError(f"inference.inference_num_gpus={inf.inference_num_gpus}: need at least one engine "
                             f"of {per_engine} GPU(s)")
    world = tr.training_num_gpus_per_node
    local_gpus = torch.cuda.device_count() if local_gpus is None else local_gpus
    if not cluster_gpus:
        return RayPlacement(n_engines, ({"CPU": 1},), "STRICT_PACK", 0, ("cpu",) * world)
    if local_gpus < world:
        raise PlacementError(f"training.training_num_gpus_per_node={world}: the driver's node has {local_gpus} "
                             "GPU(s) for the trainer ranks")
    # The driver node's Ray hands out its first GPUs to engines (start it with --num-gpus excluding
    # the trainer's); the trainer ranks take the last `world` GPUs of the node.
    trainer_devices = tuple(f"cuda:{local_gpus - world + i}" for i in range(world))
    if per_engine > per_process:   # spans nodes: one bundle per node
        bundles = tuple({"GPU": per_process} for _ in range(per_engine // per_process))
        return RayPlacement(n_engines, bundles, "STRICT_SPREAD", per_process, trainer_devices)
    return RayPlacement(n_engines, ({"GPU": per_engine},), "STRICT_PACK", per_engine, trainer_devices)


# -- the engine actor -------------------------------------------------------------------------------

class _EngineActor:
    """One engine inside a Ray actor: built once, then `generate` per submission (in order)."""

    def __init__(self, engine_factory, store, num_threads: int):
        import ray

        from torchspec.config.errors import ConfigError

        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.engine, self.config_error = None, None
        if self.gpu_ids:
            device = "cuda:0"   # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs
            torch.cuda.set_device(0)
        else:
            device = "cpu"
            torch.set_num_threads(num_threads)
        try:
            self.engine = engine_factory(store, device)
        except ConfigError as e:   # user-caused (e.g. model.target_model_path): one line for the driver
            self.config_error = str(e)

    def ready(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "gpu_ids": self.gpu_ids,
                "config_error": self.config_error}

    def generate(self, items) -> tuple[list[StoredSample], float]:
        t0 = time.monotonic()
        stored = self.engine.generate(_from_wire(items))
        return stored, time.monotonic() - t0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


class RayEngines:
    """The controller's EngineGroup over Ray actors: one actor per engine replica, each in its own
    placement group; submissions to one actor run in order, results come back as they finish."""

    def __init__(self, engine_factory, store, placement: RayPlacement, num_threads: int = 1,
                 start_timeout: float = 600.0, pg_timeout: float = 120.0):
        import ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from torchspec.transfer.local import LocalStore

        self._ray = ray
        self.num_workers = placement.num_engines
        self.busy_s = 0.0   # seconds spent generating, over all workers
        self.pending: dict = {}        # ObjectRef -> worker
        self.actors: list = []
        self.pgs: list = []
        self._closed = False
        local_store = isinstance(store, LocalStore)
        try:
            for _ in range(self.num_workers):
                self.pgs.append(placement_group([dict(b) for b in placement.bundles], strategy=placement.strategy))
            try:
                ray.get([pg.ready() for pg in self.pgs], timeout=pg_timeout)
            except ray.exceptions.GetTimeoutError:
                raise PlacementError(
                    f"Ray could not place {self.num_workers} engine(s) of {list(placement.bundles)} "
                    f"({placement.strategy}) within {pg_timeout:.0f}s; cluster resources: "
                    f"{ray.cluster_resources()} (inference.inference_num_gpus / _per_engine / _per_node)") from None
            if local_store:
                here = ray.get_runtime_context().get_node_id()
                nodes = {n for pg in self.pgs for n in placement_group_table(pg)["bundles_to_node_id"].values()}
                if nodes - {here}:
                    raise PlacementError(
                        f"Ray placed inference engines on {len(nodes - {here})} node(s) other than the driver's; "
                        "the local hidden-state store is shared memory on one node: use the mooncake store for "
                        "engines on other machines, or keep inference.inference_num_gpus within this node")
            actor_cls = ray.remote(_EngineActor)
            for w, pg in enumerate(self.pgs):
                strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
                resources = ({"num_gpus": placement.actor_gpus, "num_cpus": 0} if placement.actor_gpus
                             else {"num_cpus": 1})
                self.actors.append(actor_cls.options(scheduling_strategy=strategy, max_restarts=0,
                                                     **resources).remote(engine_factory, store, num_threads))
            try:
                ready = ray.get([a.ready.remote() for a in self.actors], timeout=start_timeout)
            except ray.exceptions.RayActorError as e:
                raise RuntimeError(f"an inference engine actor failed to start:\n{e}") from None
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"the inference engine actors did not start within {start_timeout:.0f}s "
                                   "(loading the target?)") from None
            self._check_ready(ready, placement, local_store)
            self.pids = [r["pid"] for r in ready]
        except BaseException:
            self.close()
            raise

    def _check_ready(self, ready: list[dict], placement: RayPlacement, local_store: bool) -> None:
        from torchspec.config.errors import ConfigError

        for r in ready:
            if r["config_error"]:
                raise ConfigError(r["config_error"])
        here = self._ray.get_runtime_context().get_node_id()
        if local_store and any(r["node"] != here for r in ready):
            raise PlacementError("an inference engine actor runs on another node than the driver's; the local "
                                 "store needs every engine on the driver's node (use the mooncake store)")
        # Trainer ranks use the driver node's last GPUs: an engine there must not have been given one.
        trainer_ids = {d.removeprefix("cuda:") for d in placement.trainer_devices if d.startswith("cuda")}
        clash = sorted({g for r in ready if r["node"] == here for g in r["gpu_ids"]} & trainer_ids)
        if clash:
            raise PlacementError(
                f"Ray gave GPU(s) {clash} of the driver's node to inference engines, but the trainer ranks use "
                f"{', '.join(placement.trainer_devices)}; start this node's Ray with --num-gpus excluding the "
                f"{len(trainer_ids)} trainer GPU(s) (training.training_num_gpus_per_node)")

    def submit(self, worker: int, samples: list) -> None:
        self.pending[self.actors[worker].generate.remote(_to_wire(samples))] = worker

    def wait(self, timeout: float) -> list[tuple[int, list[StoredSample]]]:
        ray = self._ray
        if not self.pending:
            return []
        refs = list(self.pending)
        done, _ = ray.wait(refs, num_returns=1, timeout=max(timeout, 0.0))
        if done:   # then everything else already finished, without waiting
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        finished = set(done)
        out = []
        for ref in (r for r in refs if r in finished):   # in submission order
            worker = self.pending.pop(ref)
            try:
                stored, seconds = ray.get(ref)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                self.close()
                raise RuntimeError(f"inference engine {worker} (Ray actor) failed:\n{e}") from None
            self.busy_s += seconds
            out.append((worker, stored))
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        self.pending.clear()
        if self.actors:
            try:   # let each engine finish its current submission and release its resources
                ray.get([a.close.remote() for a in self.actors], timeout=30)
            except Exception:
                pass
        for a in self.actors:
            ray.kill(a, no_restart=True)
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        self.actors, self.pgs = [], []


_started_ray = False   # this launcher called ray.init(): it also shuts Ray down when its engines close


def _connect(cfg) -> None:
    """Connect to Ray unless already connected: the cluster RAY_ADDRESS names ("auto" = the one `ray start`
    made on this machine), else a Ray of this machine alone, started here, holding back the GPUs the
    trainer ranks use."""
    global _started_ray
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    local_gpus = torch.cuda.device_count()
    ray.init(address="local", include_dashboard=False,
             num_gpus=max(local_gpus - cfg.training.training_num_gpus_per_node, 0) if local_gpus else 0)
    _started_ray = True


def _disconnect() -> None:
    global _started_ray
    if _started_ray:
        import ray

        ray.shutdown()
        _started_ray = False


class _OwnedRayEngines(RayEngines):
    """RayEngines on a Ray connection this launcher opened: shut down on close()."""

    def close(self) -> None:
        super().close()
        _disconnect()


def plan_ray_connected(cfg) -> RayPlacement:
    """Connect to Ray and plan for its cluster's resources."""
    import ray

    _connect(cfg)
    return plan_ray(cfg, ray.cluster_resources().get("GPU", 0))


def start_ray_engines(cfg, store, placement: RayPlacement, engine_factory=None) -> RayEngines:
    """The EngineGroup for a Ray placement. engine_factory(store, device) -> Engine; default: the config's."""
    from torchspec.inference.factory import build_engine

    _connect(cfg)
    factory = engine_factory or functools.partial(build_engine, cfg)
    cls = _OwnedRayEngines if _started_ray else RayEngines
    try:
        return cls(factory, store, placement)
    except BaseException:
        _disconnect()
        raise
