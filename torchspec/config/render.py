"""Printing and saving a resolved config: secrets redacted, sizes written back as "16GB".

Needs PyYAML only (no omegaconf), so the training runner can call `save_resolved_config`
on any machine.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import typing
from pathlib import Path
from typing import Any

from torchspec.config.schema import SECRET_KEYS, Config

REDACTED = "***"
RESOLVED_CONFIG_NAME = "resolved_config.yaml"
# Free-form keys (extra_args) that look like credentials are redacted too.
_SECRET_WORDS = ("key", "token", "secret", "password")


def _is_secret(name: str) -> bool:
    return name in SECRET_KEYS


def _redact_free(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: (REDACTED if any(w in str(k).lower() for w in _SECRET_WORDS) and v is not None else _redact_free(v))
            for k, v in value.items()
        }
    return value


def redact(obj: Any) -> Any:
    """A copy of nested dicts / lists with every secret key's value replaced by REDACTED (the one redactor:
    printed and saved configs, W&B / TensorBoard run configs, command lines)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if k in SECRET_KEYS and v is not None else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line overrides of secret keys (`logging.wandb_key=...`) with their values replaced."""
    out = []
    for arg in argv:
        key, eq, _ = arg.partition("=")
        out.append(f"{key}={REDACTED}" if eq and key.rsplit(".", 1)[-1].lstrip("-") in SECRET_KEYS else arg)
    return out


def human_size(n: int) -> Any:
    """16 GiB -> "16GB" (binary units, as parse_size reads them); other values unchanged."""
    for unit, power in (("TB", 4), ("GB", 3), ("MB", 2), ("KB", 1)):
        if n and n % 1024**power == 0:
            return f"{n // 1024**power}{unit}"
    return n


def redacted_dict(obj: Any) -> dict:
    """The config as plain dicts, secrets replaced by "***" and sizes as "16GB" strings."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = redacted_dict(value)
        elif _is_secret(f.name) and value is not None:
            out[f.name] = REDACTED
        elif f.metadata.get("size") and isinstance(value, int):
            out[f.name] = human_size(value)
        elif f.metadata.get("free"):
            out[f.name] = _redact_free(value)
        else:
            out[f.name] = value
    return out


def config_to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(redacted_dict(cfg), sort_keys=False, default_flow_style=False, width=100)


def save_resolved_config(cfg: Config, output_dir: typing.Union[str, os.PathLike]) -> Path:
    """Write the resolved, redacted config to <output_dir>/resolved_config.yaml; returns the path.

    The file loads back with `--config` (its paths are absolute). A different one already there (the run
    this one resumes) is kept as resolved_config.<n>.yaml (n = 1, 2, ...: the order they were replaced in).
    """
    from torchspec.config.errors import FileError

    path = Path(output_dir) / RESOLVED_CONFIG_NAME
    text = config_to_yaml(cfg)
    tmp = path.with_suffix(".yaml.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        if path.is_file() and path.read_text() != text:
            n = 1
            while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
                n += 1
            shutil.copy2(path, kept)   # the previous one, before the new one replaces it
        os.replace(tmp, path)
    except OSError as e:   # the start checked output_dir; the disk filled or it changed since
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise FileError(f"output_dir={output_dir}: cannot write {path.name} ({e.strerror or e}); "
                        f"{path.name} there is as it was") from None
    return path
