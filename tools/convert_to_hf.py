#!/usr/bin/env python
"""Convert a trainer checkpoint into a draft directory SGLang and vLLM load as EAGLE-3.

    python tools/convert_to_hf.py --input-dir CKPT --output-dir OUT [--target-model-path TARGET]
        [--aux-layer-ids 1,17,32] [--dtype bfloat16]
        [--prune-vocab N (--token-counts counts.pt | --dataset data.jsonl [--chat-template qwen])]

CKPT (what torchspec.training.checkpoint writes): model.safetensors (the draft's state_dict),
draft_config.json, optionally export_meta.json {"aux_layer_ids": [...] (our convention: id k =
output of target layer k), "embeddings_trained": bool}. Aux ids: --aux-layer-ids, else
export_meta.json, else the default ids for --target-model-path's layer count (torchspec.config.target).

--prune-vocab N keeps the N most frequent tokens (loss-masked tokens of --dataset, tokenized
with the target's tokenizer, or a LongTensor[V] saved with torch.save as --token-counts) of
the draft's current vocabulary, carrying their lm_head rows over.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = ("bfloat16", "float16", "float32")


def fail(msg: str) -> "SystemExit":
    return SystemExit(f"convert_to_hf: {msg}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input-dir", required=True, help="trainer checkpoint dir (model.safetensors + draft_config.json)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--target-model-path", help="target dir: its config.json gives layer count, vocab, bos/eos")
    p.add_argument("--aux-layer-ids", help="comma-separated, our convention (output of target layer k)")
    p.add_argument("--dtype", choices=DTYPES, help="weights dtype of the export (default: as in the checkpoint)")
    p.add_argument("--include-embeddings", action=argparse.BooleanOptionalAction,
                   help="write embed_tokens.weight (default: only when export_meta says they were trained)")
    p.add_argument("--prune-vocab", type=int, metavar="N", help="keep the N most frequent draft tokens")
    p.add_argument("--token-counts", help="torch.save'd LongTensor[V_target] of token frequencies")
    p.add_argument("--dataset", help="conversations (jsonl/json/parquet) to count loss-masked tokens in")
    p.add_argument("--chat-template", help="chat template of --dataset (default: the config schema's)")
    return p.parse_args(argv)


def load_checkpoint(ckpt: Path):
    import torch
    from safetensors.torch import load_file

    from torchspec.config.errors import ConfigError
    from torchspec.models.draft import DraftConfig, LlamaForCausalLMEagle3

    for name in ("model.safetensors", "draft_config.json"):
        if not (ckpt / name).is_file():
            raise fail(f"--input-dir {ckpt}: missing {name} (expected a trainer checkpoint dir)")
    try:
        cfg = DraftConfig.from_json(ckpt / "draft_config.json")
    except ConfigError as e:
        raise fail(str(e)) from None
    sd = load_file(str(ckpt / "model.safetensors"))
    draft = LlamaForCausalLMEagle3(cfg).to(sd["lm_head.weight"].dtype if "lm_head.weight" in sd else torch.float32)
    try:
        draft.load_checkpoint_state_dict(sd, source=str(ckpt / "model.safetensors"))
    except ValueError as e:
        raise fail(str(e)) from None
    meta_path = ckpt / "export_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return draft, meta


def token_counts(args, vocab_size: int):
    import torch

    if args.token_counts:
        counts = torch.load(args.token_counts, weights_only=True)
        if isinstance(counts, dict):
            counts = counts.get("counts", counts.get("freq"))
        if not torch.is_tensor(counts) or counts.shape != (vocab_size,):
            raise fail(f"--token-counts {args.token_counts}: expected a LongTensor of shape ({vocab_size},)")
        return counts
    if not args.dataset:
        raise fail("--prune-vocab needs --token-counts or --dataset")
    if not args.target_model_path:
        raise fail("--dataset needs --target-model-path (its tokenizer tokenizes the data)")
    from transformers import AutoTokenizer

    from torchspec.config.schema import DatasetConfig, TrainingConfig
    from torchspec.data import DataError, build_dataset, token_frequencies

    tok = AutoTokenizer.from_pretrained(args.target_model_path)
    try:
        samples = build_dataset(args.dataset, tok, chat_template=args.chat_template or DatasetConfig.chat_template,
                                max_seq_length=TrainingConfig.max_seq_length, prompt_key=DatasetConfig.prompt_key,
                                progress=False, config_key="--dataset")
        return token_frequencies(samples, vocab_size)
    except DataError as e:
        raise fail(str(e)) from None


def main(argv=None) -> Path:
    args = parse_args(argv)
    import torch

    from torchspec.config.target import TargetInfo, check_aux_layers, to_vllm_layer_ids
    from torchspec.export import export_draft, prune_draft_vocab

    ckpt = Path(args.input_dir)
    if not ckpt.is_dir():
        raise fail(f"--input-dir {ckpt}: not a directory")
    draft, meta = load_checkpoint(ckpt)
    target_json = None
    if args.target_model_path:
        cfg_file = Path(args.target_model_path) / "config.json"
        if not cfg_file.is_file():
            raise fail(f"--target-model-path: {cfg_file} not found")
        target_json = json.loads(cfg_file.read_text())
    if args.aux_layer_ids:
        try:
            aux = [int(x) for x in args.aux_layer_ids.split(",")]
        except ValueError:
            raise fail(f"--aux-layer-ids '{args.aux_layer_ids}': expected comma-separated integers") from None
    elif meta.get("aux_layer_ids"):
        aux = list(meta["aux_layer_ids"])
    elif target_json is None:
        raise fail("aux layer ids unknown: pass --aux-layer-ids or --target-model-path "
                   f"(no aux_layer_ids in {ckpt / 'export_meta.json'})")
    else:
        aux = None  # the target's default
    try:
        if target_json is None:
            aux, target_config = check_aux_layers(aux, key="aux layer ids"), None
        else:  # checked against the target's layer count (None: its default ids)
            target = TargetInfo.from_dict(target_json, aux, key="aux layer ids")
            aux, target_config = list(target.aux_layers), target.text_config
    except ValueError as e:  # ConfigError included
        raise fail(str(e)) from None
    if args.prune_vocab is not None:
        counts = token_counts(args, draft.config.vocab_size)
        try:
            draft = prune_draft_vocab(draft, counts, args.prune_vocab)
        except ValueError as e:
            raise fail(str(e)) from None
    with_emb = args.include_embeddings
    if with_emb is None:
        with_emb = bool(meta.get("embeddings_trained", False))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    out = export_draft(draft, args.output_dir, target_config, aux, dtype=dtype, include_embeddings=with_emb)
    print(f"wrote {out} (draft_vocab_size {draft.config.draft_vocab_size}, aux layers {aux} ours / "
          f"{to_vllm_layer_ids(aux)} vLLM)")
    return out


if __name__ == "__main__":
    main()
