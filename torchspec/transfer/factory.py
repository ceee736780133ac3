"""`build_store(cfg)`: the hidden-state store that `inference.store` selects.

auto -> `local` (shared memory on this node) unless the run spans several nodes, then `mooncake`.
`inference.store_capacity` bounds either store's bytes (null = no bound beyond the pool size / the
Mooncake segment).
"""

from __future__ import annotations

import logging

from torchspec.config.errors import ConfigError
from torchspec.transfer.base import Store

log = logging.getLogger("torchspec.transfer")


def store_type(cfg) -> str:
    """'local' or 'mooncake' for this config."""
    from torchspec.config.schema import STORE_TYPES

    kind = cfg.inference.store
    if kind not in STORE_TYPES:
        raise ConfigError(f"inference.store={kind!r}: expected one of {', '.join(STORE_TYPES)}")
    if kind != "auto":
        return kind
    from torchspec.pipeline.launcher import multi_node_reason

    reason = multi_node_reason(cfg)
    if reason is None:
        return "local"
    log.info("%s: several nodes, so hidden states go through the mooncake store (inference.store=auto)", reason)
    return "mooncake"


def build_store(cfg) -> Store:
    capacity = cfg.inference.store_capacity
    if store_type(cfg) == "local":
        from torchspec.transfer.local import LocalStore

        return LocalStore(capacity_bytes=capacity)
    from torchspec.pipeline.launcher import multi_node_reason
    from torchspec.transfer.mooncake import MooncakeSettings, MooncakeStore

    reason = multi_node_reason(cfg)
    if reason is not None and cfg.mooncake.master_server_address is None:
        raise ConfigError(f"mooncake.master_server_address is null, but {reason} spans several nodes: a master "
                          "torchspec starts listens on 127.0.0.1 only; start mooncake_master where every node can "
                          "reach it and set mooncake.master_server_address=host:port")
    return MooncakeStore(MooncakeSettings.from_config(cfg.mooncake), capacity_bytes=capacity)
