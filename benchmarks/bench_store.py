"""Local store put/get bandwidth for hidden-state records (Qwen3-8B-sized: T tokens x (3H + H) bf16).

Compares LocalStore.put (file write; device tensors through a pinned staging buffer) with a
reference that copies straight into a fresh shared mapping of the file (page faults on first touch),
in the same process on the same machine, and times get + collate-style copy out.

    python benchmarks/bench_store.py [--tokens 2048 --hidden 4096 --reps 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from torchspec.transfer.local import LocalStore  # noqa: E402


def mapped_put(root: Path, key: str, tensors: dict) -> None:
    """Reference: allocate the file, map it shared, copy each tensor into the mapping."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    path = root / key
    with open(path, "wb") as f:
        f.truncate(total)
    buf = torch.from_file(str(path), shared=True, size=total, dtype=torch.uint8)
    off = 0
    for t in tensors.values():
        n = t.numel() * t.element_size()
        buf[off:off + n].copy_(t.contiguous().reshape(-1).view(torch.uint8))
        off += n
    del buf


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    T, H = args.tokens, args.hidden
    rec = {"input_ids": torch.arange(T, device=dev), "loss_mask": torch.ones(T, dtype=torch.uint8, device=dev),
           "aux_hidden_states": torch.randn(T, 3 * H, device=dev).bfloat16(),
           "final_hidden_states": torch.randn(T, H, device=dev).bfloat16()}
    nbytes = sum(t.numel() * t.element_size() for t in rec.values())
    store = LocalStore()
    ref_root = Path(tempfile.mkdtemp(prefix="torchspec-bench-ref-", dir=store.root.parent))
    res = {}
    for name, fn in (("store.put", lambda k: store.put(k, rec)), ("mapped copy", lambda k: mapped_put(ref_root, k, rec))):
        fn("warm")
        times = []
        for i in range(args.reps):
            if dev == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(f"k{i}")
            times.append(time.perf_counter() - t0)
        res[name] = nbytes / sorted(times)[len(times) // 2] / 1e9
    t0 = time.perf_counter()
    for i in range(args.reps):
        r = store.get(f"k{i}")
        _ = {k: v.clone() for k, v in r.items()}
    get_gbs = nbytes * args.reps / (time.perf_counter() - t0) / 1e9
    shutil.rmtree(ref_root)
    print(f"[store] {dev} ({torch.cuda.get_device_name(0) if dev == 'cuda' else os.cpu_count()} "
          f"{'' if dev == 'cuda' else 'cores'}), record {nbytes / 1e6:.1f} MB ({T} tokens, H={H}, bf16); "
          f"put from {dev}: store.put {res['store.put']:.2f} GB/s, mapped copy (reference) "
          f"{res['mapped copy']:.2f} GB/s; get + copy out {get_gbs:.2f} GB/s; median of {args.reps}")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
