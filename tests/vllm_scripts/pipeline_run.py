"""Runs inside the vLLM venv (scripts/setup_vllm.sh), called by tests/test_vllm_engine.py via subprocess.

Short torchspec training runs (tests/pipeline_helpers.py tiny_run_config), one per engine type
(inference.inference_engine_type: vllm, hf), same config otherwise; writes what each run did as JSON.

  python pipeline_run.py SPEC.json OUT.json
SPEC: {"target": DIR, "work": DIR, "engines": 0 (colocated) or k (engine processes), "num_epochs": N,
       "engine_types": ["vllm", "hf"], "tp_size": 1 (> 1: vLLM's CPU workers started by the engine process)}
OUT:  {"sample_ids": [...], "runs": {engine type: {"trained": [[step, epoch, id]...], "global_step",
       "store_bytes_end", "interrupted", "losses": [...], "seconds", "steps": metrics.jsonl's lines}}}
"""

import json
import os
import sys
import time
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/ (pipeline_helpers)
    from pipeline_helpers import tiny_run_config

    from torchspec.data.dataset import from_config, load_tokenizer
    from torchspec.pipeline.runner import run_training

    spec = json.load(open(spec_path))
    runs = {}
    for kind in spec["engine_types"]:
        cfg = tiny_run_config(Path(spec["work"]) / kind, spec["target"], engines=spec["engines"],
                              num_epochs=spec["num_epochs"])
        cfg.inference.inference_engine_type = kind
        if kind == "vllm" and spec.get("tp_size", 1) > 1:   # the engine process starts vLLM's CPU workers
            cfg.inference.vllm.tp_size = spec["tp_size"]
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(spec["tp_size"])))
        t0 = time.perf_counter()
        result = run_training(cfg, progress=False)
        runs[kind] = {"trained": [list(t) for t in result.trained], "global_step": result.global_step,
                      "store_bytes_end": result.store_bytes_end, "interrupted": result.interrupted,
                      "losses": [loss for _, loss in result.losses], "seconds": time.perf_counter() - t0,
                      "steps": [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").open()]}
    ids = [s.sample_id for s in from_config(cfg, load_tokenizer(cfg), progress=False)]
    json.dump({"sample_ids": ids, "runs": runs}, open(out_path, "w"))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main(sys.argv[1], sys.argv[2])
