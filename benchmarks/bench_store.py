"""Local store put/get bandwidth for hidden-state records (Qwen3-8B-sized: T tokens x (3H + H) bf16).

Compares LocalStore.put (file write; device tensors through a pinned staging buffer) with a
reference that copies straight into a fresh shared mapping of the file (page faults on first touch),
in the same process on the same machine, and times get + collate-style copy out.
With --store mooncake it measures the same put / get + copy out through a Mooncake store (a master
started on 127.0.0.1, TCP) and the local store, one after the other in the same run.

    python benchmarks/bench_store.py [--tokens 2048 --hidden 4096 --reps 8] [--store mooncake]
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


def put_get_gbs(store, rec: dict, nbytes: int, reps: int) -> tuple[float, float]:
    """(median put GB/s, get + copy out GB/s) of `reps` records through `store`."""
    store.put("warm", rec)
    store.delete("warm")
    times = []
    for i in range(reps):
        t0 = time.perf_counter()
        store.put(f"k{i}", rec)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(reps):
        _ = {k: v.clone() for k, v in store.get(f"k{i}").items()}
        store.delete(f"k{i}")
    get_gbs = nbytes * reps / (time.perf_counter() - t0) / 1e9
    return nbytes / sorted(times)[len(times) // 2] / 1e9, get_gbs


def compare_mooncake(rec: dict, nbytes: int, reps: int) -> None:
    from torchspec.transfer.mooncake import MooncakeSettings, MooncakeStore

    segment = max(16 << 20, (reps + 2) * (nbytes + (1 << 20)))
    res = {}
    for name, make in (("local", LocalStore),
                       ("mooncake", lambda: MooncakeStore(MooncakeSettings(global_segment_size=segment,
                                                                           local_buffer_size=2 * nbytes + (8 << 20))))):
        store = make()
        try:
            res[name] = put_get_gbs(store, rec, nbytes, reps)
        finally:
            store.close()
    dev = next(iter(rec.values())).device
    print(f"[store] {dev} ({os.cpu_count()} cores), record {nbytes / 1e6:.1f} MB; "
          + "; ".join(f"{n}: put {p * 1e3:.0f} MB/s, get + copy out {g * 1e3:.0f} MB/s" for n, (p, g) in res.items())
          + f"; mooncake/local put {res['mooncake'][0] / res['local'][0]:.2f}x, "
          f"get {res['mooncake'][1] / res['local'][1]:.2f}x; median of {reps} puts")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--store", choices=("local", "mooncake"), default="local",
                   help="mooncake: compare a Mooncake store (master on 127.0.0.1, TCP) with the local store")
    args = p.parse_args(argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    T, H = args.tokens, args.hidden
    rec = {"input_ids": torch.arange(T, device=dev), "loss_mask": torch.ones(T, dtype=torch.uint8, device=dev),
           "aux_hidden_states": torch.randn(T, 3 * H, device=dev).bfloat16(),
           "final_hidden_states": torch.randn(T, H, device=dev).bfloat16()}
    nbytes = sum(t.numel() * t.element_size() for t in rec.values())
    if args.store == "mooncake":
        compare_mooncake(rec, nbytes, args.reps)
        return 0
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
