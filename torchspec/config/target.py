"""Facts about the target, derived once: `TargetInfo`, and the rules it applies.

The one home of:
  * `text_config_of`: which part of a target config describes the language model (a vision-language
    checkpoint keeps it under `text_config`);
  * the aux-layer rule: the default ids for an L-layer target (`default_aux_layers`), their check
    (`check_aux_layers`), and the conversion to vLLM's numbering (`to_vllm_layer_ids`);
  * the draft-vocab precedence (`resolve_draft_vocab_size`).

It lives under torchspec.config (not torchspec.models) because the config layer needs these rules too
(validation, the dry-run plan) and may not import the layers above it. Importing it is cheap: standard
library only; transformers is imported inside `TargetInfo.from_pretrained`.

Aux-layer ids. Ours (= SGLang's): id k is the OUTPUT of decoder layer k (0-based), i.e. transformers
`hidden_states[k + 1]`. vLLM counts the state ENTERING layer k: ours + 1.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torchspec.config.errors import ConfigError

AUX_LAYERS_KEY = "inference.aux_hidden_states_layers"


class TargetLoadError(ConfigError):
    """model.target_model_path cannot be loaded (user-caused: one line naming the key)."""


# ---------------------------------------------------------------- the language model's config


def text_config_of(config):
    """The language model's part of a target config: a transformers config object (its
    `get_text_config()`, else its `text_config` attribute) or a config.json dict (its "text_config"
    entry); the config itself when it has none (a plain causal LM). The one unwrap rule."""
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get("text_config") or config
    if hasattr(config, "get_text_config"):
        return config.get_text_config()
    return getattr(config, "text_config", None) or config


def _get(config, key: str):
    return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)


# ---------------------------------------------------------------- aux layers


DEFAULT_NUM_AUX_LAYERS = 3   # default_aux_layers always picks three ids


def default_aux_layers(num_layers: int) -> list[int]:
    """Default aux-layer ids for an L-layer target: [1, L//2 - 1, L - 4].

    Servers collect aux states once per distinct id in ascending order (vLLM does), so the ids must
    be distinct and ascending. For small targets (L < 8, where the formula repeats or goes out of
    order) the three ids are spread evenly instead: [0, L//2 - 1, L - 2] when distinct, else [0, 1, 2].
    """
    if num_layers < 3:
        raise ValueError(f"default aux layers need a target with at least 3 layers, got {num_layers}; "
                         f"set {AUX_LAYERS_KEY} explicitly")
    for ids in ([1, num_layers // 2 - 1, num_layers - 4], [0, num_layers // 2 - 1, num_layers - 2], [0, 1, 2]):
        if ids[0] < ids[1] < ids[2]:
            return ids
    raise AssertionError("unreachable: [0, 1, 2] is ascending")


def aux_layers_problem(layers, num_layers: Optional[int] = None) -> Optional[str]:
    """What is wrong with these aux-layer ids (None when nothing is): they must be 3 distinct,
    ascending decoder-layer ids (of this target, when its layer count is known)."""
    try:
        ids = [int(k) for k in layers]
    except (TypeError, ValueError):
        return "need 3 integer aux layer ids (id k = output of decoder layer k)"
    top = num_layers if num_layers is not None else float("inf")
    if len(ids) != 3 or not 0 <= ids[0] < ids[1] < ids[2] < top:
        where = (f" in [0, {num_layers - 1}] for this {num_layers}-layer target" if num_layers is not None else "")
        return (f"need 3 distinct, ascending aux layer ids{where} (id k = output of decoder layer k); "
                "servers gather aux states in ascending layer order, so any other order would not match at "
                "serving time")
    return None


def check_aux_layers(layers, num_layers: Optional[int] = None, key: str = AUX_LAYERS_KEY) -> list[int]:
    """Validate aux-layer ids (see `aux_layers_problem`); the ids as ints. Raises ValueError naming `key`."""
    problem = aux_layers_problem(layers, num_layers)
    if problem:
        try:
            shown = [int(k) for k in layers]
        except (TypeError, ValueError):
            shown = list(layers)
        raise ValueError(f"{key}={shown}: {problem}")
    return [int(k) for k in layers]


def resolve_aux_layers(layers, num_layers: int, key: str = AUX_LAYERS_KEY) -> list[int]:
    """The configured aux-layer ids (checked against the target's layer count), else the default."""
    if layers is None:
        return list(default_aux_layers(num_layers))
    return check_aux_layers(layers, num_layers, key=key)


def to_vllm_layer_ids(aux_layers) -> list[int]:
    """Our aux id k (output of decoder layer k) -> vLLM's id k + 1 (the state entering layer k + 1): the one
    conversion at the vLLM boundary (the vllm engine, the export's `eagle_aux_hidden_state_layer_ids`)."""
    return [int(k) + 1 for k in aux_layers]


# ---------------------------------------------------------------- draft vocabulary


def resolve_draft_vocab_size(configured: Optional[int], draft_config_value: Optional[int], vocab_size: int) -> int:
    """The draft's vocabulary size: training.draft_vocab_size when set, else the draft config's
    `draft_vocab_size` (when present and non-zero), else the full (target) vocabulary."""
    if configured is not None:
        return int(configured)
    return int(draft_config_value or vocab_size)


def _draft_config_vocab(path) -> Optional[int]:
    """`draft_vocab_size` of the model.draft_model_config JSON; None when it has none or no file is
    configured. An unreadable file is reported where it matters (validate_config, DraftConfig.from_json),
    not by readers of the target's facts (an engine needs none of the draft's)."""
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data.get("draft_vocab_size") if isinstance(data, Mapping) else None


# ---------------------------------------------------------------- TargetInfo

TARGET_KEYS = ("num_hidden_layers", "hidden_size", "vocab_size")   # what TargetInfo reads from the target's config


def _check_target_keys(path: Path) -> None:
    """A local text target's config.json must state TARGET_KEYS itself: transformers would fill a missing one
    with its config class's default (hidden_size 4096), a shape the checkpoint does not have, found only when
    the weights are read. A file that does not parse is left to AutoConfig's message."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(raw, Mapping):
        return
    if text_config_of(raw) is not raw:
        return   # a multimodal config's text_config may leave sizes to its class's defaults (llava-1.5 does)
    for name in TARGET_KEYS:
        if raw.get(name) is None:
            raise TargetLoadError(f"model.target_model_path: {path}: missing '{name}'; a target's "
                                  "config.json states the language model's shape")


@dataclass(frozen=True)
class TargetInfo:
    """The target's facts, derived once from its config (a transformers config object or a config.json dict)."""

    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    aux_layers: tuple[int, ...]       # ours: id k = OUTPUT of decoder layer k
    draft_vocab_size: int             # training.draft_vocab_size, else the draft config's, else vocab_size
    text_config: Any = field(default=None, compare=False, repr=False)  # the language model's config
    config: Any = field(default=None, compare=False, repr=False)       # the whole target config, as given

    @property
    def vllm_aux_layers(self) -> tuple[int, ...]:
        """The aux ids in vLLM's numbering (the state entering layer k: ours + 1)."""
        return tuple(to_vllm_layer_ids(self.aux_layers))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_target_config(cls, config, aux_layers: Optional[Sequence[int]] = None, *,
                           draft_vocab_size: Optional[int] = None, draft_config_vocab: Optional[int] = None,
                           key: str = AUX_LAYERS_KEY) -> "TargetInfo":
        """From a transformers config object or a config.json dict. aux_layers: the configured ids
        (None = the default), checked against the target; draft_vocab_size: training.draft_vocab_size;
        draft_config_vocab: the draft config's draft_vocab_size."""
        text = text_config_of(config)
        values = {}
        for name in TARGET_KEYS:
            value = _get(text, name)
            if value is None:
                raise ConfigError(f"target config: missing '{name}' (of its language model's config)")
            values[name] = int(value)
        return cls(
            aux_layers=tuple(resolve_aux_layers(aux_layers, values["num_hidden_layers"], key=key)),
            draft_vocab_size=resolve_draft_vocab_size(draft_vocab_size, draft_config_vocab, values["vocab_size"]),
            text_config=text,
            config=config,
            **values,
        )

    @classmethod
    def from_dict(cls, config: Mapping, aux_layers: Optional[Sequence[int]] = None, **kw) -> "TargetInfo":
        """From a config.json dict (no transformers needed: the dry-run plan, tools)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"TargetInfo.from_dict needs a dict (a config.json), got {type(config).__name__}")
        return cls.from_target_config(config, aux_layers, **kw)

    @classmethod
    def from_pretrained(cls, path, aux_layers: Optional[Sequence[int]] = None, trust_remote_code: bool = False,
                        **kw) -> "TargetInfo":
        """Read the target's config with transformers' AutoConfig (a local dir or a hub id)."""
        from transformers import AutoConfig

        local = Path(str(path)).expanduser()
        if local.is_dir() and not (local / "config.json").is_file():
            raise TargetLoadError(f"model.target_model_path={path}: no config.json in {local} (a model dir holds "
                                  "config.json, the tokenizer files and the weights)")
        if local.is_dir():
            _check_target_keys(local / "config.json")
        try:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:  # user-caused: wrong path / id, or a model needing trust_remote_code
            first = str(e).splitlines()[0] if str(e) else ""
            raise TargetLoadError(f"model.target_model_path={path!r} has no readable model config: "
                                  f"{type(e).__name__}: {first}") from None
        return cls.from_target_config(config, aux_layers, **kw)

    @classmethod
    def from_config(cls, cfg) -> "TargetInfo":
        """From a run's Config: model.target_model_path (AutoConfig, model.trust_remote_code),
        inference.aux_hidden_states_layers, training.draft_vocab_size, model.draft_model_config."""
        return cls.from_pretrained(
            cfg.model.target_model_path, cfg.inference.aux_hidden_states_layers,
            trust_remote_code=bool(cfg.model.trust_remote_code),
            draft_vocab_size=cfg.training.draft_vocab_size,
            draft_config_vocab=_draft_config_vocab(cfg.model.draft_model_config))


__all__ = [
    "AUX_LAYERS_KEY", "TargetInfo", "TargetLoadError", "aux_layers_problem", "check_aux_layers",
    "default_aux_layers", "resolve_aux_layers", "resolve_draft_vocab_size", "text_config_of",
    "to_vllm_layer_ids",
]
