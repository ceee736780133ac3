"""Test helper (not a test module): a tiny target vLLM can run on CPU and a quickly trained EAGLE-3 draft.

The target is a random 8-layer Qwen3 (H 64, 2 heads of head_dim 32: vLLM's CPU attention takes head_dim
32/64/..., not 16) made more predictable, so a draft learns it in a few hundred CPU steps:
lm_head x50 (sharp distributions: argmax far from ties), attention outputs x0.3 (the next token leans on
the current one). The draft is trained with the real Eagle3 TTT loss on the target's own hidden states
over the target's own greedy continuations of random prompts (self-distillation), vocab pruned to the
most frequent tokens so the export carries a real d2t.
"""

from __future__ import annotations

from pathlib import Path

import torch

AUX_LAYERS = [1, 3, 4]  # ours; vLLM ids [2, 4, 5] (ascending and distinct, as vLLM requires)
PROMPT_LEN = 6


def make_vllm_target(out_dir: Path, tokenizer, seed: int = 0) -> Path:
    from torchspec.utils.tiny import make_tiny_target

    model, _ = make_tiny_target(out_dir, arch="qwen3", seed=seed, tokenizer=tokenizer, hidden_size=64,
                                num_attention_heads=2, num_key_value_heads=2, head_dim=32, num_hidden_layers=8)
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.3)
    model.save_pretrained(str(out_dir))
    return out_dir


def random_prompts(n: int, seed: int, vocab: int = 512, length: int = PROMPT_LEN) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=g).tolist()


@torch.no_grad()
def self_distill_data(model, num_seqs: int = 256, new_tokens: int = 42, seed: int = 0) -> dict[str, torch.Tensor]:
    """The trainer batch layout (docs/interfaces.md) over the target's greedy continuations."""
    prompts = torch.tensor(random_prompts(num_seqs, seed))
    ids = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                         pad_token_id=model.config.pad_token_id)
    out = model.model(input_ids=ids, output_hidden_states=True)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, PROMPT_LEN:] = 1
    return {"input_ids": ids, "loss_mask": loss_mask, "attention_mask": torch.ones_like(ids),
            "aux_hidden_states": torch.cat([out.hidden_states[k + 1] for k in AUX_LAYERS], dim=-1),
            "final_hidden_states": out.last_hidden_state}


def frequency_vocab_map(ids: torch.Tensor, loss_mask: torch.Tensor, vocab: int, draft_vocab: int):
    counts = torch.bincount(ids[loss_mask.bool()], minlength=vocab)
    keep = counts.argsort(descending=True, stable=True)[:draft_vocab].sort().values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[keep] = True
    return keep - torch.arange(draft_vocab), t2d


def train_draft(target_dir: Path, steps: int = 250, draft_vocab_size: int = 384, seed: int = 0,
                ttt_length: int = 3, lr: float = 3e-3):
    """(trained draft in eval mode, target model); a few hundred AdamW steps of the Eagle3 loss."""
    from transformers import AutoModelForCausalLM

    from torchspec.models.draft import DraftConfig, build_draft
    from torchspec.models.eagle3 import eagle3_loss
    from torchspec.models.target_head import TargetHead

    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    data = self_distill_data(model, seed=seed)
    head = TargetHead.from_pretrained(target_dir, "lm_head.weight", "model.embed_tokens.weight")
    d2t, t2d = frequency_vocab_map(data["input_ids"], data["loss_mask"], model.config.vocab_size, draft_vocab_size)
    torch.manual_seed(seed)
    draft = build_draft(DraftConfig.from_target(model.config, draft_vocab_size=draft_vocab_size), head,
                        {"d2t": d2t, "t2d": t2d})
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = data["input_ids"].shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (8,), generator=g)
        out = eagle3_loss(draft, head, {k: v[idx] for k, v in data.items()}, ttt_length, "sdpa")
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return draft.eval(), model


def trained_setup(base: Path, tokenizer) -> dict[str, Path]:
    """Target dir + exported trained draft + exported untrained draft (same vocab map), built once per
    pytest session under `base` (tmp_path_factory.getbasetemp()) and reused by every test module."""
    from torchspec.export import export_draft

    root = Path(base) / "eval_tiny_draft"
    paths = {"target": root / "target", "trained": root / "trained", "untrained": root / "untrained"}
    if (root / "done").exists():
        return paths
    make_vllm_target(paths["target"], tokenizer)
    draft, model = train_draft(paths["target"])
    export_draft(draft, paths["trained"], target_config=model.config, aux_layer_ids=AUX_LAYERS, dtype=torch.float32)
    from torchspec.models.draft import build_draft

    torch.manual_seed(1)
    fresh = build_draft(draft.config, None, {"d2t": draft.d2t.clone(), "t2d": draft.t2d.clone()})
    export_draft(fresh, paths["untrained"], target_config=model.config, aux_layer_ids=AUX_LAYERS,
                 dtype=torch.float32)
    (root / "done").write_text("ok")
    return paths
