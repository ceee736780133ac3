"""The quickstart's target and data, built locally and cached (`scripts/quickstart.py` runs the whole quickstart).

Nothing is downloaded:
 1. target: a byte-level BPE tokenizer and a small Qwen3-config model, trained for about a minute (300 steps,
    at most 150 s) on the Python standard library's own sources, cut into chat-formatted conversations
    (user: the start of a code snippet, assistant: its continuation); every 10th file is held out;
 2. data: the same kind of conversations in ShareGPT format: train.jsonl from the training files,
    eval.jsonl from the held-out ones.
Each stage is cached in its folder with the recipe that made it; a changed recipe rebuilds it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

DONE = "quickstart_done.json"  # marker written last in each cached stage dir


@dataclass(frozen=True)
class TargetRecipe:
    """How the quickstart's target is built (changing any field rebuilds it)."""

    corpus_chars: int = 1_500_000  # of standard-library source
    heldout_every: int = 10  # every Nth file (sorted by name) is held out
    vocab_size: int = 1024
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    seq_len: int = 128
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    max_steps: int = 300  # ~75 s on a free 2-core machine
    train_seconds: float = 150.0  # a cap for slow or busy machines (then fewer steps are run)
    seed: int = 0


@dataclass(frozen=True)
class DataRecipe:
    prompt_lines: int = 6
    answer_lines: int = 12
    max_train: int = 1200
    max_eval: int = 64
    version: int = 1


def log(msg: str) -> None:
    print(f"[quickstart] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------
# stage markers

def _cached(folder: Path, recipe: dict) -> dict | None:
    marker = folder / DONE
    if not marker.exists():
        return None
    info = json.loads(marker.read_text())
    return info if info.get("recipe") == recipe else None


def _mark_done(folder: Path, recipe: dict, **info) -> dict:
    info = {"recipe": recipe, **info}
    (folder / DONE).write_text(json.dumps(info, indent=1))
    return info


def split_corpus(recipe: TargetRecipe) -> tuple[list[str], list[str]]:
    """(training files' texts, held-out files' texts) of the standard library's sources."""
    from torchspec.utils.tiny import default_corpus

    texts = default_corpus(recipe.corpus_chars)
    held_ids = {i for i in range(len(texts)) if i % recipe.heldout_every == recipe.heldout_every - 1}
    held_ids = held_ids or {len(texts) - 1}  # a small corpus still holds one file out
    return ([t for i, t in enumerate(texts) if i not in held_ids],
            [t for i, t in enumerate(texts) if i in held_ids])


# ---------------------------------------------------------------------------------------------------
# stage 1: the target

def build_target(out_dir: Path, recipe: TargetRecipe = TargetRecipe(), data: DataRecipe = DataRecipe()) -> dict:
    """Train the tokenizer and the target; save both (HF format) in out_dir. Returns the stage info.

    The target learns from the training files' text cut into the quickstart's conversations and
    rendered with the chat template the run uses, so it has seen the chat format it will be served
    in; its held-out loss is measured on the held-out files' conversations.
    """
    key = {**asdict(recipe), "data": asdict(data)}
    hit = _cached(out_dir, key)
    if hit is not None:
        log(f"target: cached in {out_dir} (trained {hit['steps']} steps, held-out loss {hit['heldout_loss']:.2f})")
        return hit
    import torch
    from transformers import AutoModelForCausalLM

    from torchspec.utils.tiny import tiny_target_config, train_tokenizer

    t0 = time.time()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    train_texts, held_texts = split_corpus(recipe)
    tok = train_tokenizer(out_dir, texts=train_texts, vocab_size=recipe.vocab_size)
    train_ids = _token_stream(tok, [render_chat(c) for c in conversations(train_texts, data)])
    held_ids = _token_stream(tok, [render_chat(c) for c in conversations(held_texts, data)])
    log(f"target: tokenizer ({len(tok)} tokens) + {len(train_ids):,} training / {len(held_ids):,} held-out "
        f"tokens of conversations from {len(train_texts) + len(held_texts)} stdlib files in {time.time() - t0:.0f}s")

    config = tiny_target_config(
        "qwen3", vocab_size=len(tok), hidden_size=recipe.hidden_size, num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads, num_key_value_heads=recipe.num_key_value_heads,
        intermediate_size=recipe.intermediate_size)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config)
    before = _lm_loss(model, held_ids, recipe)
    steps = _train_lm(model, train_ids, recipe)
    after = _lm_loss(model, held_ids, recipe)
    model.save_pretrained(str(out_dir))
    info = _mark_done(out_dir, key, steps=steps, seconds=round(time.time() - t0, 1), heldout_loss=after,
                      initial_heldout_loss=before, uniform_loss=math.log(len(tok)))
    log(f"target: trained {steps} steps; held-out next-token loss {before:.2f} -> {after:.2f} nats "
        f"(uniform guess {math.log(len(tok)):.2f}); {time.time() - t0:.0f}s in all")
    return info


def _token_stream(tok, texts: list[str]):
    import torch

    ids = []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False).input_ids)
        ids.append(tok.convert_tokens_to_ids("<|endoftext|>"))
    return torch.tensor(ids, dtype=torch.long)


def _windows(ids, n: int, seq_len: int, gen):
    import torch

    starts = torch.randint(0, len(ids) - seq_len - 1, (n,), generator=gen)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def _train_lm(model, ids, recipe: TargetRecipe) -> int:
    """Next-token training on random windows: max_steps, or fewer if train_seconds runs out."""
    import torch

    gen = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    t0, step, shown = time.time(), 0, 0.0
    while step < recipe.max_steps:
        elapsed = time.time() - t0
        if elapsed >= recipe.train_seconds:
            log(f"target: time cap of {recipe.train_seconds:.0f}s reached at step {step}/{recipe.max_steps} "
                "(a busy machine): this target differs from a full run's")
            break
        # linear warmup, then linear decay over the steps: a function of the step alone, so the same
        # recipe gives the same target on any machine that finishes the steps (the time cap only stops it)
        lr = (recipe.learning_rate * min(1.0, (step + 1) / recipe.warmup_steps)
              * max(0.05, 1.0 - step / recipe.max_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        x = _windows(ids, recipe.batch_size, recipe.seq_len, gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if elapsed - shown >= 15:
            shown = elapsed
            log(f"target: step {step}/{recipe.max_steps}, loss {loss.item():.2f}, {elapsed:.0f}s")
    model.eval()
    return step


def _lm_loss(model, ids, recipe: TargetRecipe, n: int = 32) -> float:
    import torch

    gen = torch.Generator().manual_seed(recipe.seed + 1)
    x = _windows(ids, n, recipe.seq_len, gen)
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


# ---------------------------------------------------------------------------------------------------
# stage 2: conversations

def snippets(text: str, recipe: DataRecipe):
    """(prompt, answer) pairs: consecutive blocks of lines of one source file."""
    lines = text.splitlines()
    size = recipe.prompt_lines + recipe.answer_lines
    for s in range(0, len(lines) - size + 1, size):
        prompt = "\n".join(lines[s:s + recipe.prompt_lines])
        answer = "\n".join(lines[s + recipe.prompt_lines:s + size])
        if len(answer.strip()) >= 80 and len(prompt.strip()) >= 20:
            yield prompt, answer


def render_chat(conversation: dict) -> str:
    """The conversation as the run's chat template (qwen / ChatML) renders it."""
    from torchspec.data.templates import QwenTemplate

    roles = {"human": "user", "gpt": "assistant"}
    return QwenTemplate().render([{"role": roles[m["from"]], "content": m["value"]}
                                  for m in conversation["conversations"]])[0]


def conversations(texts: list[str], recipe: DataRecipe, limit: int | None = None) -> list[dict]:
    out = []
    for text in texts:
        for prompt, answer in snippets(text, recipe):
            out.append({"conversations": [
                {"from": "human", "value": f"Continue this Python code:\n{prompt}"},
                {"from": "gpt", "value": answer},
            ]})
    if limit is not None and len(out) > limit:  # an even spread over all files, not the first few
        stride = len(out) / limit
        out = [out[int(i * stride)] for i in range(limit)]
    return out


def build_data(out_dir: Path, target_recipe: TargetRecipe = TargetRecipe(), recipe: DataRecipe = DataRecipe()) -> dict:
    key = {"data": asdict(recipe), "corpus": [target_recipe.corpus_chars, target_recipe.heldout_every]}
    hit = _cached(out_dir, key)
    if hit is not None:
        log(f"data: cached in {out_dir} ({hit['train']} train / {hit['eval']} held-out conversations)")
        return hit
    out_dir.mkdir(parents=True, exist_ok=True)
    train_texts, held_texts = split_corpus(target_recipe)
    splits = {"train": conversations(train_texts, recipe, recipe.max_train),
              "eval": conversations(held_texts, recipe, recipe.max_eval)}
    for name, convs in splits.items():
        with open(out_dir / f"{name}.jsonl", "w") as f:
            for c in convs:
                f.write(json.dumps(c) + "\n")
    log(f"data: {len(splits['train'])} train / {len(splits['eval'])} held-out conversations in {out_dir}")
    return _mark_done(out_dir, key, train=len(splits["train"]), eval=len(splits["eval"]))


# ---------------------------------------------------------------------------------------------------
# stage 3: the draft, through the full pipeline
