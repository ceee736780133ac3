"""Runs inside the vLLM venv (scripts/setup_vllm.sh), called by tests/test_regenerate.py via subprocess.

Regeneration with inference_engine_type=vllm, the real path: the offline job (run_regeneration) builds the vLLM
generator itself (build_generator -> vllm.LLM), writes the JSONL and releases vLLM; then the same job with the hf
generator into another output_dir. Every generated reply's token ids are recorded on both sides.

  python regenerate_vllm.py SPEC.json OUT.json
SPEC: {"target": DIR, "work": DIR, "data": JSONL, "max_new_tokens": N, "batch_size": B, "max_seq_length": M}
OUT:  {"vllm": {"replies": [[ids]...], "lines": [JSONL lines], "counts": {...}, "seconds": s,
                "children_after": our child processes still alive (each waited for up to 30 s)}, "hf": {same}}
"""

import json
import multiprocessing
import os
import sys
import time


def run(spec: dict, engine: str) -> dict:
    from torchspec.config.loader import load_config
    from torchspec.data.dataset import load_tokenizer
    from torchspec.inference import regenerate_job

    out_dir = os.path.join(spec["work"], engine)
    cfg = load_config([], [f"model.target_model_path={spec['target']}", f"dataset.train_data_path={spec['data']}",
                           f"output_dir={out_dir}", f"inference.inference_engine_type={engine}",
                           "inference.vllm.mem_fraction_static=0.2",
                           f"training.max_seq_length={spec['max_seq_length']}",
                           f"dataset.generation.max_new_tokens={spec['max_new_tokens']}",
                           f"dataset.generation.batch_size={spec['batch_size']}"])
    tokenizer = load_tokenizer(cfg)
    replies = []
    built = regenerate_job.build_generator

    def recording(cfg, tokenizer, device="cpu"):   # the job's own generator, its replies recorded
        gen = built(cfg, tokenizer, device)

        def record(prompts, stop_ids, settings):
            out = gen(prompts, stop_ids, settings)
            replies.extend(c.token_ids for c in out)
            return out

        return _Proxy(gen, record)

    regenerate_job.build_generator = recording
    try:
        t0 = time.perf_counter()
        counts = regenerate_job.run_regeneration(cfg, tokenizer, device="cpu", progress=False)
        seconds = time.perf_counter() - t0
    finally:
        regenerate_job.build_generator = built
    with open(os.path.join(out_dir, "regenerated", os.path.basename(spec["data"]))) as f:
        lines = f.read().splitlines()
    for child in multiprocessing.active_children():   # vLLM's shutdown SIGKILLs a slow engine core: let it go
        child.join(timeout=30)
    return {"replies": replies, "lines": lines, "counts": counts, "seconds": seconds,
            "children_after": [f"{p.name} pid {p.pid}" for p in multiprocessing.active_children()]}


class _Proxy:
    """Calls `record`, forwards everything else (close, ...) to the generator."""

    def __init__(self, gen, record):
        self._gen, self._record = gen, record

    def __call__(self, *a):
        return self._record(*a)

    def __getattr__(self, name):
        return getattr(self._gen, name)


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    result = {"vllm": run(spec, "vllm"), "hf": run(spec, "hf")}

    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main(sys.argv[1], sys.argv[2])
