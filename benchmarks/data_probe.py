"""One dataset build in a fresh process, measured: what a run does before its first step.

    python benchmarks/data_probe.py DATA.jsonl TOKENIZER_DIR CACHE_DIR [--defer] [--num-proc N] [--fetch N]

build_dataset -> the draft vocabulary (vocab_map_for, as the runner) -> the first fetch of `--fetch`
samples (as the controller takes them). Prints one JSON line: seconds to that point, the process's peak
RSS and its RSS before the build (MiB), the largest worker's peak RSS, the peak PSS of this process and
its workers together (sampled every 0.2 s from /proc/*/smaps_rollup; shared pages counted once), and the
sample count. Uses only the public torchspec.data API, so it measures an older checkout too
(bench_tokenize.py --before).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import threading
import time


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pss_mib(pid) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:   # a worker that just ended
        pass
    return 0.0


def children(pid) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
        except OSError:
            pass
    return out


class PssPeak(threading.Thread):
    """The largest PSS of this process plus its child processes seen so far (sampled)."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.peak, self.done = every, 0.0, threading.Event()

    def run(self):
        me = os.getpid()
        while not self.done.wait(self.every):
            self.peak = max(self.peak, pss_mib(me) + sum(pss_mib(c) for c in children(me)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("tokenizer")
    ap.add_argument("cache")
    ap.add_argument("--defer", action="store_true")
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--fetch", type=int, default=8)
    ap.add_argument("--draft-vocab-size", type=int, default=256)
    ap.add_argument("--chat-template", default="qwen")
    ap.add_argument("--prompt-key", default="conversations")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch  # noqa: F401  (imported before the baseline, as in a run)
    from transformers import AutoTokenizer

    from torchspec.data import build_dataset, vocab_map_for

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    base = rss_mib()
    pss = PssPeak()
    pss.start()
    t0 = time.perf_counter()
    ds = build_dataset(args.data, tok, chat_template=args.chat_template, max_seq_length=4096,
                       prompt_key=args.prompt_key, cache_dir=args.cache, defer_tokenization=args.defer,
                       num_proc=args.num_proc, progress=False)
    vocab_map_for(ds, len(tok), args.draft_vocab_size)
    idx = list(range(min(args.fetch, len(ds))))
    first = ds.take(idx) if hasattr(ds, "take") else [ds[i] for i in idx]
    seconds = time.perf_counter() - t0
    pss.done.set()
    pss.join()
    assert len(first) == len(idx)
    print(json.dumps({"seconds": round(seconds, 3), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "base_mib": base, "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                      "pss_peak_mib": round(pss.peak, 1),
                      "samples": len(ds)}))


if __name__ == "__main__":
    main()
