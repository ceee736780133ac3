"""Throughput of the conversation pipeline: N synthetic conversations -> samples (CPU only).

    python benchmarks/bench_tokenize.py [--n 20000] [--num-proc 1 2] [--vocab-size 8192]
    python benchmarks/bench_tokenize.py --compare 20000 200000 [--before main] [--num-proc 2]

Conversations are cut from the Python standard library's sources (user turns ask about a snippet,
assistant turns answer with code), 1-3 turns each, written as ShareGPT JSONL. For every
--num-proc value it times a cold build (load + render + tokenize + mask + cache write), then a
warm build of the same input (cache hit). Prints conversations/s and tokens/s (wall clock), and
tokens per CPU-second (this process + its workers), which a busy shared machine distorts less.

--compare N...: for each size, eager and defer_tokenization, each in a fresh process
(benchmarks/data_probe.py): seconds until the first fetch of samples (build + draft vocabulary + first
take) and peak RSS, for this checkout and, with --before REV, for the torchspec of git revision REV
(extracted with git archive) in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchspec.data import build_dataset  # noqa: E402
from torchspec.utils.tiny import default_corpus, train_tokenizer  # noqa: E402


def synthetic(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    lines = [ln for text in default_corpus(3_000_000) for ln in text.splitlines() if ln.strip()]

    def snippet(k):
        i = rng.randrange(len(lines) - k)
        return "\n".join(lines[i:i + k])

    out = []
    for _ in range(n):
        turns = [{"from": "system", "value": "You are a helpful coding assistant."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            turns.append({"from": "human", "value": f"What does this code do?\n{snippet(rng.randint(2, 8))}"})
            turns.append({"from": "gpt", "value": f"It is equivalent to:\n```python\n{snippet(rng.randint(5, 30))}\n```"})
        out.append({"conversations": turns})
    return out


def cpu_seconds() -> float:
    """CPU time of this process and its finished workers (the machine may be shared: wall time is not all ours)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


ROOT = Path(__file__).resolve().parents[1]


def compare(args, tmp: Path, tok_dir: Path):
    trees = {"now": ROOT}
    if args.before:
        old = tmp / "before"
        old.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "torchspec"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees = {f"before ({args.before})": old, **trees}
    print(f"{'conversations':>13} {'mode':>6} {'code':>14} {'first fetch s':>13} {'peak RSS MiB':>12} "
          f"{'above start':>11} {'worker peak':>11}")
    for n in args.compare:
        data = tmp / f"conv{n}.jsonl"
        with open(data, "w") as fh:
            for rec in synthetic(n):
                fh.write(json.dumps(rec) + "\n")
        for mode in ("eager", "defer"):
            for name, tree in trees.items():
                cmd = [sys.executable, str(ROOT / "benchmarks" / "data_probe.py"), str(data), str(tok_dir),
                       str(tmp / f"cache-{n}-{mode}-{tree.name}"), "--num-proc", str(args.num_proc[-1])]
                out = subprocess.run(cmd + (["--defer"] if mode == "defer" else []), capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": str(tree)})
                if out.returncode:
                    print(f"{n:>13} {mode:>6} {name:>14} failed: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{n:>13} {mode:>6} {name:>14} {r['seconds']:>13.1f} {r['peak_mib']:>12.0f} "
                      f"{r['peak_mib'] - r['base_mib']:>11.0f} {r['worker_peak_mib']:>11.0f}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", type=int, nargs="+", help="dataset sizes: time to first fetch and peak RSS")
    ap.add_argument("--before", help="a git revision to measure too (with --compare), e.g. main")
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--chat-template", default="qwen")
    ap.add_argument("--max-seq-length", type=int, default=4096)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tok = train_tokenizer(tmp / "tok", vocab_size=args.vocab_size)
        if args.compare:
            print(f"setup: tokenizer (vocab {len(tok)}); cpu cores: {os.cpu_count()}")
            return compare(args, tmp, tmp / "tok")
        data = tmp / "conversations.jsonl"
        with open(data, "w") as fh:
            for rec in synthetic(args.n):
                fh.write(json.dumps(rec) + "\n")
        print(f"setup: tokenizer (vocab {len(tok)}) + {args.n} conversations "
              f"({data.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s; cpu cores: {os.cpu_count()}")
        for num_proc in args.num_proc:
            cache = tmp / f"cache{num_proc}"
            kw = dict(chat_template=args.chat_template, max_seq_length=args.max_seq_length,
                      prompt_key="conversations", cache_dir=cache, num_proc=num_proc, progress=False)
            t0, c0 = time.perf_counter(), cpu_seconds()
            ds = build_dataset(data, tok, **kw)
            cold, cpu = time.perf_counter() - t0, cpu_seconds() - c0
            t0 = time.perf_counter()
            again = build_dataset(data, tok, **kw)
            warm = time.perf_counter() - t0
            assert len(again) == len(ds)
            st = ds.stats
            print(f"num_proc={num_proc}: cold {cold:.2f}s = {st.conversations / cold:,.0f} conv/s, "
                  f"{st.tokens / cold:,.0f} tokens/s (tokenize step alone {st.seconds:.2f}s; "
                  f"{cpu:.1f} CPU-s = {st.tokens / cpu:,.0f} tokens per CPU-s); "
                  f"{st.kept} samples, {st.tokens:,} tokens, {st.truncated} truncated, "
                  f"{st.dropped_no_supervised} dropped | cache hit {warm:.2f}s ({cold / warm:.0f}x faster)")


if __name__ == "__main__":
    main()
