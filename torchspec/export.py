"""Export a trained draft as a directory SGLang and vLLM load as an EAGLE-3 draft, and load it back.

Layout (checked against SGLang `models/llama_eagle3.py` and vLLM `model_executor/models/llama_eagle3.py`):
  config.json        LlamaConfig-style: architectures ["LlamaForCausalLMEagle3"], model_type llama,
                     the draft's shape, vocab_size (target vocab), draft_vocab_size, target_hidden_size,
                     norm_before_residual false (our residual is the un-normed hidden, as SGLang's).
  model.safetensors  midlayer.*, fc.weight, norm.weight, lm_head.weight; d2t and t2d only for a
                     pruned vocab (vLLM 0.32 has no d2t parameter when draft_vocab_size ==
                     vocab_size, and an unknown name fails its load); embed_tokens.weight only when
                     the embeddings were trained (otherwise both servers share the target's). Names
                     are checked before returning: vLLM silently keeps its init for a missing one.
Aux-layer ids. Ours (= SGLang's): id k = OUTPUT of target decoder layer k. vLLM: id k = the state
ENTERING layer k, i.e. ours + 1. config.json carries both, each where its reader looks first:
  eagle_config.eagle_aux_hidden_state_layer_ids   ours      (SGLang and SpecForge read this)
  eagle_aux_hidden_state_layer_ids (top level)    ours + 1  (vLLM reads this before eagle_config)
and `torchspec.aux_hidden_state_layer_ids` (ours) with the convention spelled out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from torchspec.config.target import check_aux_layers, text_config_of, to_vllm_layer_ids
from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3

ARCHITECTURE = "LlamaForCausalLMEagle3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LAYER_ID_CONVENTION = ("id k = output of target decoder layer k (0-based) = transformers hidden_states[k+1] "
                       "(SGLang's convention); vLLM's top-level eagle_aux_hidden_state_layer_ids = ours + 1")


def expected_tensors(cfg: DraftConfig, with_embeddings: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor name an export holds, with its shape."""
    H, I, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    names = {
        "fc.weight": (H, 3 * cfg.target_hidden_size),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (cfg.num_attention_heads * d, 2 * H),
        "midlayer.self_attn.k_proj.weight": (cfg.num_key_value_heads * d, 2 * H),
        "midlayer.self_attn.v_proj.weight": (cfg.num_key_value_heads * d, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, cfg.num_attention_heads * d),
        "midlayer.mlp.gate_proj.weight": (I, H),
        "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,),
        "lm_head.weight": (cfg.draft_vocab_size, H),
    }
    if cfg.draft_vocab_size != cfg.vocab_size:  # vLLM has no d2t parameter for a full-vocab draft
        names["d2t"] = (cfg.draft_vocab_size,)
        names["t2d"] = (cfg.vocab_size,)
    if with_embeddings:
        names["embed_tokens.weight"] = (cfg.vocab_size, H)
    return names


def _target_dict(target_config) -> dict:
    """The target's language-model fields as a dict (any subset of a config.json is accepted)."""
    if target_config is None:
        return {}
    text = text_config_of(target_config)
    return text.to_dict() if hasattr(text, "to_dict") else dict(text)


def export_config(cfg: DraftConfig, aux_layer_ids: Sequence[int], target_config=None,
                  dtype: torch.dtype = torch.bfloat16, embeddings_trained: bool = False) -> dict[str, Any]:
    ours = check_aux_layers(aux_layer_ids, key="aux_layer_ids")
    tgt = _target_dict(target_config)
    if tgt.get("vocab_size") not in (None, cfg.vocab_size):
        raise ValueError(f"draft vocab_size {cfg.vocab_size} != target vocab_size {tgt['vocab_size']}")
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_act": cfg.hidden_act,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "norm_before_residual": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": ours, "use_aux_hidden_state": True},
        "eagle_aux_hidden_state_layer_ids": to_vllm_layer_ids(ours),
        "torchspec": {"aux_hidden_state_layer_ids": ours, "layer_id_convention": LAYER_ID_CONVENTION,
                      "embeddings_trained": bool(embeddings_trained),
                      "target_num_hidden_layers": tgt.get("num_hidden_layers")},
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if tgt.get(key) is not None:
            out[key] = tgt[key]
    return out


def export_draft(draft: LlamaForCausalLMEagle3, out_dir, target_config=None,
                 aux_layer_ids: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None,
                 include_embeddings: Optional[bool] = None) -> Path:
    """Write config.json + model.safetensors to `out_dir`; returns it. aux_layer_ids: OUR convention."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if aux_layer_ids is None:
        raise ValueError("export_draft needs the aux layer ids the draft was trained on")
    cfg = draft.config
    dtype = dtype or draft.lm_head.weight.dtype
    with_emb = draft.embeddings_trained if include_embeddings is None else include_embeddings
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = draft.state_dict()
    tensors = {}
    for name in expected_tensors(cfg, with_emb):
        t = sd[name].detach().cpu()
        tensors[name] = t if name in ("d2t", "t2d") else t.to(dtype)
        tensors[name] = tensors[name].contiguous()
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(
        export_config(cfg, aux_layer_ids, target_config, dtype, with_emb), indent=2) + "\n")
    # Check what was written, not what we meant to write.
    with safe_open(str(out_dir / WEIGHTS_FILE), framework="pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    check_export_tensors(written, cfg, with_emb, where=str(out_dir / WEIGHTS_FILE))
    return out_dir


def check_export_tensors(written: dict[str, tuple[int, ...]], cfg: DraftConfig, with_embeddings: bool,
                         where: str = "export", error: type[Exception] = RuntimeError) -> None:
    """`error` (RuntimeError: our own export is wrong) when the names/shapes are not what servers load."""
    want = expected_tensors(cfg, with_embeddings)
    missing, unknown = sorted(set(want) - set(written)), sorted(set(written) - set(want))
    wrong = {k: (written[k], want[k]) for k in set(want) & set(written) if tuple(written[k]) != want[k]}
    if missing or unknown or wrong:
        raise error(f"{where}: tensor names/shapes differ from what SGLang/vLLM load: missing {missing}, "
                    f"unknown {unknown}, wrong shapes {wrong}")


def check_exported(path) -> tuple[dict, DraftConfig]:
    """(config.json dict, DraftConfig) of an export dir, checked without loading the weights: config.json
    parses and describes a draft, model.safetensors' header reads and holds the tensors that config needs.
    Anything unusable is a FileError (or ConfigError) of one line naming the file."""
    from safetensors import safe_open

    from torchspec.config.errors import FileError

    path = Path(path)
    cfg_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise FileError(f"{cfg_path}: not an exported draft dir (no {CONFIG_FILE})")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FileError(f"{cfg_path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FileError(f"{cfg_path}: cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(hf, dict):
        raise FileError(f"{cfg_path}: must hold a JSON object (a draft config), not {type(hf).__name__}")
    cfg = DraftConfig.from_dict(hf, source=str(cfg_path))
    if not weights.is_file():
        raise FileError(f"{weights}: missing; an export dir holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a bad header / truncated file
        raise _corrupt(weights, e) from None
    check_export_tensors(shapes, cfg, "embed_tokens.weight" in shapes, where=str(weights), error=FileError)
    return hf, cfg


def _corrupt(path: Path, e: Exception) -> Exception:
    from torchspec.config.errors import FileError

    first = (str(e).strip().splitlines() or [""])[0][:200]
    return FileError(f"{path}: corrupt, cannot be read ({type(e).__name__}: {first}); export the draft again")


def load_exported(path, dtype: Optional[torch.dtype] = None) -> tuple[LlamaForCausalLMEagle3, dict]:
    """(draft, config.json dict) from an export dir. Without embed_tokens.weight in the file the
    draft's embeddings stay at init: load the target's with `draft.load_embeddings`. A dir that cannot
    be used raises FileError / ConfigError (one line naming the file; see `check_exported`)."""
    from safetensors.torch import load_file

    path = Path(path)
    hf, cfg = check_exported(path)
    try:
        sd = load_file(str(path / WEIGHTS_FILE))
    except Exception as e:  # the header read, but the tensor bytes do not
        raise _corrupt(path / WEIGHTS_FILE, e) from None
    draft = LlamaForCausalLMEagle3(cfg)
    if dtype is None:
        dtype = sd["lm_head.weight"].dtype
    draft = draft.to(dtype)
    draft.load_checkpoint_state_dict(sd, source=str(path / WEIGHTS_FILE))
    draft.embed_tokens.weight.requires_grad_("embed_tokens.weight" in sd)
    return draft, hf


def aux_layer_ids_of(export_config_dict: dict) -> list[int]:
    """Our-convention aux ids recorded in an export's config.json."""
    ts = export_config_dict.get("torchspec") or {}
    if ts.get("aux_hidden_state_layer_ids"):
        return list(ts["aux_hidden_state_layer_ids"])
    ec = export_config_dict.get("eagle_config") or {}
    return list(ec["eagle_aux_hidden_state_layer_ids"])


@torch.no_grad()
def prune_draft_vocab(draft: LlamaForCausalLMEagle3, token_counts: torch.Tensor, draft_vocab_size: int
                      ) -> LlamaForCausalLMEagle3:
    """A copy of `draft` whose vocab is the `draft_vocab_size` most frequent tokens of its current vocab.

    token_counts: LongTensor[V_target] (e.g. torchspec.data.vocab.token_frequencies of the data).
    lm_head rows are carried over; d2t/t2d are rebuilt (ties go to the lower token id).
    """
    from torchspec.data.vocab import vocab_map_from_frequencies

    cfg = draft.config
    if token_counts.shape != (cfg.vocab_size,):
        raise ValueError(f"token counts have shape {tuple(token_counts.shape)}, expected ({cfg.vocab_size},)")
    if not 0 < draft_vocab_size <= cfg.draft_vocab_size:
        raise ValueError(f"--prune-vocab {draft_vocab_size}: must be in [1, current draft_vocab_size="
                         f"{cfg.draft_vocab_size}]")
    t2d_old = draft.t2d.cpu()
    counts = torch.where(t2d_old, token_counts.long().cpu(), torch.full_like(token_counts.long().cpu(), -1))
    d2t, t2d = vocab_map_from_frequencies(counts, draft_vocab_size)
    if draft_vocab_size == cfg.vocab_size:
        d2t, t2d = torch.zeros(cfg.vocab_size, dtype=torch.long), torch.ones(cfg.vocab_size, dtype=torch.bool)
    old_ids = torch.full((cfg.vocab_size,), -1, dtype=torch.long)  # target id -> old draft id
    old_ids[torch.arange(cfg.draft_vocab_size) + draft.d2t.cpu()] = torch.arange(cfg.draft_vocab_size)
    rows = old_ids[torch.arange(draft_vocab_size) + d2t]
    assert bool((rows >= 0).all()), "pruned vocab must be a subset of the current draft vocab"
    new = LlamaForCausalLMEagle3(cfg.replace(draft_vocab_size=draft_vocab_size)).to(draft.lm_head.weight.dtype)
    sd = {k: v for k, v in draft.state_dict().items() if k not in ("lm_head.weight", "d2t", "t2d")}
    sd["lm_head.weight"] = draft.lm_head.weight[rows.to(draft.lm_head.weight.device)].cpu()
    sd["d2t"], sd["t2d"] = d2t, t2d
    new.load_state_dict(sd)
    new.embed_tokens.weight.requires_grad_(draft.embeddings_trained)
    return new
