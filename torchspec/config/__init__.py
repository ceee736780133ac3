"""Configuration: schema (the only home of defaults), loading/merging, validation.

Importing this package does not import omegaconf; only `load_config` needs it.
"""

from torchspec.config.errors import ConfigError
from torchspec.config.schema import Config


def load_config(config_files, overrides=(), **kwargs) -> Config:
    """schema < configs/default.yaml < each file in order < CLI dotlist; validated."""
    from torchspec.config.loader import load_config as _load

    return _load(config_files, overrides, **kwargs)


__all__ = ["Config", "ConfigError", "load_config"]
