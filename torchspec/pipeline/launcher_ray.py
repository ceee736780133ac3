"""The Ray launcher: inference engines and trainer ranks as Ray actors, placed by placement groups
built from the config.

Engines (`plan_ray`): `inference_num_gpus / gpus_per_engine` engine replicas, each one Ray actor
wrapping the same engine class the local launcher uses (`build_engine`: hf today, sglang/vllm the
same way), reserved by its own placement group:
- GPU cluster: an engine on one node is one bundle `{"GPU": gpus_per_engine}` (STRICT_PACK); an
  engine spanning nodes (sglang `nnodes > 1`) is one bundle `{"GPU": inference_num_gpus_per_node}`
  per node (STRICT_SPREAD, one bundle a node), one actor per bundle (below); else the actor runs in bundle 0.
- CPU-only cluster: one bundle `{"CPU": 1}` per engine (STRICT_PACK); per node of it if it spans nodes
  (STRICT_SPREAD).

An engine spanning N nodes (only sgl) is N actors, actor r in bundle r on its own node: each builds
`sglang.build_node_engine(cfg, r, dist_init_addr)`, all with the same "ip:port" picked on bundle 0's node
before any starts (sgl.Engine with node_rank r; see torchspec/inference/sglang.py, Placement). Only the
node-0 actor is the engine's worker (generate, records); the others host their node's SGLang scheduler
processes until close. Their start is awaited together (node 0's engine starts only once every node
joined); a node that fails is one line naming the engine and the node.

Trainer ranks: one placement group of `training_num_nodes` bundles, one per training node, each
`{"GPU": training_num_gpus_per_node}` (CPU-only cluster: `{"CPU": ...}`). Over several nodes it is
STRICT_SPREAD: every bundle on a distinct node, so each node's ranks share that node's GPU
interconnect and the world really spans `training_num_nodes` machines (PACK or SPREAD could fold two
bundles onto one big node); on one node a single bundle, STRICT_PACK. Bundle 0 is pinned to the
driver's node (label `ray.io/node-id`): rank 0 runs in the driver process (controller, logging,
checkpoints) on bundle 0's first slot; ranks 1.. are Ray actors, rank r in bundle r // per_node.
On GPUs rank 0's GPU is held by a small lease actor that reports which one Ray gave it, so Ray never
hands a trainer GPU to an engine. The ranks meet through a TCP store on the driver's node IP
(`tcp://<ip>:<free port>`): gloo on CPU, nccl on GPU. The rank protocol is `ranks.py`'s, shared
with the local launcher.

Ray: unless the caller already connected, the cluster RAY_ADDRESS names is joined (`auto` = the one
`ray start` made on this machine); without RAY_ADDRESS a Ray of this machine alone is started for the
run and shut down when both the engines and the trainer ranks have closed.

Hidden states: the embedded local store (shared memory) works only when every actor runs on the
driver's machine: checked by node IP once the placement groups are placed (so a cluster simulated on
one machine, every node on one IP, may use it). Across machines the store must be Mooncake. Actors
get the store object itself (pickled); its capacity counters live in a file in the store's
directory, so processes Ray started account puts and deletes in the same counters as the driver.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass

import torch

from torchspec.inference.base import StoredSample
from torchspec.pipeline.failures import WorkerFailure, ray_death_text
from torchspec.pipeline.launcher_local import PlacementError, check_gpus_per_engine
from torchspec.pipeline.wire import from_wire, to_wire
from torchspec.utils.net import free_port

log = logging.getLogger("torchspec.pipeline")


# -- placement --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayPlacement:
    num_engines: int
    bundles: tuple[dict, ...]          # one engine replica's placement-group bundles
    strategy: str                      # STRICT_PACK (one node) or STRICT_SPREAD (one bundle a node)
    actor_gpus: int                    # GPUs of the actor (bundle 0); 0 on a CPU-only cluster
    trainer_devices: tuple[str, ...]   # one per trainer rank: "cpu", or "cuda" (the GPU Ray gives it)
    trainer_bundles: tuple[dict, ...]  # one per training node; bundle 0 on the driver's node
    trainer_strategy: str              # STRICT_SPREAD over several training nodes, else STRICT_PACK
    colocate: bool = False

    @property
    def ranks_per_node(self) -> int:
        return len(self.trainer_devices) // len(self.trainer_bundles)

    def describe(self) -> str:
        where = f"{self.actor_gpus} GPU(s) each" if self.actor_gpus else "CPU"
        nodes = len(self.trainer_bundles)
        return (f"{self.num_engines} Ray engine actor(s) ({where}; placement group {self.strategy} "
                f"{list(self.bundles)} per engine); {len(self.trainer_devices)} trainer rank(s) on {nodes} "
                f"node(s) (placement group {self.trainer_strategy} {list(self.trainer_bundles)}; rank 0 in "
                "the driver process on the driver's node, ranks 1.. Ray actors)")


def plan_ray(cfg, cluster_gpus: float) -> RayPlacement:
    """The placement for a cluster with `cluster_gpus` GPUs in all (0: CPU-only)."""
    from torchspec.config.validate import gpus_per_engine, gpus_per_engine_process

    inf, tr = cfg.inference, cfg.training
    if inf.colocate:
        raise PlacementError("inference.launcher=ray runs the engines as Ray actors; inference.colocate=true "
                             "(target inside the trainer process) needs inference.launcher=local")
    per_engine, per_process = gpus_per_engine(cfg), gpus_per_engine_process(cfg)
    check_gpus_per_engine(cfg, per_engine)
    n_engines = inf.inference_num_gpus // per_engine
    if n_engines < 1:
        raise PlacementError(f"inference.inference_num_gpus={inf.inference_num_gpus}: need at least one engine "
                             f"of {per_engine} GPU(s)")
    nodes, per_node = tr.training_num_nodes, tr.training_num_gpus_per_node
    if nodes < 1 or per_node < 1:
        raise PlacementError(f"training.training_num_nodes={nodes} x training.training_num_gpus_per_node="
                             f"{per_node}: both must be at least 1")
    key = "GPU" if cluster_gpus else "CPU"
    trainer = dict(trainer_devices=("cuda" if cluster_gpus else "cpu",) * (nodes * per_node),
                   trainer_bundles=tuple({key: per_node} for _ in range(nodes)),
                   trainer_strategy="STRICT_SPREAD" if nodes > 1 else "STRICT_PACK")
    if not cluster_gpus:   # an engine spanning nodes: one actor per node all the same
        spans = per_engine // per_process
        return RayPlacement(n_engines, ({"CPU": 1},) * spans, "STRICT_SPREAD" if spans > 1 else "STRICT_PACK", 0,
                            **trainer)
    if per_engine > per_process:   # spans nodes: one bundle per node
        bundles = tuple({"GPU": per_process} for _ in range(per_engine // per_process))
        return RayPlacement(n_engines, bundles, "STRICT_SPREAD", per_process, **trainer)
    return RayPlacement(n_engines, ({"GPU": per_engine},), "STRICT_PACK", per_engine, **trainer)


def check_cluster(placement: RayPlacement, nodes: list[dict], driver_node: str) -> None:
    """One clear error when the cluster (`ray.nodes()`) lacks what the placement needs: enough nodes
    with the trainer's per-node resources (the driver's among them), and enough in all."""
    key = next(iter(placement.trainer_bundles[0]))
    per_node = placement.trainer_bundles[0][key]
    n_train = len(placement.trainer_bundles)
    alive = [n for n in nodes if n.get("Alive", True)]
    have = {n["NodeID"]: n.get("Resources", {}).get(key, 0) for n in alive}
    where = f"the Ray cluster has {key} per node {sorted(have.values(), reverse=True)}"
    if have.get(driver_node, 0) < per_node:
        raise PlacementError(
            f"training.training_num_gpus_per_node={per_node}: trainer rank 0 runs in the driver, so the driver's "
            f"node needs {per_node} {key} for the training node it hosts, but it has {have.get(driver_node, 0)} "
            f"({where})")
    if sum(v >= per_node for v in have.values()) < n_train:
        raise PlacementError(
            f"training.training_num_nodes={n_train} x training.training_num_gpus_per_node={per_node}: needs "
            f"{n_train} distinct node(s) with {per_node} {key} each; {where}")
    engine_need = placement.num_engines * sum(b.get(key, 0) for b in placement.bundles)
    need = engine_need + n_train * per_node
    if need > sum(have.values()):
        raise PlacementError(
            f"inference.inference_num_gpus ({engine_need} {key} for {placement.num_engines} engine(s)) + "
            f"training.training_num_nodes x training.training_num_gpus_per_node ({n_train * per_node}) = {need} "
            f"{key}, but {where} ({sum(have.values()):g} in all)")


def node_ips(node_ids) -> dict:
    """node id -> IP address of the machine it runs on (None for a node Ray does not know)."""
    import ray

    known = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    return {n: known.get(n) for n in node_ids}


def check_local_store(store, what: str, node_ids) -> None:
    """The local store is shared memory of one machine: refuse actors on another machine than the
    driver's. Nodes are compared by IP, so a cluster simulated on one machine passes."""
    from torchspec.transfer.local import LocalStore

    if not isinstance(store, LocalStore):
        return
    import ray

    here = node_ips([ray.get_runtime_context().get_node_id()]).popitem()[1]
    away = sorted({ip or "unknown" for ip in node_ips(node_ids).values() if ip != here})
    if away:
        raise PlacementError(
            f"Ray placed {what} on another machine ({', '.join(away)}) than the driver's ({here}); the local "
            "hidden-state store is shared memory of one machine: a run over several machines needs the mooncake "
            "store (inference.store=mooncake)")


def check_store_config(cfg, nodes: list[dict]) -> None:
    """Before anything starts: inference.store=local (when that setting exists) over several nodes of a
    cluster that spans several machines cannot work."""
    from torchspec.config.topology import multi_node_reason

    store = getattr(cfg.inference, "store", None)
    reason = multi_node_reason(cfg)
    machines = {n["NodeManagerAddress"] for n in nodes if n.get("Alive", True)}
    if store == "local" and reason and len(machines) > 1:
        raise PlacementError(
            f"inference.store=local: this run spans several nodes ({reason}) of a Ray cluster on "
            f"{len(machines)} machines, but the local store is shared memory of one machine; set "
            "inference.store=mooncake")


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
        stored = self.engine.generate(from_wire(items))
        return stored, time.monotonic() - t0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _free_address() -> str:
    """"ip:port" with a free port on the node this runs on (a Ray task in an engine's bundle 0)."""
    import ray

    ip = ray.util.get_node_ip_address()
    return f"{f'[{ip}]' if ':' in ip else ip}:{free_port(ip)}"


def _cause(error) -> str:
    """The exception that ended an actor's creation task, one line: the last `SomeError: ...` line of
    Ray's text (it holds the traceback), else Ray's reason, shortened."""
    import re

    raised = [ln.strip() for ln in str(error).splitlines()
              if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln.strip())]
    return raised[-1] if raised else ray_death_text(error)


class RayEngines:
    """The controller's EngineGroup over Ray actors: one actor per engine replica, each in its own
    placement group; submissions to one actor run in order, results come back as they finish."""

    def __init__(self, engine_factory, store, placement: RayPlacement, num_threads: int = 1,
                 start_timeout: float = 600.0, pg_timeout: float = 120.0, node_factory=None):
        import ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self.num_workers = placement.num_engines
        self.busy_s = 0.0   # seconds spent generating, over all workers
        self.pending: dict = {}        # ObjectRef -> worker
        self.actors: list = []
        self.pgs: list = []
        self._closed = False
        self.hold = None   # a Ray this launcher started, released on close
        self.nodes: list[str] = []   # the node id of each engine actor
        self.node_actors: list = []  # (engine, node r >= 1, actor) of engines spanning nodes
        if len(placement.bundles) > 1 and node_factory is None:
            raise PlacementError(f"an engine spanning {len(placement.bundles)} nodes needs one actor per node; "
                                 "start_ray_engines builds them for the config's sgl engine, not a custom engine_factory")
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
            check_local_store(store, "inference engines",
                              {n for pg in self.pgs for n in placement_group_table(pg)["bundles_to_node_id"].values()})
            actor_cls = ray.remote(_EngineActor)
            resources = ({"num_gpus": placement.actor_gpus, "num_cpus": 0} if placement.actor_gpus
                         else {"num_cpus": 1})
            n_nodes = len(placement.bundles)
            for w, pg in enumerate(self.pgs):
                factories = [engine_factory]
                if n_nodes > 1:   # one actor per node, meeting at an address of bundle 0's node
                    addr = ray.get(ray.remote(_free_address).options(
                        num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote(),
                        timeout=pg_timeout)
                    factories = [node_factory(r, addr) for r in range(n_nodes)]
                for r, factory in enumerate(factories):
                    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
                    actor = actor_cls.options(scheduling_strategy=strategy, max_restarts=0,
                                              **resources).remote(factory, store, num_threads)
                    if r:
                        self.node_actors.append((w, r, actor))
                    else:
                        self.actors.append(actor)
            self._store = store
            ready = self._await_ready(start_timeout, n_nodes)
            self._check_ready(ready, store)
            self.pids = [r["pid"] for r in ready]
        except BaseException:
            self.close()
            raise

    def _await_ready(self, timeout: float, n_nodes: int) -> list[dict]:
        """Every actor's `ready` (node 0's engines, in order), awaited together: an engine spanning nodes
        starts only once all its nodes joined, so the first failure is reported as soon as it comes."""
        ray = self._ray
        refs = {a.ready.remote(): (w, 0) for w, a in enumerate(self.actors)}
        refs.update({a.ready.remote(): (w, r) for w, r, a in self.node_actors})
        results, deadline = {}, time.monotonic() + timeout
        left = list(refs)
        while left:
            done, left = ray.wait(left, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            if not done:
                raise RuntimeError(f"the inference engine actors did not start within {timeout:.0f}s "
                                   "(loading the target?)")
            w, r = refs[done[0]]
            try:
                results[(w, r)] = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                if not r and n_nodes == 1:
                    raise RuntimeError(f"an inference engine actor failed to start:\n{e}") from None
                raise RuntimeError(f"inference engine {w}: its node {r} of {n_nodes} (sgl node_rank {r}) failed to "
                                   f"start: {_cause(e)}") from None
        check_local_store(self._store, "an inference engine actor", [i["node"] for i in results.values()])
        for (w, r), info in results.items():
            if r and info["config_error"]:
                from torchspec.config.errors import ConfigError

                raise ConfigError(f"inference engine {w}, node {r}: {info['config_error']}")
        return [results[(w, 0)] for w in range(len(self.actors))]

    def _check_ready(self, ready: list[dict], store) -> None:
        from torchspec.config.errors import ConfigError

        for r in ready:
            if r["config_error"]:
                raise ConfigError(r["config_error"])
        check_local_store(store, "an inference engine actor", [r["node"] for r in ready])
        self.nodes = [r["node"] for r in ready]
        log.info("engine actors on Ray nodes %s", ", ".join(f"{w}: {n[:8]}" for w, n in enumerate(self.nodes)))

    def submit(self, worker: int, samples: list) -> None:
        self.pending[self.actors[worker].generate.remote(to_wire(samples))] = worker

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
            except ray.exceptions.RayActorError as e:
                self.close()
                raise WorkerFailure(f"inference engine {worker} (Ray actor, pid {self.pids[worker]}) died: "
                                    f"{ray_death_text(e)}") from None
            except ray.exceptions.RayTaskError as e:
                self.close()
                raise WorkerFailure(f"inference engine {worker} (Ray actor) failed:\n{e}") from None
            self.busy_s += seconds
            out.append((worker, stored))
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        self.pending.clear()
        everyone = self.actors + [a for _, _, a in self.node_actors]
        if everyone:
            try:   # let each engine finish its current submission and release its resources
                ray.get([a.close.remote() for a in everyone], timeout=30)
            except Exception:
                pass
        for a in everyone:
            ray.kill(a, no_restart=True)
        self.node_actors = []
        from ray.util.placement_group import remove_placement_group

        for pg in self.pgs:
            try:
                remove_placement_group(pg)
            except Exception:
                pass
        self.actors, self.pgs = [], []
        if self.hold is not None:
            self.hold.release()
            self.hold = None


_started_ray = False   # this launcher called ray.init(): it shuts Ray down once its last user closes
_holds: set = set()     # users (engines, trainer ranks) of the Ray this launcher started


class _RayHold:
    """One user of a Ray this launcher started; the last one released shuts Ray down (idempotent)."""

    def __init__(self):
        _holds.add(self)

    def release(self) -> None:
        global _started_ray
        if self not in _holds:
            return
        _holds.discard(self)
        if not _holds and _started_ray:
            import ray

            ray.shutdown()
            _started_ray = False


def _connect(cfg) -> None:
    """Connect to Ray unless already connected: the cluster RAY_ADDRESS names ("auto" = the one `ray start`
    made on this machine), else a Ray of this machine alone, started here, with all its GPUs (the
    trainer ranks' placement group reserves theirs)."""
    global _started_ray
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    ray.init(address="local", include_dashboard=False, num_gpus=torch.cuda.device_count())
    _started_ray = True


def _hold(cfg) -> _RayHold | None:
    _connect(cfg)
    return _RayHold() if _started_ray else None


def plan_ray_connected(cfg) -> RayPlacement:
    """Connect to Ray, plan for its cluster's resources and check the cluster has them."""
    import ray

    _connect(cfg)
    placement = plan_ray(cfg, ray.cluster_resources().get("GPU", 0))
    nodes = ray.nodes()
    check_cluster(placement, nodes, ray.get_runtime_context().get_node_id())
    check_store_config(cfg, nodes)
    return placement


def sgl_node_factory(cfg, placement: RayPlacement):
    """For engines spanning nodes (sgl, `inference.sglang.nnodes > 1`): node_factory(node_rank, address) ->
    the engine factory of that node's actor; None for engines of one node."""
    if len(placement.bundles) <= 1:
        return None
    from torchspec.inference.sglang import build_node_engine

    given = cfg.inference.sglang.dist_init_addr   # null: an address picked on the engine's node 0
    if given and placement.num_engines > 1:
        log.warning("inference.sglang.dist_init_addr=%r ignored: %d engines span nodes and each needs its own "
                    "address (picked on its node 0)", given, placement.num_engines)
        given = None

    def node_factory(node_rank: int, dist_init_addr: str):
        return functools.partial(build_node_engine, cfg, node_rank, given or dist_init_addr)
    return node_factory


def start_ray_engines(cfg, store, placement: RayPlacement, engine_factory=None) -> RayEngines:
    """The EngineGroup for a Ray placement. engine_factory(store, device) -> Engine; default: the config's."""
    from torchspec.inference.factory import build_engine

    hold = _hold(cfg)
    factory = engine_factory or functools.partial(build_engine, cfg)
    node_factory = sgl_node_factory(cfg, placement) if engine_factory is None else None
    try:
        engines = RayEngines(factory, store, placement, node_factory=node_factory)
    except BaseException:
        if hold is not None:
            hold.release()
        raise
    engines.hold = hold
    return engines


# -- trainer ranks ----------------------------------------------------------------------------------

class _TrainerRankActor:
    """Trainer rank r >= 1 inside a Ray actor (a `RankWorker` once started). On GPUs rank 0's slot gets
    one too, never started: it holds rank 0's GPU and tells the driver which one Ray gave it."""

    def __init__(self):
        self.worker = None

    def info(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def start(self, rank: int, world: int, cfg, spec, store, init_method: str, local_rank: int) -> None:
        import ray

        from torchspec.pipeline.ranks import RankWorker

        device = "cuda:0" if ray.get_gpu_ids() else "cpu"   # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU
        self.worker = RankWorker(rank, world, cfg, spec, store, device, init_method, local_rank)

    def handle(self, *msg) -> None:
        self.worker.handle(*msg)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None


def _died(ray, actor) -> bool:
    """Whether a trainer-rank actor is dead (it cannot answer `info`)."""
    try:
        ray.get(actor.info.remote(), timeout=5)
    except ray.exceptions.RayActorError:
        return True
    except ray.exceptions.GetTimeoutError:
        pass
    return False


class RayPeers:
    """Trainer ranks 1.. as Ray actors in one placement group over the training nodes (the `Peers`
    of `ranks.TrainerRanks`). `nodes[r]` is the Ray node id rank r runs on (as the actor reported it;
    rank 0: the driver's); `rank0_device` and `init_method` are for rank 0 in the driver."""

    def __init__(self, cfg, spec, store, placement: RayPlacement, pg_timeout: float = 120.0,
                 start_timeout: float = 600.0):
        import ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self.actors: dict[int, object] = {}
        self.pending: list = []
        self.nodes: list[str] = []
        self.pids: dict[int, int] = {}
        self.pg = None
        self.hold = None
        world, per_node = len(placement.trainer_devices), placement.ranks_per_node
        bundles = [dict(b) for b in placement.trainer_bundles]
        here = ray.get_runtime_context().get_node_id()
        try:
            self.pg = placement_group(bundles, strategy=placement.trainer_strategy,
                                      bundle_label_selector=[{"ray.io/node-id": here}] + [{}] * (len(bundles) - 1))
            try:
                ray.get(self.pg.ready(), timeout=pg_timeout)
            except ray.exceptions.GetTimeoutError:
                raise PlacementError(
                    f"Ray could not place the trainer ranks' {bundles} ({placement.trainer_strategy}, bundle 0 on the "
                    f"driver's node) within {pg_timeout:.0f}s; cluster resources: {ray.available_resources()} "
                    "(training.training_num_nodes / training.training_num_gpus_per_node)") from None
            bundle_nodes = placement_group_table(self.pg)["bundles_to_node_id"]
            if bundle_nodes[0] != here:
                raise PlacementError("Ray placed trainer rank 0's bundle off the driver's node (rank 0 runs in the driver)")
            gpu = placement.trainer_devices[0].startswith("cuda")
            opts = {"num_gpus": 1, "num_cpus": 0} if gpu else {"num_cpus": 1}
            actor_cls = ray.remote(_TrainerRankActor)
            for r in range(0 if gpu else 1, world):
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r // per_node)
                self.actors[r] = actor_cls.options(scheduling_strategy=strategy, max_restarts=0, **opts).remote()
            try:
                infos = dict(zip(self.actors, ray.get([a.info.remote() for a in self.actors.values()],
                                                      timeout=start_timeout)))
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"the trainer rank actors did not start within {start_timeout:.0f}s") from None
            except ray.exceptions.RayActorError as e:   # which one: the first whose actor is dead
                dead = [r for r, a in self.actors.items() if _died(ray, a)]
                raise WorkerFailure(f"trainer rank {dead[0] if dead else '?'} (Ray actor) died at start: "
                                    f"{ray_death_text(e)}") from None
            self.nodes = [here] + [infos[r]["node"] for r in range(1, world)]
            self.pids = {r: infos[r]["pid"] for r in range(1, world)}
            check_local_store(store, "trainer ranks", self.nodes)
            log.info("trainer ranks on Ray nodes %s (rank 0: the driver's)",
                     ", ".join(f"{r}: {n[:8]}" for r, n in enumerate(self.nodes)))
            self.rank0_device = f"cuda:{infos[0]['gpu_ids'][0]}" if gpu else "cpu"
            ip = ray.util.get_node_ip_address()
            self.init_method = f"tcp://{f'[{ip}]' if ':' in ip else ip}:{free_port(ip)}"
            # they join the process group now and wait there for rank 0 (TrainerRanks)
            self.pending = [(r, self.actors[r].start.remote(r, world, cfg, spec, store, self.init_method,
                                                            r % per_node)) for r in range(1, world)]
        except BaseException:
            self.close()
            raise

    def send(self, messages: list[tuple]) -> None:
        self.pending = [(r, self.actors[r].handle.remote(*m)) for r, m in enumerate(messages, start=1)]

    def _failure(self, rank: int, e) -> WorkerFailure:
        ray = self._ray
        if isinstance(e, ray.exceptions.RayActorError):
            node = self.nodes[rank][:8] if rank < len(self.nodes) else "?"
            return WorkerFailure(f"trainer rank {rank} (Ray actor, pid {self.pids.get(rank, '?')}, node {node}) "
                                 f"died: {ray_death_text(e)}")
        return WorkerFailure(f"trainer rank {rank} (Ray actor) failed:\n{e}")

    def watch(self) -> None:
        """Raise at once if the task of a rank's last message failed or its actor died."""
        ray = self._ray
        refs = [ref for _, ref in self.pending]
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for r, ref in self.pending:
            if ref in done:
                self._result(r, ref)

    def acks(self) -> None:
        pending, self.pending = self.pending, []
        for r, ref in pending:
            self._result(r, ref)

    def _result(self, rank: int, ref):
        """ray.get of rank's task, a failed task or dead actor raised as its WorkerFailure."""
        ray = self._ray
        try:
            return ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            raise self._failure(rank, e) from None

    def close(self) -> None:
        ray = self._ray
        self.pending = []
        started = [a for r, a in self.actors.items() if r]
        if started:
            try:
                ray.get([a.close.remote() for a in started], timeout=30)
            except Exception:
                pass
        for a in self.actors.values():
            ray.kill(a, no_restart=True)
        self.actors = {}
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None
        if self.hold is not None:
            self.hold.release()
            self.hold = None


def start_ray_trainer_ranks(cfg, spec, store, placement: RayPlacement):
    """Rank 0 in this process, ranks 1.. as Ray actors placed by `placement`'s trainer placement group."""
    from torchspec.pipeline.ranks import TrainerRanks

    hold = _hold(cfg)
    try:
        peers = RayPeers(cfg, spec, store, placement)
    except BaseException:
        if hold is not None:
            hold.release()
        raise
    peers.hold = hold
    world = len(placement.trainer_devices)
    return TrainerRanks(cfg, spec, store, peers.rank0_device, world, peers, peers.init_method)
