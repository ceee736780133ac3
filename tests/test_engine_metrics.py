"""Engine metrics (torchspec/inference/engine_metrics.py) reach the run's logger as engine<i>/<name>.

- hf: its built-in counters, end to end through run_training, colocated (InlineEngines) and in an engine
  process (ProcessEngines: carried with the results); an engine without metrics() adds no key.
- vLLM / SGLang: the flattening against stand-ins of vLLM's reader classes (vllm/v1/metrics/reader.py) and of
  prometheus_client's metric families; against the REAL vLLM reader and prometheus_client multiprocess files
  (as SGLang writes them with enable_metrics) in the vLLM venv (tests/vllm_scripts/engine_metrics.py).
  The vLLM engine's metrics through a whole run: tests/test_vllm_engine.py (pipeline test).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline_helpers import tiny_run_config
from torchspec.inference.engine_metrics import (MetricsPoll, flatten_prometheus, flatten_vllm, metric_key,
                                                step_metrics)
from torchspec.pipeline.runner import run_training

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = Path(os.environ.get("VLLM_PYTHON")
               or Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python")


# -- stand-ins: vLLM's reader classes (v0.32 vllm/v1/metrics/reader.py), prometheus_client's families ----------

@dataclass
class _Metric:
    name: str
    labels: dict


@dataclass
class _Counter(_Metric):
    value: int


@dataclass
class _Gauge(_Metric):
    value: float


@dataclass
class _Histogram(_Metric):
    count: int
    sum: float
    buckets: dict


@dataclass
class _Vector(_Metric):
    values: list


Sample = namedtuple("Sample", "name labels value timestamp exemplar", defaults=(None, None))
Family = namedtuple("Family", "name documentation type samples")


def test_flatten_vllm_metrics():
    ids = {"model_name": "m", "engine": "0"}
    flat = flatten_vllm([
        _Gauge("vllm:num_requests_running", ids, 2.0),
        _Counter("vllm:prompt_tokens", ids, 148),
        _Histogram("vllm:e2e_request_latency_seconds", ids, 3, 1.5, {"1.0": 2, "+Inf": 3}),
        _Vector("vllm:spec_decode_num_accepted_tokens_per_pos", ids, [5, 2]),
        _Gauge("vllm:kv_cache_usage_perc", {**ids, "finished_reason": "stop"}, float("nan")),   # dropped
    ])
    assert flat == {"vllm:num_requests_running": 2.0, "vllm:prompt_tokens": 148.0,
                    "vllm:e2e_request_latency_seconds_count": 3.0, "vllm:e2e_request_latency_seconds_sum": 1.5,
                    "vllm:spec_decode_num_accepted_tokens_per_pos{position=0}": 5.0,
                    "vllm:spec_decode_num_accepted_tokens_per_pos{position=1}": 2.0}


def test_flatten_prometheus_families():
    fams = [
        Family("sglang:num_running_reqs", "", "gauge",
               [Sample("sglang:num_running_reqs", {"model_name": "m", "tp_rank": "0"}, 3.0),
                Sample("sglang:num_running_reqs", {"model_name": "m", "tp_rank": "1"}, 4.0)]),
        Family("sglang:prompt_tokens", "", "counter",
               [Sample("sglang:prompt_tokens_total", {"model_name": "m"}, 57.0),
                Sample("sglang:prompt_tokens_created", {"model_name": "m"}, 1.7e9)]),
        # multiprocess "all" mode: one sample per process (pid label), summed over them
        Family("sglang:num_retracted_reqs", "", "gauge",
               [Sample("sglang:num_retracted_reqs", {"pid": "11"}, 1.0),
                Sample("sglang:num_retracted_reqs", {"pid": "12"}, 2.0)]),
        Family("sglang:e2e_request_latency_seconds", "", "histogram",
               [Sample("sglang:e2e_request_latency_seconds_bucket", {"le": "1.0"}, 2.0),
                Sample("sglang:e2e_request_latency_seconds_count", {}, 3.0),
                Sample("sglang:e2e_request_latency_seconds_sum", {}, 2.55)]),
        Family("vllm:other", "", "gauge", [Sample("vllm:other", {}, 1.0)]),   # not SGLang's: ignored
    ]
    assert flatten_prometheus(fams, "sglang:") == {
        "sglang:num_running_reqs{tp_rank=0}": 3.0, "sglang:num_running_reqs{tp_rank=1}": 4.0,
        "sglang:prompt_tokens": 57.0, "sglang:num_retracted_reqs": 3.0,
        "sglang:e2e_request_latency_seconds_count": 3.0, "sglang:e2e_request_latency_seconds_sum": 2.55}


def test_names_and_polling():
    assert metric_key("a:b", {"tp_rank": 1, "model_name": "x", "dp": "0"}) == "a:b{dp=0,tp_rank=1}"
    assert step_metrics({1: {"x": 2}, 0: {"y": 1}}) == {"engine0/y": 1.0, "engine1/x": 2.0}

    class Engine:
        reads = 0

        def metrics(self):
            Engine.reads += 1
            return {"n": float(Engine.reads)}

    poll = MetricsPoll(Engine(), interval=3600)
    assert poll.due() == {"n": 1.0} and poll.due() is None and Engine.reads == 1   # at most once per interval
    assert MetricsPoll(object()).due() == {}   # an engine without metrics()


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PY.exists(), reason=f"no vLLM venv python at {VLLM_PY} (bash scripts/setup_vllm.sh)")
def test_real_vllm_reader_and_sglang_multiprocess_files():
    out = subprocess.run([str(VLLM_PY), str(ROOT / "tests" / "vllm_scripts" / "engine_metrics.py")],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["vllm"]["types"] == ["Counter", "Gauge", "Histogram", "Vector"]   # vLLM's own classes
    assert got["vllm"]["flat"] == {
        "vllm:num_requests_running": 2.0, "vllm:prompt_tokens": 148.0,
        "vllm:e2e_request_latency_seconds_count": 2.0, "vllm:e2e_request_latency_seconds_sum": 1.75,
        "vllm:spec_decode_num_accepted_tokens_per_pos{position=0}": 5.0,
        "vllm:spec_decode_num_accepted_tokens_per_pos{position=1}": 2.0}
    assert got["sglang_on"] == {"sglang:num_running_reqs{tp_rank=0}": 3.0, "sglang:prompt_tokens": 57.0,
                                "sglang:e2e_request_latency_seconds_count": 3.0,
                                "sglang:e2e_request_latency_seconds_sum": pytest.approx(2.55)}
    assert got["sglang_off"] == {}   # inference.sglang.enable_metrics false: nothing read, nothing logged


def test_sglang_metrics_off_reads_nothing():
    from torchspec.inference.sglang import SGLangEngine

    engine = SGLangEngine(llm=object(), store=None, aux_layers=[0, 1, 2], hidden_size=8, enable_metrics=False)
    assert engine.metrics() == {} and engine._registry is None


# -- end to end: the hf engine's counters in metrics.jsonl ---------------------------------------------------

def _step_lines(cfg) -> list[dict]:
    lines = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


@pytest.mark.parametrize("engines", [0, 1])   # colocated (InlineEngines) | one engine process (ProcessEngines)
def test_hf_engine_metrics_reach_metrics_jsonl(tmp_path, tiny_target_dir, engines):
    cfg = tiny_run_config(tmp_path, tiny_target_dir, n_conversations=6, engines=engines, num_epochs=1)
    result = run_training(cfg, progress=False)
    steps = _step_lines(cfg)
    assert len(steps) == result.global_step == 3
    keys = {"engine0/hf:forward_batches", "engine0/hf:forward_tokens", "engine0/hf:padded_tokens",
            "engine0/hf:forward_s", "engine0/hf:forward_tokens_per_s"}
    for line in steps:
        assert keys <= set(line) and not any(k.startswith("engine1/") for k in line)
    tokens = [line["engine0/hf:forward_tokens"] for line in steps]
    assert tokens == sorted(tokens) and 0 < tokens[-1] <= result.generated_tokens   # a counter of real tokens
    last = steps[-1]
    assert last["engine0/hf:padded_tokens"] >= last["engine0/hf:forward_tokens"]
    assert last["engine0/hf:forward_tokens_per_s"] == pytest.approx(
        last["engine0/hf:forward_tokens"] / last["engine0/hf:forward_s"], rel=1e-6)
    if engines == 0:   # read at each log step in this process: every token generated so far
        assert tokens[-1] == result.generated_tokens


def test_engine_without_metrics_adds_no_key(tmp_path, tiny_target_dir):
    from torchspec.inference.hf import HFEngine

    class Plain:   # the Engine protocol without the optional metrics()
        def __init__(self, store, device):
            self.inner = HFEngine.from_config(cfg, store, device)

        def generate(self, samples):
            return self.inner.generate(samples)

        def close(self):
            self.inner.close()

    cfg = tiny_run_config(tmp_path, tiny_target_dir, n_conversations=4, num_epochs=1)
    run_training(cfg, engine_factory=Plain, progress=False)
    assert not any(k.startswith("engine") for line in _step_lines(cfg) for k in line)
