"""Engine metrics: what an engine says about itself, as flat ``{name: float}`` for the run's logger.

An engine may have ``metrics() -> dict[str, float]`` (base.Engine): cumulative counters and current
gauges, cheap to read. The launchers read it in the engine's process (at most every
``METRICS_INTERVAL_S``), carry it to the driver with the generate results, and the runner logs the
latest of engine i under ``engine<i>/<name>`` at each log step.

Names. vLLM and SGLang keep Prometheus metrics; a sample becomes ``<metric name>`` plus, when it has
labels other than the ones that only name the engine or model (``IDENTITY_LABELS``), ``{k=v,...}`` (keys
sorted), e.g. ``vllm:num_requests_running``, ``sglang:num_running_reqs{tp_rank=0}``. A counter is its
running total (Prometheus' ``_total`` sample, named without the suffix); a histogram or summary gives
``<name>_count`` and ``<name>_sum`` (no buckets); vLLM's per-position vector ``<name>{position=i}``. Samples
that flatten to one name (one per process in Prometheus' multiprocess mode) are summed.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Mapping

# labels that only say which model / engine / process a sample is from: one engine, one model, here
IDENTITY_LABELS = frozenset({"model_name", "engine", "engine_type", "pid"})
METRICS_INTERVAL_S = 1.0   # an engine's metrics are read at most this often


def metric_key(name: str, labels: Mapping[str, Any] | None = None) -> str:
    kept = sorted((str(k), str(v)) for k, v in (labels or {}).items() if k not in IDENTITY_LABELS)
    return name + ("{" + ",".join(f"{k}={v}" for k, v in kept) + "}" if kept else "")


def _add(out: dict[str, float], key: str, value) -> None:
    value = float(value)
    if math.isfinite(value):
        out[key] = out.get(key, 0.0) + value


def flatten_vllm(metrics: Iterable) -> dict[str, float]:
    """vLLM's ``LLM.get_metrics()`` (vllm/v1/metrics/reader.py: Counter / Gauge with ``value``, Histogram with
    ``count``, ``sum``, ``buckets``, Vector with ``values``; each with ``name`` and ``labels``) -> numbers."""
    out: dict[str, float] = {}
    for m in metrics:
        labels = dict(getattr(m, "labels", None) or {})
        if hasattr(m, "buckets"):
            _add(out, metric_key(m.name + "_count", labels), m.count)
            _add(out, metric_key(m.name + "_sum", labels), m.sum)
        elif hasattr(m, "values"):
            for i, v in enumerate(m.values):
                _add(out, metric_key(m.name, {**labels, "position": i}), v)
        elif hasattr(m, "value"):
            _add(out, metric_key(m.name, labels), m.value)
    return out


def flatten_prometheus(families: Iterable, prefix: str) -> dict[str, float]:
    """prometheus_client metric families (``name``, ``type``, ``samples`` of ``name``/``labels``/``value``, as
    ``CollectorRegistry.collect()`` yields them) whose name starts with `prefix` -> numbers."""
    wanted = {"counter": ("_total",), "gauge": ("",), "histogram": ("_count", "_sum"), "summary": ("_count", "_sum")}
    out: dict[str, float] = {}
    for fam in families:
        if not fam.name.startswith(prefix) or fam.type not in wanted:
            continue
        for suffix in wanted[fam.type]:
            shown = fam.name + ("" if suffix == "_total" else suffix)
            for s in fam.samples:
                if s.name == fam.name + suffix:
                    _add(out, metric_key(shown, s.labels), s.value)
    return out


class ForwardCounters:
    """Running totals of an engine's own target forwards, as ``<engine>:<name>`` metrics: forward batches,
    real tokens, (with `padded`) tokens computed including padding, seconds in the forward, and real tokens
    per forward second. The engines whose forward we drive (hf; sgl's ModelRunner path) report these."""

    def __init__(self, engine: str, padded: bool = False):
        self.engine = engine
        self.totals = {"forward_batches": 0, "forward_tokens": 0, **({"padded_tokens": 0} if padded else {}),
                       "forward_s": 0.0}

    def add(self, tokens: int, seconds: float, padded_tokens: int | None = None) -> None:
        t = self.totals
        t["forward_batches"] += 1
        t["forward_tokens"] += int(tokens)
        if "padded_tokens" in t:
            t["padded_tokens"] += int(tokens if padded_tokens is None else padded_tokens)
        t["forward_s"] += float(seconds)

    def metrics(self) -> dict[str, float]:
        t, e = self.totals, self.engine
        rate = t["forward_tokens"] / t["forward_s"] if t["forward_s"] else 0.0
        return {**{f"{e}:{k}": float(v) for k, v in t.items()}, f"{e}:forward_tokens_per_s": rate}


def engine_metrics(engine) -> dict[str, float]:
    """The engine's metrics, or {} for an engine without any."""
    read = getattr(engine, "metrics", None)
    return dict(read()) if callable(read) else {}


class MetricsPoll:
    """Reads an engine's metrics in its own process at most every `interval` seconds (`due()` -> the dict to
    send with a result, else None), so a fast generate loop does not pay for them on every call."""

    def __init__(self, engine, interval: float = METRICS_INTERVAL_S):
        self.engine, self.interval, self.last = engine, float(interval), -math.inf

    def due(self) -> dict[str, float] | None:
        now = time.monotonic()
        if now - self.last < self.interval:
            return None
        self.last = now
        return engine_metrics(self.engine)


def step_metrics(latest: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """{worker: metrics} -> the step record's ``engine<i>/<name>`` keys."""
    return {f"engine{w}/{k}": float(v) for w in sorted(latest) for k, v in latest[w].items()}
