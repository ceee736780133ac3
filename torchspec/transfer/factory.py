"""`build_store(cfg)`: the hidden-state store that `inference.store` selects.

auto -> `memory` (records stay on the device, in the process) when the engine runs inside the trainer
process (inference.colocate), else `local` (shared memory on this node) unless the run spans several
nodes, then `mooncake`.
`inference.store_capacity` bounds the store's bytes; null = a share of the free space measured at start
(`capacity.store_budget`; for mooncake, its segment bounds it).
"""

from __future__ import annotations

import logging

from torchspec.config.errors import ConfigError
from torchspec.transfer.base import Store

log = logging.getLogger("torchspec.transfer")


def store_type(cfg) -> str:
    """'memory', 'local' or 'mooncake' for this config."""
    from torchspec.config.schema import STORE_TYPES

    kind = cfg.inference.store
    if kind not in STORE_TYPES:
        raise ConfigError(f"inference.store={kind!r}: expected one of {', '.join(STORE_TYPES)}")
    if kind == "memory" and not cfg.inference.colocate:
        raise ConfigError("inference.store=memory keeps records inside the trainer process: it needs "
                          "inference.colocate=true (or use inference.store=auto)")
    from torchspec.config.topology import multi_node_reason, resolved_store

    resolved = resolved_store(cfg)
    if kind == "auto" and resolved == "mooncake":
        log.info("%s: several nodes, so hidden states go through the mooncake store (inference.store=auto)",
                 multi_node_reason(cfg))
    return resolved


def check_store(cfg) -> str:
    """The store type, after the checks a start makes before building it (no side effect, no network):
    a run over several nodes needs a Mooncake master every node can reach."""
    kind = store_type(cfg)
    if kind != "mooncake":
        return kind
    from torchspec.config.topology import multi_node_reason

    reason = multi_node_reason(cfg)
    if reason is not None and cfg.mooncake.master_server_address is None:
        raise ConfigError(f"mooncake.master_server_address is null, but {reason} spans several nodes: a master "
                          "torchspec starts listens on 127.0.0.1 only; start mooncake_master where every node can "
                          "reach it and set mooncake.master_server_address=host:port")
    return kind


def build_store(cfg, budget=None) -> Store:
    """The store, bounded by `budget` (a `capacity.StoreBudget`; None: `store_budget` measured now)."""
    kind = check_store(cfg)
    if budget is None:
        import torch

        from torchspec.transfer.capacity import store_budget

        budget = store_budget(cfg, kind, "cuda" if kind == "memory" and torch.cuda.is_available() else None)
    capacity = budget.capacity
    if kind == "memory":
        from torchspec.transfer.memory import MemoryStore

        return MemoryStore(capacity_bytes=capacity)
    if kind == "local":
        from torchspec.transfer.local import LocalStore

        return LocalStore(capacity_bytes=capacity)
    from torchspec.transfer.mooncake import MooncakeSettings, MooncakeStore

    settings = MooncakeSettings.from_config(cfg.mooncake, verbose=cfg.logging.log_level == "debug")
    return MooncakeStore(settings, capacity_bytes=capacity)
