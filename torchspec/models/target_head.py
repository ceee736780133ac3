"""The target's frozen lm_head (and embeddings), read by tensor name without loading the target.

Only the named tensors are read from the safetensors file(s) (`model.safetensors` or a sharded
`model.safetensors.index.json`). Target probabilities over the draft vocab are computed here,
in row chunks, so no [rows, full vocab] tensor exists for more than one chunk at a time.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from torchspec.config.errors import ConfigError, FileError
from torchspec.config.target import text_config_of
from torchspec.models.attention import maybe_compiled

# Rows per chunk are chosen so one chunk's logits hold about this many elements.
CHUNK_ELEMENTS = 1 << 27


@contextmanager
def _open(f: Path):
    """safe_open(f); a file it cannot read (truncated, corrupt, not safetensors) is one FileError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(f), framework="pt") as h:
            yield h
    except (SafetensorError, OSError) as e:
        raise FileError(f"model.target_model_path: {f}: not a readable safetensors file: {e}") from None


def _safetensors_files(target_path: Path) -> dict[str, Path]:
    """tensor name -> file, from the index if sharded, else from every *.safetensors file's header."""
    index = target_path / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            return {k: target_path / v for k, v in wm.items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FileError(f"model.target_model_path: {index}: not a readable safetensors index "
                            f"(a JSON object with a 'weight_map' of tensor name -> file): {type(e).__name__}: {e}"
                            ) from None
    files = sorted(target_path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model.target_model_path: no *.safetensors files in {target_path}")
    names = {}
    for f in files:
        with _open(f) as h:
            names.update({k: f for k in h.keys()})
    return names


def read_tensors(target_path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Read only `keys` from a target checkpoint directory."""
    target_path = Path(target_path)
    where = _safetensors_files(target_path)
    out = {}
    for key in keys:
        if key not in where:
            leaf = ".".join(key.split(".")[-2:])
            near = [k for k in where if k.endswith(leaf)][:3]
            hint = f"; tensors with a similar name: {near}" if near else ""
            raise ConfigError(f"model.lm_head_key / model.embedding_key: tensor '{key}' not found in "
                              f"{target_path}{hint}")
        with _open(where[key]) as h:
            out[key] = h.get_tensor(key)
    return out


def check_head_keys(cfg) -> None:
    """The start's check that the target checkpoint holds the tensors read by name: model.lm_head_key (or,
    tied, model.embedding_key) and model.embedding_key; model.norm_key too when the vllm engine, which
    applies the final norm itself, reads it. One ConfigError naming the key otherwise."""
    target_path = Path(cfg.model.target_model_path)
    available = _safetensors_files(target_path)
    m = cfg.model
    wanted = {"model.embedding_key": m.embedding_key}
    if not (m.lm_head_key not in available and m.embedding_key in available and _tied(target_path)):
        wanted["model.lm_head_key"] = m.lm_head_key
    if cfg.inference.inference_engine_type == "vllm":
        wanted["model.norm_key"] = m.norm_key
    for key, name in wanted.items():
        if name and name not in available:
            import difflib

            near = difflib.get_close_matches(name, list(available), n=3, cutoff=0.8)
            hint = f"; tensors with a similar name: {near}" if near else ""
            raise ConfigError(f"{key}={name!r}: no such tensor in the target checkpoint {target_path}{hint}")


class TargetHead(nn.Module):
    """Frozen target lm_head [V, H_t] (and optionally embeddings [V, H_t]) as buffers."""

    def __init__(self, lm_head: torch.Tensor, embed_tokens: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("lm_head", lm_head.detach())
        self.register_buffer("embed_tokens", None if embed_tokens is None else embed_tokens.detach())

    @classmethod
    def from_pretrained(cls, target_path, lm_head_key: str, embedding_key: Optional[str] = None,
                        dtype: Optional[torch.dtype] = None) -> "TargetHead":
        target_path = Path(target_path)
        keys = [lm_head_key] + ([embedding_key] if embedding_key else [])
        available = _safetensors_files(target_path)
        tied = lm_head_key not in available and embedding_key in available and _tied(target_path)
        if tied:  # tie_word_embeddings: the lm_head IS the embedding matrix
            keys = [embedding_key]
        t = read_tensors(target_path, keys)
        head = t[embedding_key] if tied else t[lm_head_key]
        emb = t.get(embedding_key) if embedding_key else None
        if dtype is not None:
            head = head.to(dtype)
            emb = None if emb is None else emb.to(dtype)
        return cls(head, emb)

    @torch.no_grad()
    def draft_probs(self, final_hidden: torch.Tensor, d2t: torch.Tensor, t2d: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows of target final hidden states [N, H_t]:

        in_draft bool [N]: the target's argmax over the FULL vocab lies in the draft vocab;
        probs [N, V_draft] (dtype of final_hidden): the target softmax restricted to the draft
        vocab (draft id i = target id i + d2t[i]) and renormalised.
        """
        W = self.lm_head
        N, V = final_hidden.shape[0], W.shape[0]
        draft_ids = torch.arange(d2t.shape[0], device=d2t.device) + d2t
        in_draft = torch.empty(N, dtype=torch.bool, device=final_hidden.device)
        probs = torch.empty(N, d2t.shape[0], dtype=final_hidden.dtype, device=final_hidden.device)
        rows = max(1, CHUNK_ELEMENTS // V)
        chunk_fn = maybe_compiled(_probs_chunk, W)
        for s in range(0, N, rows):
            in_draft[s:s + rows], probs[s:s + rows] = chunk_fn(final_hidden[s:s + rows], W, t2d, draft_ids)
        return in_draft, probs


def _probs_chunk(f, W, t2d, draft_ids):
    logits = f.to(W.dtype) @ W.T
    return t2d[logits.argmax(-1)], torch.softmax(logits[:, draft_ids].float(), dim=-1).to(f.dtype)


def _tied(target_path: Path) -> bool:
    cfg = target_path / "config.json"
    if not cfg.exists():
        return False
    d = json.loads(cfg.read_text())
    # Not just text_config_of(d): the top-level flag, when present, wins over the language model's. The
    # checkpoint's lm_head belongs to the outer (e.g. vision-language) model, which transformers ties by its
    # own config's tie_word_embeddings; only a config without the flag falls back to its text_config's.
    return bool((d if "tie_word_embeddings" in d else text_config_of(d)).get("tie_word_embeddings", False))
