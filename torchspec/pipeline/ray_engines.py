"""Inference engines as Ray actors: `start_ray_engines` -> `RayEngines`, the controller's EngineGroup.
`inference_num_gpus / gpus_per_engine` engine replicas, each one Ray actor wrapping the same engine class
the local launcher uses (`build_engine`: hf today, sglang/vllm the same way), reserved by its own
placement group (`ray_placement.plan_ray`); an engine of one node runs in bundle 0.

An engine spanning N nodes (only sgl) is N actors, actor r in bundle r on its own node: each builds
`sglang.build_node_engine(cfg, r, dist_init_addr)`, all with the same "ip:port" picked on bundle 0's node
before any starts: node r's TP rank processes of SGLang's ModelRunner, meeting there (see
torchspec/inference/sglang.py, Engines spanning nodes). Every submission goes to all N actors (every rank's
forward joins the collectives); node 0's answer carries the records, the others' (empty) are only watched:
a node's failure, at start or mid-run, is one line naming the engine and the node.
"""

from __future__ import annotations

import functools
import logging
import os
import time

import torch

from torchspec.inference.base import StoredSample
from torchspec.inference.deferred import tokenizing_factory
from torchspec.inference.engine_metrics import MetricsPoll
from torchspec.pipeline.failures import WorkerFailure, ray_death_text, store_lost
from torchspec.pipeline.launcher_local import PlacementError
from torchspec.pipeline.ray_placement import (NodeWatch, RayPlacement, _hold, check_local_store, dead_node_text,
                                              guard_parent)
from torchspec.pipeline.wire import from_wire, to_wire
from torchspec.transfer.base import StoreUnavailable
from torchspec.utils.net import free_port

log = logging.getLogger("torchspec.pipeline")

NODE_SETTLE_S = 10.0   # node 0's share failed: how long its other nodes' shares may take to show a failure of theirs


# -- the engine actor -------------------------------------------------------------------------------

class _EngineActor:
    """One engine inside a Ray actor: built once, then `generate` per submission (in order)."""

    def __init__(self, engine_factory, store, num_threads: int):
        import ray

        from torchspec.config.errors import ConfigError

        guard_parent()   # dies with its node's raylet (ray.kill cannot reach a dead node)
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
            self.poll = MetricsPoll(self.engine)
        except ConfigError as e:   # user-caused (e.g. model.target_model_path): one line for the driver
            self.config_error = str(e)

    def ready(self) -> dict:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "gpu_ids": self.gpu_ids,
                "config_error": self.config_error}

    def generate(self, items) -> tuple[list[StoredSample], float, dict | None]:
        """(stored records, seconds, the engine's metrics when due, else None)."""
        t0 = time.monotonic()
        stored = self.engine.generate(from_wire(items))
        return stored, time.monotonic() - t0, self.poll.due()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _free_address(port: int | None = None) -> tuple[str, bool]:
    """("ip:port", in use) on the node this runs on (a Ray task in an engine's bundle 0): a free port, or `port`
    (from inference.sglang.port's block) and whether it is in use there."""
    import ray

    from torchspec.utils.net import taken_ports

    ip = ray.util.get_node_ip_address()
    taken = port is not None and bool(taken_ports([port], ip))
    return f"{f'[{ip}]' if ':' in ip else ip}:{free_port(ip) if port is None else port}", taken


def dist_init_port(cfg) -> int | None:
    """The dist_init_addr port of an engine spanning nodes: from inference.sglang.port's block (its third port,
    inference/sglang.py PORT_NAMES) when that is set, else None (a free one)."""
    from torchspec.config.topology import sglang_ports_needed
    from torchspec.inference.sglang import port_block

    if cfg.inference.sglang.port is None or sglang_ports_needed(cfg) < 3:
        return None
    return port_block(cfg, 0)[2]


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

    tokenizes = False   # as launcher_local.InlineEngines.tokenizes

    def __init__(self, engine_factory, store, placement: RayPlacement, num_threads: int = 1,
                 start_timeout: float = 600.0, pg_timeout: float = 120.0, node_factory=None, timeout_key: str = "",
                 dist_port: int | None = None,
                 record_tokenizer=None):
        import ray
        from ray.util.placement_group import placement_group, placement_group_table
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self.num_workers = placement.num_engines
        self.busy_s = 0.0   # seconds spent generating, over all workers
        self.latest_metrics: dict[int, dict[str, float]] = {}   # each engine's last metrics (engine_metrics.py)
        self.pending: dict = {}        # ObjectRef -> worker
        self.actors: list = []
        self.pgs: list = []
        self._closed = False
        self.hold = None   # a Ray this launcher started, released on close
        self.nodes: list[str] = []   # the node id of each engine actor
        self.node_actors: list = []  # (engine, node r >= 1, actor) of engines spanning nodes
        self.node_pending: dict = {}  # ObjectRef of a node r >= 1's share of a submission -> (worker, r)
        self.actor_nodes: dict = {}   # (engine, node r) -> the Ray node id its actor runs on
        self.n_nodes = len(placement.bundles)
        self.node_watch = NodeWatch()
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
                    addr, taken = ray.get(ray.remote(_free_address).options(
                        num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0)).remote(dist_port),
                        timeout=pg_timeout)
                    if taken:
                        from torchspec.config.errors import ConfigError

                        raise ConfigError(f"inference.sglang.port: port {dist_port} (the dist_init_addr port of "
                                          f"inference engine {w}, the third of its block) is in use on its node 0 "
                                          f"({addr}); choose another inference.sglang.port, or null for free ports")
                    factories = [node_factory(r, addr) for r in range(n_nodes)]
                # every node's actor tokenizes deferred records (dataset.defer_tokenization): each runs the batch
                factories = [tokenizing_factory(f, record_tokenizer) for f in factories]
                for r, factory in enumerate(factories):
                    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
                    actor = actor_cls.options(scheduling_strategy=strategy, max_restarts=0,
                                              **resources).remote(factory, store, num_threads)
                    if r:
                        self.node_actors.append((w, r, actor))
                    else:
                        self.actors.append(actor)
            self._store = store
            ready = self._await_ready(start_timeout, n_nodes, timeout_key)
            self._check_ready(ready, store)
            self.pids = [r["pid"] for r in ready]
            self.tokenizes = record_tokenizer is not None
        except BaseException:
            self.close()
            raise

    def _await_ready(self, timeout: float, n_nodes: int, timeout_key: str = "") -> list[dict]:
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
                                   f"({timeout_key + '; ' if timeout_key else ''}loading the target?)")
            w, r = refs[done[0]]
            try:
                results[(w, r)] = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                if not r and n_nodes == 1:
                    raise RuntimeError(f"an inference engine actor failed to start:\n{e}") from None
                raise RuntimeError(f"inference engine {w}: its node {r} of {n_nodes} (sgl node_rank {r}) failed to "
                                   f"start: {_cause(e)}") from None
        check_local_store(self._store, "an inference engine actor", [i["node"] for i in results.values()])
        self.actor_nodes = {key: info["node"] for key, info in results.items()}
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
        """The batch to the engine's node-0 actor (its records come back) and, for an engine spanning nodes, to
        every other node's actor too: each node's TP ranks must run the same forward (its collectives span
        the nodes); those put nothing and are only watched for failure."""
        wire = to_wire(samples)
        self.pending[self.actors[worker].generate.remote(wire)] = worker
        for w, r, actor in self.node_actors:
            if w == worker:
                self.node_pending[actor.generate.remote(wire)] = (w, r)

    def _node_failure(self, ref, e) -> WorkerFailure:
        """One line for node r >= 1's failed share of a submission (its actor died, or its engine raised)."""
        w, r = self.node_pending.pop(ref)
        return WorkerFailure(f"inference engine {w}: its node {r} of {self.n_nodes} (sgl node_rank {r}) failed: "
                             f"{_cause(e)}")

    def _check_node_shares(self, refs, settle: float = 0.0) -> None:
        """Drop the finished node shares among `refs`; raise the first that failed (after waiting up to `settle` s
        for them: when node 0 fails because a remote rank broke the collective, the remote failure is the cause)."""
        ray = self._ray
        refs = [ref for ref in refs if ref in self.node_pending]
        if settle > 0 and refs:
            refs, _ = ray.wait(refs, num_returns=len(refs), timeout=settle)
        for ref in refs:
            try:
                ray.get(ref, timeout=0)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                failure = self._node_failure(ref, e)
                self.close()
                raise failure from None
            except ray.exceptions.GetTimeoutError:
                continue
            self.node_pending.pop(ref, None)

    def wait(self, timeout: float) -> list[tuple[int, list[StoredSample]]]:
        ray = self._ray
        if not self.pending:
            return []
        refs = list(self.pending)
        watch = refs + list(self.node_pending)
        done, _ = ray.wait(watch, num_returns=1, timeout=max(timeout, 0.0))
        if not done:
            self._check_nodes()
        if done:   # then everything else already finished, without waiting
            done, _ = ray.wait(watch, num_returns=len(watch), timeout=0)
        self._check_node_shares(done)
        finished = set(done)
        out = []
        for ref in (r for r in refs if r in finished):   # in submission order
            worker = self.pending.pop(ref)
            try:
                try:
                    stored, seconds, metrics = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError):
                    # a remote node's failure is the cause when it broke node 0's collectives: named first
                    self._check_node_shares(list(self.node_pending), settle=NODE_SETTLE_S)
                    raise
            except ray.exceptions.RayActorError as e:
                node = self.nodes[worker] if worker < len(self.nodes) else "?"
                self.close()
                raise WorkerFailure(f"inference engine {worker} (Ray actor, pid {self.pids[worker]}, node {node[:8]}) "
                                    f"died: {ray_death_text(e)}") from None
            except ray.exceptions.RayTaskError as e:
                self.close()
                lost = store_lost(e)
                if lost is not None:
                    raise StoreUnavailable(f"inference engine {worker}: {lost}") from None
                raise WorkerFailure(f"inference engine {worker} (Ray actor) failed:\n{e}") from None
            self.busy_s += seconds
            if metrics is not None:
                self.latest_metrics[worker] = metrics
            out.append((worker, stored))
        return out

    def metrics(self) -> dict[int, dict[str, float]]:
        """{engine: its metrics as last sent with a result (read at most every METRICS_INTERVAL_S)}."""
        return dict(self.latest_metrics)

    def _check_nodes(self) -> None:
        """Raise a WorkerFailure naming the node and its engines when Ray reports an engine's node dead."""
        dead = self.node_watch.dead(list(dict.fromkeys([*self.nodes, *self.actor_nodes.values()])))
        if dead:
            node, ip = next(iter(dead.items()))
            on_it = [f"inference engine {w} (pid {self.pids[w]})" for w, n in enumerate(self.nodes) if n == node]
            on_it += [f"inference engine {w}'s node {r} of {self.n_nodes}" for (w, r), n in self.actor_nodes.items()
                      if r and n == node]
            self.close()
            raise WorkerFailure(dead_node_text(node, ip, on_it))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ray = self._ray
        self.pending.clear()
        self.node_pending.clear()
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


def sgl_node_factory(cfg, placement: RayPlacement):
    """For engines spanning nodes (sgl, `inference.sglang.nnodes > 1`): node_factory(node_rank, address) ->
    the engine factory of that node's actor; None for engines of one node."""
    if len(placement.bundles) <= 1:
        return None
    from torchspec.inference.sglang import build_node_engine

    # null: an address picked on the engine's node 0 (a given one serves one engine only: config validation)
    given = cfg.inference.sglang.dist_init_addr

    def node_factory(node_rank: int, dist_init_addr: str):
        return functools.partial(build_node_engine, cfg, node_rank, given or dist_init_addr)
    return node_factory


def start_ray_engines(cfg, store, placement: RayPlacement, engine_factory=None, record_tokenizer=None) -> RayEngines:
    """The EngineGroup for a Ray placement. engine_factory(store, device) -> Engine; default: the config's.
    record_tokenizer: the actors tokenize deferred records (launcher_local.start_engines)."""
    from torchspec.inference.factory import build_engine, engine_start_timeout

    hold = _hold(cfg)
    factory = engine_factory or functools.partial(build_engine, cfg)
    node_factory = sgl_node_factory(cfg, placement) if engine_factory is None else None
    timeout, key = engine_start_timeout(cfg)
    try:
        engines = RayEngines(factory, store, placement, node_factory=node_factory, start_timeout=timeout,
                             timeout_key=key, record_tokenizer=record_tokenizer,
                             dist_port=dist_init_port(cfg) if node_factory is not None else None)
    except BaseException:
        if hold is not None:
            hold.release()
        raise
    engines.hold = hold
    return engines
