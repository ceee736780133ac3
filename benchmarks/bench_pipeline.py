"""End-to-end pipeline throughput on GPUs: random-weight Qwen3 target -> hf engine(s) -> local store -> trainer.

Builds a random-weight Qwen3 target (Qwen3-8B's layer shape by default; --layers scales it), a
byte-level tokenizer and synthetic long conversations from the Python standard library's sources,
then runs `run_training` with the local launcher and prints what the run measured:

  samples/s and tokens/s (steady state: the second half of the steps), trainer data-wait % (time
  the trainer waited for the controller), the store's put bandwidth (engine device -> shared
  memory), inference vs training capacity, pool sizes.

    python benchmarks/bench_pipeline.py --layers 36 --steps 60            # 1 engine GPU + 1 trainer GPU
    python benchmarks/bench_pipeline.py --colocate --layers 12 --steps 40  # one GPU shared
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))   # e2e_setup

import torch  # noqa: E402


def build_target(out: Path, args) -> None:
    from e2e_setup import TargetShape, build_target as build

    build(out, TargetShape(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, heads=args.heads,
                           kv_heads=args.kv_heads, head_dim=args.head_dim, vocab=args.vocab))


def build_data(path: Path, n: int, chars: int) -> None:
    from torchspec.utils.tiny import default_corpus

    text = "".join(default_corpus(n * chars + 10_000))
    with open(path, "w") as f:
        for i in range(n):
            chunk = text[i * chars:(i + 1) * chars]
            msgs = [{"role": "user", "content": "Continue this Python source:\n" + chunk[:200]},
                    {"role": "assistant", "content": chunk[200:]}]
            f.write(json.dumps({"id": f"c{i}", "messages": msgs}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/torchspec-bench")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=12288)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--attention", default="sdpa")
    p.add_argument("--inference-batch", type=int, default=8)
    p.add_argument("--pool", type=int, default=64)
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--trainer-gpus", type=int, default=1)
    p.add_argument("--colocate", action="store_true")
    args = p.parse_args(argv)

    from torchspec.config.schema import Config
    from torchspec.pipeline.runner import run_training

    out = Path(args.out)
    target = out / f"target-L{args.layers}-H{args.hidden}"
    build_target(target, args)
    data = out / f"data-{args.samples}-{args.seq_len}.jsonl"
    if not data.exists():
        build_data(data, args.samples, chars=int(args.seq_len * 4))

    cfg = Config()
    cfg.model.target_model_path = str(target)
    cfg.dataset.train_data_path = str(data)
    cfg.dataset.prompt_key = "messages"
    t = cfg.training
    t.micro_batch_size, t.ttt_length, t.max_seq_length = args.micro_batch, args.ttt, args.seq_len
    t.num_train_steps, t.save_interval, t.draft_vocab_size = args.steps, 10**9, args.draft_vocab
    t.attention_backend, t.learning_rate, t.training_num_gpus_per_node = args.attention, 1e-4, args.trainer_gpus
    i = cfg.inference
    i.colocate, i.inference_num_gpus = args.colocate, args.engines
    i.inference_batch_size, i.max_sample_pool_size = args.inference_batch, args.pool
    i.inference_buffer_threshold = 2 * args.inference_batch
    run_dir = out / ("run-colocated" if args.colocate else f"run-{args.engines}e{args.trainer_gpus}t")
    cfg.output_dir, cfg.cache_dir = str(run_dir), str(out / "cache")
    if (run_dir / "checkpoints").exists():
        import shutil
        shutil.rmtree(run_dir)

    t0 = time.time()
    r = run_training(cfg, progress=False)
    wall = time.time() - t0
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [x for x in recs if "loss" in x]
    half = recs[len(recs) // 2:]
    a, b = half[0], half[-1]
    span = b["elapsed_s"] - a["elapsed_s"]
    samples = (b["step"] - a["step"]) * args.micro_batch * args.trainer_gpus
    tokens_per_sample = r.trained_tokens / max(1, len(r.trained))
    wait = (b["data_wait_s"] - a["data_wait_s"]) / span
    print(json.dumps({
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count(),
        "layout": "colocated" if args.colocate else f"{args.engines} engine GPU(s) + {args.trainer_gpus} trainer GPU(s)",
        "target_layers": args.layers, "hidden": args.hidden, "seq_len_max": args.seq_len,
        "mean_tokens_per_sample": round(tokens_per_sample, 1),
        "steps": r.global_step, "wall_s": round(wall, 1), "run_s": round(r.elapsed_s, 1),
        "steady_samples_per_s": round(samples / span, 2),
        "steady_tokens_per_s": round(samples * tokens_per_sample / span, 0),
        "steady_step_s": round(span / (b["step"] - a["step"]), 3),
        "steady_data_wait_pct": round(100 * wait, 1),
        "whole_run_data_wait_pct": round(100 * r.data_wait_frac, 1),
        "whole_run_samples_per_s": round(r.samples_per_s, 2),
        "inference_capacity_samples_per_s": round(b["inference_samples_per_s"] or float("nan"), 2),
        "training_capacity_samples_per_s": round(b["training_samples_per_s"], 2),
        "store_put_GB": round(r.store_put_bytes / 1e9, 2),
        "store_put_GB_per_s": round(r.store_put_bytes / r.store_put_s / 1e9, 2) if r.store_put_s else None,
        "store_bytes_per_token": int(r.store_put_bytes / max(1, r.generated_tokens)),
        "pool_max": max(r.pool_sizes), "pool_median": statistics.median(r.pool_sizes),
        "store_bytes_end": r.store_bytes_end,
        "final_loss": recs[-1]["loss"], "first_loss": recs[0]["loss"], "acc_0": recs[-1].get("acc_0"),
    }, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
