"""What `bench_e2e.py` trains on: a random-weight Qwen3 target and chat data with a realistic length spread.

Nothing is downloaded. The tokenizer is trained locally (byte-level BPE on the Python standard library's
sources), the target is a random-weight Qwen3 from a transformers config, and the conversations are cut
from the same sources with lengths that follow a ShareGPT-like spread: a log-normal number of tokens per
conversation (median ~300, long tail past 4k), 1-4 user/assistant turns, the assistant writing ~3/4 of
the tokens.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from torchspec.utils.tiny import default_corpus, tiny_target_config, train_tokenizer


@dataclass(frozen=True)
class TargetShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


# (a) small: tens of millions of parameters; (b) Qwen3-8B's shape (random weights, bf16 on GPU)
TARGETS = {
    "small": TargetShape(layers=8, hidden=384, intermediate=1024, heads=6, kv_heads=2, head_dim=64, vocab=4096),
    "8b": TargetShape(layers=36, hidden=4096, intermediate=12288, heads=32, kv_heads=8, head_dim=128, vocab=151936),
}
TOKENIZER_VOCAB = 4096   # the tokenizer's own vocabulary (the 8B target's embedding has more rows, unused)


def build_target(out: Path, shape: TargetShape) -> Path:
    """The target (config + random weights + tokenizer) in `out`, built once."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    t0 = time.time()
    train_tokenizer(out, texts=default_corpus(400_000), vocab_size=TOKENIZER_VOCAB)
    config = tiny_target_config("qwen3", vocab_size=shape.vocab, hidden_size=shape.hidden,
                                num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                                intermediate_size=shape.intermediate, max_position_embeddings=40960)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    print(f"[bench] target: {n / 1e6:.0f}M params ({shape}), built in {time.time() - t0:.0f}s", flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def sharegpt_lengths(n: int, seed: int = 0, median: float = 300.0, sigma: float = 0.95,
                     lo: int = 24, hi: int = 6000) -> list[int]:
    """Tokens per conversation: log-normal (median `median`, ~3% above 2k, tail past 4k), clipped to [lo, hi]."""
    rng = random.Random(seed)
    return [max(lo, min(hi, int(round(median * math.exp(sigma * rng.gauss(0.0, 1.0)))))) for _ in range(n)]


def build_conversations(path: Path, n: int, tokenizer, seed: int = 0) -> dict:
    """n conversations (OpenAI messages) whose token counts follow `sharegpt_lengths`; returns length stats."""
    if path.exists():
        return json.loads(path.with_suffix(".stats.json").read_text())
    text = "".join(default_corpus(4_000_000))
    ids = tokenizer(text[:200_000])["input_ids"]
    chars_per_token = 200_000 / len(ids)
    rng = random.Random(seed)
    lengths = sharegpt_lengths(n, seed)
    pos = 0
    with open(path, "w") as f:
        for i, tokens in enumerate(lengths):
            turns = 1 + min(3, int(rng.expovariate(1.2)))
            chars = int(tokens * chars_per_token)
            msgs = []
            for _ in range(turns):
                q, a = max(8, chars // turns // 4), max(8, 3 * chars // turns // 4)
                if pos + q + a >= len(text):
                    pos = 0
                msgs.append({"role": "user", "content": text[pos:pos + q]})
                msgs.append({"role": "assistant", "content": text[pos + q:pos + q + a]})
                pos += q + a
            f.write(json.dumps({"id": f"c{i}", "messages": msgs}) + "\n")
    srt = sorted(lengths)
    stats = {"conversations": n, "planned_tokens_median": srt[n // 2], "planned_tokens_p90": srt[int(n * 0.9)],
             "planned_tokens_p99": srt[int(n * 0.99)], "planned_tokens_max": srt[-1],
             "planned_tokens_mean": round(sum(lengths) / n, 1)}
    path.with_suffix(".stats.json").write_text(json.dumps(stats))
    return stats
