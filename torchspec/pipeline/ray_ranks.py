"""Trainer ranks as Ray actors: `start_ray_trainer_ranks` -> `ranks.TrainerRanks` over `RayPeers`, in the
trainer placement group of `ray_placement.plan_ray` (one bundle per training node, bundle 0 pinned to
the driver's node). Rank 0 runs in the driver process (controller, logging, checkpoints) on bundle 0's
first slot; ranks 1.. are Ray actors, rank r in bundle r // per_node.
On GPUs rank 0's GPU is held by a small lease actor that reports which one Ray gave it, so Ray never
hands a trainer GPU to an engine. The ranks meet through a TCP store on the driver's node IP
(`tcp://<ip>:<free port>`): gloo on CPU, nccl on GPU. The rank protocol is `ranks.py`'s, shared
with the local launcher.
"""

from __future__ import annotations

import logging
import os

from torchspec.pipeline.failures import WorkerFailure, ray_death_text, store_lost
from torchspec.pipeline.launcher_local import PlacementError
from torchspec.pipeline.ray_placement import (NodeWatch, RayPlacement, _hold, check_local_store, dead_node_text,
                                              guard_parent)
from torchspec.transfer.base import StoreUnavailable
from torchspec.utils.net import free_port

log = logging.getLogger("torchspec.pipeline")


# -- trainer ranks ----------------------------------------------------------------------------------

class _TrainerRankActor:
    """Trainer rank r >= 1 inside a Ray actor (a `RankWorker` once started). On GPUs rank 0's slot gets
    one too, never started: it holds rank 0's GPU and tells the driver which one Ray gave it."""

    def __init__(self):
        guard_parent()   # dies with its node's raylet (ray.kill cannot reach a dead node)
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
        self.node_watch = NodeWatch()
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

    def _failure(self, rank: int, e) -> Exception:
        ray = self._ray
        lost = store_lost(e)
        if lost is not None:
            return StoreUnavailable(f"trainer rank {rank}: {lost}")
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
        dead = self.node_watch.dead(self.nodes[1:])
        if dead:
            node, ip = next(iter(dead.items()))
            raise WorkerFailure(dead_node_text(node, ip, [f"trainer rank {r} (pid {self.pids.get(r, '?')})"
                                                          for r in range(1, len(self.nodes)) if self.nodes[r] == node]))

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
