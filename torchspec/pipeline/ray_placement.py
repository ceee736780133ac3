"""Ray placement: how the config's engines and trainer ranks are laid out in Ray placement groups
(`plan_ray` -> `RayPlacement`), the checks of the cluster against it (resources per node, node IPs for the
local store), and the connection to Ray that the engines (`ray_engines`) and trainer ranks (`ray_ranks`) share.

Engines: `inference_num_gpus / gpus_per_engine` engine replicas, each reserved by its own placement group:
- GPU cluster: an engine on one node is one bundle `{"GPU": gpus_per_engine}` (STRICT_PACK); an
  engine spanning nodes (sglang `nnodes > 1`) is one bundle `{"GPU": inference_num_gpus_per_node}`
  per node (STRICT_SPREAD, one bundle a node), one actor per bundle; else the actor runs in bundle 0.
- CPU-only cluster: one bundle `{"CPU": 1}` per engine (STRICT_PACK); per node of it if it spans nodes
  (STRICT_SPREAD).

Trainer ranks: one placement group of `training_num_nodes` bundles, one per training node, each
`{"GPU": training_num_gpus_per_node}` (CPU-only cluster: `{"CPU": ...}`). Over several nodes it is
STRICT_SPREAD: every bundle on a distinct node, so each node's ranks share that node's GPU
interconnect and the world really spans `training_num_nodes` machines (PACK or SPREAD could fold two
bundles onto one big node); on one node a single bundle, STRICT_PACK. Bundle 0 is pinned to the
driver's node (label `ray.io/node-id`), where rank 0 runs in the driver process.

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

import logging
import os
from dataclasses import dataclass

import torch

from torchspec.pipeline.launcher_local import PlacementError, check_gpus_per_engine

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
            f"({where}); {_fix(key, 'the driver', per_node)}")
    if sum(v >= per_node for v in have.values()) < n_train:
        raise PlacementError(
            f"training.training_num_nodes={n_train} x training.training_num_gpus_per_node={per_node}: needs "
            f"{n_train} distinct node(s) with {per_node} {key} each; {where}; "
            f"{_fix(key, 'each training node', per_node)}")
    engine_need = placement.num_engines * sum(b.get(key, 0) for b in placement.bundles)
    need = engine_need + n_train * per_node
    if need > sum(have.values()):
        raise PlacementError(
            f"inference.inference_num_gpus ({engine_need} {key} for {placement.num_engines} engine(s)) + "
            f"training.training_num_nodes x training.training_num_gpus_per_node ({n_train * per_node}) = {need} "
            f"{key}, but {where} ({sum(have.values()):g} in all); "
            f"{_fix(key, 'the nodes', need - sum(have.values()), more=True)}")


def _fix(key: str, where: str, n: float, more: bool = False) -> str:
    """What the user does about a cluster short of `key`: on a CPU-only cluster every engine and trainer rank is an
    actor holding one CPU and Ray counts a node's cores by itself, so the node(s) can be started with more; GPUs
    cannot be conjured, so a GPU cluster needs more nodes or a smaller run."""
    smaller = ("or run fewer engines (inference.inference_num_gpus) or trainer ranks (training.training_num_nodes, "
               "training.training_num_gpus_per_node)")
    if key == "CPU":
        count = f"{n:g} more CPU in all" if more else f"at least {n:g} CPU"
        return (f"fix: restart {where} with `ray start --num-cpus=N` so Ray offers {count} (each engine and each "
                f"trainer rank holds 1 CPU), {smaller}")
    if where == "the driver":
        return f"fix: start the run on a node with {n:g} {key} (the driver's node is node 0), {smaller}"
    count = f"{n:g} more {key} in all" if more else f"{n:g} {key} on {where}"
    return f"fix: add nodes (`ray start --address=<head-ip>:<port>` on each) to get {count}, {smaller}"


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


# -- actors whose node dies ------------------------------------------------------------------------

def guard_parent(interval_s: float = 0.5) -> None:
    """Called in every actor of the run: once this process's parent (the raylet of its node, which started it)
    is gone, SIGKILL this process's children and then itself. A raylet that dies takes its node out of the
    cluster, but the actor processes it started would keep running, serving calls made before, and `ray.kill`
    from the driver cannot reach them any more; this makes them die with their raylet (Linux: /proc)."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def children() -> list[int]:
        out = []
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children") as f:
                    out += [int(p) for p in f.read().split()]
            except OSError:
                pass
        return out

    def watch():
        while os.getppid() == parent:
            time.sleep(interval_s)
        for pid in children():   # e.g. an engine's own processes
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="torchspec-raylet-guard", daemon=True).start()


class NodeWatch:
    """Which Ray nodes among those the run's actors live on are dead, from Ray's node table (`ray.nodes()`),
    asked at most every `every_s` seconds (GCS declares a node dead once its raylet misses health checks)."""

    def __init__(self, every_s: float = 2.0):
        self.every_s, self.last = every_s, 0.0

    def dead(self, node_ids, force: bool = False) -> dict[str, str]:
        """node id -> its IP, for each of `node_ids` that Ray reports dead (or no longer knows)."""
        import time

        import ray

        now = time.monotonic()
        if not force and now - self.last < self.every_s:
            return {}
        self.last = now
        table = {n["NodeID"]: n for n in ray.nodes()}
        return {n: table[n]["NodeManagerAddress"] if n in table else "unknown IP" for n in dict.fromkeys(node_ids)
                if n not in table or not table[n].get("Alive", True)}


def dead_node_text(node: str, ip: str, what: list[str]) -> str:
    """One line: the dead node, its IP and the run's actors on it."""
    return f"Ray node {node[:8]} ({ip}) is dead; on it: {', '.join(what)}"


# -- connecting to Ray -----------------------------------------------------------------------------

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
    quiet = ray_init_quiet(cfg)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**quiet)
        where = f"joined the cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
    else:
        ray.init(address="local", include_dashboard=False, num_gpus=torch.cuda.device_count(), **quiet)
        _started_ray = True
        where = "started a Ray of this machine alone (RAY_ADDRESS unset)"
    nodes = [n for n in ray.nodes() if n.get("Alive", True)]
    log.info("Ray: %s: %d node(s), %s", where, len(nodes), {k: v for k, v in sorted(ray.cluster_resources().items())
                                                              if k in ("CPU", "GPU")})


def ray_init_quiet(cfg) -> dict:
    """ray.init's log settings: Ray's own INFO lines (connecting, dashboard, usage notes) only with
    logging.log_level=debug; the actors' output still reaches the driver (their errors matter)."""
    return {"logging_level": logging.DEBUG if cfg.logging.log_level == "debug" else logging.WARNING}


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
