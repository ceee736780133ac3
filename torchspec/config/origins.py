"""Where each value of a loaded config came from (a file, the command line), so checks can name it."""

from __future__ import annotations

from typing import Optional

from torchspec.config.schema import Config


def origin_of(cfg: Config, key: str) -> Optional[str]:
    """The file (or "command line") that last set dotted `key`, or None for a schema default."""
    return getattr(cfg, "_origins", {}).get(key)


def set_origins(cfg: Config, origins: dict[str, str]) -> None:
    object.__setattr__(cfg, "_origins", dict(origins))
