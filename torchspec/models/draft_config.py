"""The draft's architecture config (`DraftConfig`: from a draft JSON, from the target's config, checked) and its
RoPE frequencies. The model itself is torchspec.models.draft."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from torchspec.config.errors import ConfigError
from torchspec.config.target import resolve_draft_vocab_size, text_config_of


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class DraftConfig:
    """Architecture of the draft (the draft_models/*.json fields). `None` never survives construction."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    num_hidden_layers: int = 1
    hidden_act: str = "silu"

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_json(cls, path) -> "DraftConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"model.draft_model_config: file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.draft_model_config: {path} is not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "draft config", strict_keys: bool = True) -> "DraftConfig":
        """Read an HF-style (LlamaConfig-like) dict; derive what may be derived, reject the rest.
        strict_keys: refuse near-misses of the keys read (a draft JSON a user wrote; not a target's config)."""
        if strict_keys:
            _check_key_typos(d, source)

        def need(key, kind=int):
            if d.get(key) is None:
                raise ConfigError(f"{source}: missing required key '{key}'")
            return _positive(_as(kind, key, d[key], source), key, source)

        def opt(key, default, kind=int, positive=True):
            if d.get(key) is None:
                return default
            value = _as(kind, key, d[key], source)
            return _positive(value, key, source) if positive else value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        vocab = need("vocab_size")
        layers = opt("num_hidden_layers", 1)
        if layers != 1:
            raise ConfigError(f"{source}: num_hidden_layers={layers}; only 1-layer EAGLE-3 drafts are supported")
        act = d.get("hidden_act") or "silu"
        if act != "silu":
            raise ConfigError(f"{source}: hidden_act='{act}'; only 'silu' is supported")
        theta, scaling = _read_rope(d, source)
        cfg = cls(
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_attention_heads=heads,
            num_key_value_heads=opt("num_key_value_heads", heads),
            head_dim=opt("head_dim", hidden // heads),
            rms_norm_eps=need("rms_norm_eps", float),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=need("max_position_embeddings"),
            vocab_size=vocab,
            draft_vocab_size=resolve_draft_vocab_size(None, opt("draft_vocab_size", None, positive=False), vocab),
            target_hidden_size=opt("target_hidden_size", hidden),
        )
        cfg.check(source)
        return cfg

    @classmethod
    def from_target(cls, target_config, draft_vocab_size: Optional[int] = None) -> "DraftConfig":
        """Derive a draft shaped like the target's layers (the default when no draft JSON is given).
        draft_vocab_size: training.draft_vocab_size; None = the full vocabulary (`from_dict` applies
        resolve_draft_vocab_size; the target's own config holds no draft value to fall back on)."""
        tc = text_config_of(target_config)
        d = tc.to_dict() if hasattr(tc, "to_dict") else dict(tc)
        d = {k: v for k, v in d.items() if k not in ("num_hidden_layers", "hidden_act", "draft_vocab_size")}
        d["target_hidden_size"] = d["hidden_size"]
        d["draft_vocab_size"] = draft_vocab_size
        return cls.from_dict(d, source="target config", strict_keys=False)

    def check(self, source: str = "draft config") -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{source}: num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ConfigError(f"{source}: draft_vocab_size={self.draft_vocab_size} must be in [1, vocab_size="
                              f"{self.vocab_size}]")
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim={self.head_dim} must be even for RoPE")

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "DraftConfig":
        d = self.to_dict()
        d.update(kw)
        return DraftConfig(**d)


# every key from_dict / _read_rope reads: a key close to one of these but not one of them is a typo
READ_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings", "vocab_size",
             "draft_vocab_size", "target_hidden_size", "num_hidden_layers", "hidden_act")
_OTHER_HF_KEYS = ("moe_intermediate_size", "v_head_dim", "qk_rope_head_dim", "qk_nope_head_dim")   # real, and near


def _check_key_typos(d: dict, source: str) -> None:
    """An unknown key that is nearly a key we read ("num_key_value_head") would silently change the
    architecture: refuse it with the suggestion. Other keys of HF configs (architectures, torch_dtype...) pass."""
    import difflib

    for key in d:
        if key in READ_KEYS or key in _OTHER_HF_KEYS:
            continue
        close = difflib.get_close_matches(str(key), READ_KEYS, n=1, cutoff=0.85)
        if close:
            raise ConfigError(f"{source}: unknown key '{key}'; did you mean '{close[0]}'?")


def _as(kind, key: str, value, source: str):
    if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
        value = str(value)   # true/false or 2.5 for a count: refused below
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{source}: '{key}' must be {what}, got {value!r}") from None


def _positive(value, key: str, source: str):
    """Every size, count and scale a draft config holds is > 0 (a 0 or negative one fails deep in torch)."""
    if value <= 0:
        what = "a positive integer" if isinstance(value, int) else "a positive number"
        raise ConfigError(f"{source}: '{key}' must be {what}, got {value!r}")
    return value


def _read_rope(d: dict, source: str) -> tuple[float, Optional[dict]]:
    """rope_theta + rope_scaling from either the transformers-4 keys or transformers-5 `rope_parameters`."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    theta = d.get("rope_theta")
    if isinstance(params, dict):
        if "rope_type" not in params and "type" not in params and params:  # per-layer-type dict
            params = next(iter(params.values()))
        theta = params.get("rope_theta", theta)
        scaling = {k: v for k, v in params.items() if k != "rope_theta"} if scaling is None else scaling
    if theta is None:
        raise ConfigError(f"{source}: missing required key 'rope_theta'")
    if scaling:
        scaling = dict(scaling)
        rtype = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
        scaling.pop("type", None)
        if rtype not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"{source}: rope_scaling type '{rtype}' is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        scaling = None if rtype == "default" else {"rope_type": rtype, **scaling}
    return _positive(_as(float, "rope_theta", theta, source), "rope_theta", source), (scaling or None)


def rope_inv_freq(cfg: DraftConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention scaling) for the configured RoPE, as transformers computes it."""
    dim = cfg.head_dim
    if cfg.rope_scaling is None:
        return 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0
    import warnings

    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                         head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
                         rope_scaling=dict(cfg.rope_scaling),
                         max_position_embeddings=cfg.max_position_embeddings)
    inv_freq, scale = ROPE_INIT_FUNCTIONS[cfg.rope_scaling["rope_type"]](hf, torch.device("cpu"))
    return inv_freq.float(), float(scale)


# ------------------------------------------------------------------------------------------------
