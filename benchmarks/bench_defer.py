"""dataset.defer_tokenization: the driver's time to the first optimizer step, its peak RSS and its CPU seconds over
a short run, on generated conversations with a tiny target and one engine process on CPU.

    python benchmarks/bench_defer.py --n 4000 --steps 30 [--defer] [--engines 1] --work /tmp/bench-defer

Run it once per mode (and with PYTHONPATH pointing at another checkout for a before/after); every run builds its
own output folder, and the tiny target is made once in --work.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def conversations(n: int):
    for i in range(n):
        yield {"messages": [
            {"role": "user", "content": f"Question {i}: how do I sort a list of {i % 97} items in Python, by key?"},
            {"role": "assistant", "content": f"Use sorted(items, key=lambda x: x[{i % 7}]) -- case {i}. " * 3}]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--defer", action="store_true")
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--work", default="/tmp/bench-defer")
    a = ap.parse_args()
    t_start = time.monotonic()
    from torchspec.config.schema import Config
    from torchspec.pipeline.runner import run_training
    from torchspec.utils.tiny import make_tiny_target, train_tokenizer

    work = Path(a.work)
    target = work / "target"
    if not (target / "config.json").is_file():
        target.mkdir(parents=True, exist_ok=True)
        make_tiny_target(target, arch="qwen3", tokenizer=train_tokenizer(work / "tok", vocab_size=512))
    data = work / f"conv-{a.n}.jsonl"
    if not data.is_file():
        data.write_text("".join(json.dumps(c) + "\n" for c in conversations(a.n)))
    run = work / f"run-{'defer' if a.defer else 'upfront'}-{time.time_ns()}"
    cfg = Config()
    cfg.model.target_model_path = str(target)
    cfg.dataset.train_data_path = str(data)
    cfg.dataset.prompt_key = "messages"
    cfg.dataset.num_proc = 1
    cfg.dataset.defer_tokenization = a.defer
    t = cfg.training
    t.micro_batch_size, t.num_train_steps, t.ttt_length, t.max_seq_length = 4, a.steps, 2, 128
    t.save_interval = 10 ** 6
    i = cfg.inference
    i.colocate = a.engines == 0
    i.inference_num_gpus = max(a.engines, 1)
    i.inference_batch_size, i.inference_buffer_threshold, i.max_sample_pool_size = 8, 2, 32
    cfg.output_dir, cfg.cache_dir = str(run / "out"), str(run / "cache")
    first = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    def on_step(step, record):
        if not first:
            first.append((time.monotonic() - t_start, resource.getrusage(resource.RUSAGE_SELF)))

    t0 = time.monotonic()
    run_training(cfg, on_step=on_step, progress=False)
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = lambda r: r.ru_utime + r.ru_stime   # noqa: E731
    print(json.dumps({"defer": a.defer, "n": a.n, "steps": a.steps, "engines": a.engines,
                      "first_step_s": round(first[0][0], 2), "run_s": round(time.monotonic() - t0, 2),
                      "driver_peak_rss_mib": round(end.ru_maxrss / 1024, 1),
                      "driver_cpu_s_after_first_step": round(cpu(end) - cpu(first[0][1]), 2),
                      "driver_cpu_s_total": round(cpu(end) - cpu(cpu0), 2)}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
