"""Load a run's configuration: schema < configs/default.yaml < each --config file < CLI dotlist.

Each layer is parsed with OmegaConf's YAML rules (so `1e-4` is a float and `a.b.c=v` works on
the command line), then merged key by key into the schema: unknown keys, wrong types and
missing values fail with one line naming the key and the file (or "command line") it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from torchspec.config.errors import ConfigError, FileError
from torchspec.config.origins import origin_of, set_origins  # noqa: F401  (origin_of re-exported)
from torchspec.config.schema import REQUIRED, Config

CLI = "command line"
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


# ---------------------------------------------------------------- public entry points


def load_config(
    config_files: Iterable[Union[str, os.PathLike]],
    overrides: Iterable[str] = (),
    *,
    default_file: Optional[Union[str, os.PathLike]] = DEFAULT_CONFIG_FILE,
    validate: bool = True,
) -> Config:
    """Build the run's `Config` from files and `key=value` overrides, then validate it.

    `default_file` (configs/default.yaml of this checkout) is merged first when it exists;
    pass None to start from the bare schema. The origin of every key set by a file or the CLI
    is kept on the result (see `origin_of`) so later checks can name it.
    """
    config_files = [Path(f) for f in config_files]
    data = _schema_defaults()
    origins: dict[str, str] = {}
    layers = []
    if default_file is not None and Path(default_file).is_file():
        layers.append(Path(default_file))
    layers.extend(config_files)
    for path in layers:
        raw = _read_yaml_file(path)
        _merge(data, raw, Config, "", str(path), path.resolve().parent, origins)
    cli = _parse_dotlist(list(overrides))
    _merge(data, cli, Config, "", CLI, Path.cwd(), origins)

    _derive_paths(data, config_files)
    data = _resolve_interpolations(data)
    _check_required(data, Config, "", origins)
    cfg = _build(Config, data)
    set_origins(cfg, origins)
    if validate:
        from torchspec.config.validate import validate_config

        validate_config(cfg)
    return cfg


def parse_size(value: Any, key: str = "size", source: str = CLI) -> int:
    """Bytes from an int or a string like "16GB", "512 MiB", "2g", "1024" (binary units)."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size like 16GB, got {_shown(key, value)!r} ({source})")
    if isinstance(value, int):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise ConfigError(
                f"{key}: expected a size like 16GB, 512MB or a byte count, got {_shown(key, value)!r} ({source})"
            )
        power = "bkmgt".index(m.group(2).lower() or "b")  # "" -> bytes, "k" -> 1024, ...
        n = int(float(m.group(1)) * 1024**power)
    if n < 0:
        raise ConfigError(f"{key}: a size must not be negative, got {_shown(key, value)!r} ({source})")
    return n


# ---------------------------------------------------------------- parsing


def _omegaconf():
    """OmegaConf when installed; None on machines without it (plain PyYAML is used instead)."""
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return None
    return OmegaConf


def _read_yaml_file(path: Path) -> dict:
    import yaml

    if path.is_dir():
        raise FileError(f"--config {path}: is a directory; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    oc = _omegaconf()
    try:
        if oc is not None:
            raw = oc.to_container(oc.load(path), resolve=False)
        else:
            raw = yaml.safe_load(path.read_text())
    except UnicodeDecodeError as e:   # a binary file (weights, an archive) given as the config
        raise FileError(f"--config {path}: not a YAML text file (byte {e.object[e.start]:#04x} at offset {e.start} "
                        "is not UTF-8 text)") from None
    except OSError as e:
        raise FileError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        started = ""
        if e.context and e.context_mark and (not mark or e.context_mark.line != mark.line):
            started = f" ({e.context} started at line {e.context_mark.line + 1})"
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}{started}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {str(e).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got a {type(raw).__name__}")
    return raw


def _parse_dotlist(items: list[str]) -> dict:
    for item in items:
        key = item.split("=", 1)[0]
        if "=" not in item or not key or not re.fullmatch(r"[A-Za-z_][\w.\-]*", key):
            raise ConfigError(f"command line: override {item!r} is not of the form section.key=value")
    oc = _omegaconf()
    try:
        if oc is not None:
            return oc.to_container(oc.from_dotlist(items), resolve=False) or {}
        return _plain_dotlist(items)
    except Exception as e:  # yaml parse errors of a value
        raise ConfigError(f"command line: cannot parse overrides: {str(e).splitlines()[0]}") from None


def _plain_dotlist(items: list[str]) -> dict:
    """OmegaConf's dotlist rules for the common cases: a.b.c=<YAML value>, empty = null."""
    import yaml

    out: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if value != "" else None
    return out


def _resolve_interpolations(data: dict) -> dict:
    """`${output_dir}/x`-style references, resolved once everything is merged."""
    if "${" not in repr(data):
        return data
    oc = _omegaconf()
    if oc is None:
        raise ConfigError("the config uses ${...} interpolation, which needs omegaconf: pip install omegaconf")
    try:
        return oc.to_container(oc.create(data), resolve=True)
    except Exception as e:
        raise ConfigError(f"cannot resolve interpolation: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------- schema introspection


@lru_cache(maxsize=None)
def _fields(cls) -> dict[str, tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def _schema_defaults() -> dict:
    return dataclasses.asdict(Config())


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key the schema knows (free-form mappings count as one key)."""
    out = []
    for name, (tp, f) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out.extend(all_keys(tp, f"{prefix}{name}."))
        else:
            out.append(f"{prefix}{name}")
    return out


def _did_you_mean(name: str, prefix: str, siblings: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{prefix}{close[0]}'?"
    # The same name under another section (e.g. training.tp_size -> inference.sglang.tp_size).
    elsewhere = [k for k in all_keys() if k.rsplit(".", 1)[-1] == name]
    if not elsewhere:
        leaves = {k.rsplit(".", 1)[-1]: k for k in all_keys()}
        near = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.8)
        elsewhere = [leaves[n] for n in near]
    return f"; did you mean '{elsewhere[0]}'?" if elsewhere else ""


# ---------------------------------------------------------------- merging


def _merge(data: dict, raw: dict, cls, prefix: str, source: str, base: Path, origins: dict) -> None:
    fields = _fields(cls)
    for name, value in raw.items():
        key = f"{prefix}{name}"
        if name not in fields:
            where = "section" if isinstance(value, dict) else "key"
            raise ConfigError(
                f"unknown {where} '{key}' ({source}){_did_you_mean(str(name), prefix, fields)}"
            )
        tp, f = fields[name]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue  # an empty section in YAML ("debug:") sets nothing
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' is a section; expected a mapping, got {_shown(key, value)!r} "
                                  f"({source})")
            _merge(data[name], value, tp, f"{key}.", source, base, origins)
            continue
        if f.metadata.get("free"):
            if value is None and typing.get_origin(tp) is not Union:
                data[name] = {}  # "extra_args: null" clears it; the field itself is never None
            else:
                data[name] = _merge_free(data.get(name), value, key, source)
        else:
            data[name] = _coerce(value, tp, f, key, source, base)
        origins[key] = source
        if isinstance(value, dict) and f.metadata.get("free"):
            for sub in value:
                origins[f"{key}.{sub}"] = source


def _merge_free(old: Any, new: Any, key: str, source: str) -> Any:
    if new is None:
        return None
    if not isinstance(new, dict):
        raise ConfigError(f"{key}: expected a mapping, got {new!r} ({source})")
    merged = dict(old or {})
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge_free(merged[k], v, f"{key}.{k}", source)
        else:
            merged[k] = v
    return merged


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(value: Any, tp: Any, f: dataclasses.Field, key: str, source: str, base: Path) -> Any:
    if isinstance(value, str) and value == REQUIRED:
        return value
    if isinstance(value, str) and "${" in value:
        return value  # interpolation: resolved after merging
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = origin is Union and type(None) in args
    if optional:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    elif value is None:
        raise ConfigError(f"{key}: must be set, got null ({source})")

    if f.metadata.get("size"):
        return parse_size(value, key, source)
    if f.metadata.get("path"):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path (string), got {_shown(key, value)!r} ({source})")
        return _resolve_path(value, base, f.metadata["path"] == "hub_or_local")

    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_shown(key, value)!r} ({source})")
        (item_tp,) = args or (Any,)
        return [_coerce_scalar(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_shown(key, value)!r} ({source})")
        return value
    return _coerce_scalar(value, tp, key, source)


def _shown(key: str, value: Any) -> Any:
    """`value` as an error message shows it: a secret key's (logging.wandb_key) redacted by config.render.redact."""
    from torchspec.config.render import redact

    name = key.split("[", 1)[0].rsplit(".", 1)[-1]
    return redact({name: value})[name]


def _coerce_scalar(value: Any, tp: Any, key: str, source: str) -> Any:
    if tp is Any:
        return value
    bad = ConfigError(f"{key}: expected {_TYPE_NAMES.get(tp, tp)}, got {_shown(key, value)!r} ({source})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    return value


def _resolve_path(value: str, base: Path, may_be_hub_id: bool) -> str:
    if value == "":
        return value
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    candidate = os.path.normpath(os.path.join(base, expanded))
    if not may_be_hub_id or value.startswith(("./", "../", "~")) or os.path.exists(candidate):
        return candidate
    return value  # e.g. "Qwen/Qwen3-8B": a hub id, left as written


# ---------------------------------------------------------------- after merging


def _check_required(data: dict, cls, prefix: str, origins: dict) -> None:
    for name, (tp, _f) in _fields(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            _check_required(data[name], tp, f"{key}.", origins)
        elif data[name] == REQUIRED:
            src = origins.get(key)
            hint = f" (left as ??? in {src})" if src else ""
            raise ConfigError(
                f"missing required value '{key}'{hint}: set it in your config file or on the "
                f"command line as {key}=..."
            )


def _derive_paths(data: dict, config_files: list[Path]) -> None:
    if data["output_dir"] is None:
        name = config_files[-1].stem if config_files else "default"
        data["output_dir"] = os.path.abspath(os.path.join("outputs", name))
    if data["cache_dir"] is None:
        data["cache_dir"] = os.path.join(data["output_dir"], "cache")


def _build(cls, data: dict):
    kwargs = {}
    for name, (tp, _f) in _fields(cls).items():
        kwargs[name] = _build(tp, data[name]) if dataclasses.is_dataclass(tp) else data[name]
    return cls(**kwargs)
