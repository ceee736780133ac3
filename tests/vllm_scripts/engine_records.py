"""Runs inside the vLLM venv (scripts/setup_vllm.sh), called by tests/test_vllm_engine.py via subprocess.

Builds the hf engine and the vllm engine (torchspec/inference/vllm.py) on the same target and runs
both over the same samples, in one batch each; saves every record for the test to compare.

  python engine_records.py SPEC.json OUT.pt
SPEC: {"target": DIR, "work": DIR, "samples": [{"id", "input_ids", "loss_mask"}...],
       "vllm_aux_layers": [k...], "hf_aux_layers": [[k...]...], "extra_args": {...}, "max_seq_length": N,
       "tp_size": 1 (> 1: vLLM's CPU workers, one per core: VLLM_CPU_OMP_THREADS_BIND "0|1|...")}
OUT:  {"vllm": {id: record}, "hf": [{id: record} per hf_aux_layers entry], "warnings": [str],
       "seconds": {"vllm_start", "vllm_generate", "hf"}}
"""

import json
import logging
import os
import sys
import time


def records(engine, store, samples) -> dict:
    stored = engine.generate(samples)
    assert [s.sample_id for s in stored] == [s.sample_id for s in samples]
    out = {}
    for s in stored:
        out[s.sample_id] = {k: v.clone() for k, v in store.get(s.key).items()}  # own storage each
        store.delete(s.key)
    assert store.bytes_used() == 0
    return out


def main(spec_path: str, out_path: str) -> None:
    import torch

    from torchspec.config.schema import Config
    from torchspec.data.sample import Sample
    from torchspec.inference.factory import build_engine
    from torchspec.inference.hf import HFEngine, load_target
    from torchspec.transfer.local import LocalStore

    spec = json.load(open(spec_path))
    samples = [Sample(d["id"], torch.tensor(d["input_ids"]), torch.tensor(d["loss_mask"], dtype=torch.uint8))
               for d in spec["samples"]]
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("torchspec.inference.vllm").addHandler(Collect(logging.WARNING))

    cfg = Config()
    cfg.model.target_model_path = spec["target"]
    cfg.inference.inference_engine_type = "vllm"
    cfg.inference.aux_hidden_states_layers = spec["vllm_aux_layers"]
    cfg.inference.vllm.extra_args = spec["extra_args"]
    cfg.training.max_seq_length = spec["max_seq_length"]
    tp = cfg.inference.vllm.tp_size = spec.get("tp_size", 1)
    if tp > 1:   # one NUMA node here: vLLM cannot bind its CPU workers' threads by itself
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(tp)))
    store = LocalStore(root=os.path.join(spec["work"], "store"))
    t0 = time.perf_counter()
    engine = build_engine(cfg, store, device="cpu")   # the factory's path for inference_engine_type=vllm
    t1 = time.perf_counter()
    got_vllm = records(engine, store, samples)
    t2 = time.perf_counter()
    engine.close()

    model = load_target(spec["target"], torch.float32, "cpu")
    t3 = time.perf_counter()
    got_hf = []
    for layers in spec["hf_aux_layers"]:
        hf = HFEngine(model, store, aux_layers=layers, batch_size=len(samples))
        got_hf.append(records(hf, store, samples))
        hf.close()
    t4 = time.perf_counter()
    torch.save({"vllm": got_vllm, "hf": got_hf, "warnings": warnings,
                "seconds": {"vllm_start": t1 - t0, "vllm_generate": t2 - t1, "hf": t4 - t3}}, out_path)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main(sys.argv[1], sys.argv[2])
