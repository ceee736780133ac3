"""Runs inside the vLLM venv (it has vllm and prometheus_client), called by tests/test_engine_metrics.py.

1. vLLM: real prometheus_client metrics named vllm:* in this process's default registry, read back by vLLM's
   own ``get_metrics_snapshot()`` (what ``LLM.get_metrics()`` returns), flattened by ``flatten_vllm``.
2. SGLang: metrics stored the way SGLang stores them with enable_metrics (prometheus_client multiprocess mode,
   PROMETHEUS_MULTIPROC_DIR set in this process before a child "scheduler" process writes them), read by
   ``SGLangEngine.metrics()``; and with enable_metrics off.
Prints one JSON object {"vllm": {...}, "sglang_on": {...}, "sglang_off": {...}}.
"""

import json
import multiprocessing as mp
import os
import sys
import tempfile


def scheduler(n_prompt_tokens: int) -> None:
    """A child process like SGLang's scheduler / tokenizer manager: metrics with SGLang's names and labels."""
    from prometheus_client import Counter, Gauge, Histogram

    labels = {"model_name": "tiny", "tp_rank": "0"}
    running = Gauge("sglang:num_running_reqs", "running", labelnames=list(labels), multiprocess_mode="mostrecent")
    running.labels(**labels).set(3)
    prompt = Counter("sglang:prompt_tokens", "prompt tokens", labelnames=["model_name"])
    prompt.labels(model_name="tiny").inc(n_prompt_tokens)
    latency = Histogram("sglang:e2e_request_latency_seconds", "latency", labelnames=["model_name"],
                        buckets=[0.1, 1.0])
    for v in (0.05, 0.5, 2.0):
        latency.labels(model_name="tiny").observe(v)


def vllm_part() -> dict:
    from prometheus_client import Counter, Gauge, Histogram
    from vllm.v1.metrics.reader import get_metrics_snapshot

    from torchspec.inference.engine_metrics import flatten_vllm

    labels = {"model_name": "tiny", "engine": "0"}
    Gauge("vllm:num_requests_running", "", labelnames=list(labels)).labels(**labels).set(2)
    Counter("vllm:prompt_tokens", "", labelnames=list(labels)).labels(**labels).inc(148)
    h = Histogram("vllm:e2e_request_latency_seconds", "", labelnames=list(labels), buckets=[1.0])
    h.labels(**labels).observe(0.25)
    h.labels(**labels).observe(1.5)
    pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos", "", labelnames=[*labels, "position"])
    pos.labels(position="0", **labels).inc(5)
    pos.labels(position="1", **labels).inc(2)
    snapshot = get_metrics_snapshot()
    return {"types": sorted({type(m).__name__ for m in snapshot}), "flat": flatten_vllm(snapshot)}


def sglang_part(enable: bool) -> dict:
    from torchspec.inference.sglang import SGLangEngine

    engine = SGLangEngine(llm=object(), store=None, aux_layers=[0, 1, 2], hidden_size=8, enable_metrics=enable)
    return engine.metrics()


if __name__ == "__main__":
    out = {"vllm": vllm_part()}
    # as sgl.Engine's set_prometheus_multiproc_dir does, before its children start
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sgl-prom-")
    child = mp.get_context("spawn").Process(target=scheduler, args=(57,))
    child.start()
    child.join()
    assert child.exitcode == 0
    out["sglang_on"] = sglang_part(True)
    out["sglang_off"] = sglang_part(False)
    print(json.dumps(out))
    sys.stdout.flush()
