"""A training report people can look at: PNG plots from `metrics.jsonl` plus a short markdown summary.

    python -m torchspec.eval.report RUN_DIR [--out DIR]

writes RUN_DIR/report/ (or DIR): loss.png, accuracy.png (acc_k per TTT step), lr.png, throughput.png,
tau.png (when tau was measured) and report.md (config digest, hardware, final and best metrics).
The runner calls `write_report(output_dir)` at the end of a run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import re
import sys
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "resolved_config.yaml"
EVAL_PREFIX = "eval/"
BEST_FILE = "eval_best.json"

# Config keys worth a line in the summary (dotted paths into the resolved config).
DIGEST_KEYS = ("model.target_model_path", "model.draft_model_config", "dataset.train_data_path",
               "dataset.eval_data_path", "dataset.chat_template", "training.learning_rate",
               "training.micro_batch_size", "training.draft_accumulation_steps", "training.ttt_length",
               "training.max_seq_length", "training.draft_vocab_size", "training.attention_backend",
               "training.num_epochs", "training.num_train_steps", "inference.inference_engine_type",
               "inference.aux_hidden_states_layers")


class ReportError(ValueError):
    pass


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (a torn last line from a killed run is skipped)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ReportError(f"{path}: no metrics file (is {run_dir} a torchspec run's output_dir?)")
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                continue
            raise ReportError(f"{path} line {i}: not valid JSON") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ReportError(f"{path} line {i}: a record needs a 'step' key")
        records.append(rec)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every record carrying a finite number under `key`, in step order (records
    appended later for an earlier step, e.g. a baseline eval logged after the run, fall into place)."""
    pts = []
    for i, r in enumerate(records):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            pts.append((int(r["step"]), i, float(v)))
    pts.sort()
    return [p[0] for p in pts], [p[2] for p in pts]


def _acc_steps(records: list[dict], prefix: str = "") -> list[int]:
    pat = re.compile(re.escape(prefix) + r"acc_(\d+)$")
    return sorted({int(m.group(1)) for r in records for k in r if (m := pat.match(k))})


def _plot(path: Path, title: str, ylabel: str, lines: list[tuple[str, list[int], list[float], dict]],
          logy: bool = False) -> Path | None:
    lines = [ln for ln in lines if ln[1]]
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for label, xs, ys, style in lines:
        ax.plot(xs, ys, label=label, **style)
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ys_all = [y for _, _, ys, _ in lines for y in ys]
    if logy and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 10:  # log only when it spans a decade
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(lines) > 4 else 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def make_plots(records: list[dict], out_dir: Path) -> dict[str, Path]:
    """Write the PNGs; returns {name: path} for those that had data."""
    import matplotlib

    matplotlib.use("Agg")
    cmap = matplotlib.colormaps["viridis"]
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = {"marker": "o", "markersize": 3}
    made = {}
    made["loss"] = _plot(out_dir / "loss.png", "Loss (sum_k 0.8^k loss_k)", "loss", [
        ("train", *series(records, "loss"), {}),
        ("eval", *series(records, EVAL_PREFIX + "loss"), {"linestyle": "--", **marker})], logy=True)
    steps = sorted(set(_acc_steps(records)) | set(_acc_steps(records, EVAL_PREFIX)))
    acc_lines = []
    for k in steps:
        color = cmap(k / max(1, len(steps) - 1) * 0.9)
        acc_lines.append((f"acc_{k}", *series(records, f"acc_{k}"), {"color": color}))
        acc_lines.append((f"eval acc_{k}", *series(records, f"{EVAL_PREFIX}acc_{k}"),
                          {"color": color, "linestyle": "--", **marker}))
    made["accuracy"] = _plot(out_dir / "accuracy.png", "Top-1 accuracy per TTT step", "accuracy", acc_lines)
    made["lr"] = _plot(out_dir / "lr.png", "Learning rate", "lr", [("lr", *series(records, "lr"), {})])
    made["throughput"] = _plot(out_dir / "throughput.png", "Throughput", "samples / s", [
        ("trained samples/s", *series(records, "samples_per_s"), {}),
        ("inference capacity", *series(records, "inference_samples_per_s"), {"linestyle": ":"}),
        ("training capacity", *series(records, "training_samples_per_s"), {"linestyle": "--"})])
    made["tau"] = _plot(out_dir / "tau.png", "Acceptance length tau (held-out prompts)", "tokens / target forward",
                        [("eval tau", *series(records, EVAL_PREFIX + "tau"), marker)])
    return {k: v for k, v in made.items() if v is not None}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_digest(run_dir: Path) -> tuple[str | None, dict]:
    """(sha256[:12] of the resolved config file, {dotted key: value} of DIGEST_KEYS) or (None, {})."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None, {}
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:12]
    try:
        import yaml

        flat = _flatten(yaml.safe_load(raw) or {})
    except Exception:  # a digest still identifies the config even if it does not parse here
        return digest, {}
    return digest, {k: flat[k] for k in DIGEST_KEYS if k in flat}


def hardware() -> str:
    import torch

    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}",
             f"{platform.system()} {platform.machine()}"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        parts.append(f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names))
    else:
        import os

        parts.append(f"CPU only ({os.cpu_count()} cores)")
    return ", ".join(parts)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_markdown(run_dir: Path, records: list[dict], plots: dict[str, Path], out_dir: Path) -> str:
    train = [r for r in records if not any(k.startswith(EVAL_PREFIX) for k in r)]
    evals = [r for r in records if any(k.startswith(EVAL_PREFIX) for k in r)]
    lines = [f"# Training report: {run_dir.resolve().name}", ""]
    digest, keys = config_digest(run_dir)
    lines.append("## Run")
    lines.append(f"- run dir: `{run_dir}`")
    lines.append(f"- config: `{CONFIG_FILE}` sha256 {digest}" if digest else f"- config: no `{CONFIG_FILE}` found")
    lines += [f"  - {k}: `{v}`" for k, v in keys.items()]
    lines.append(f"- hardware (where this report was made): {hardware()}")
    if train:
        t0, t1 = train[0].get("time"), train[-1].get("time")
        lines.append(f"- optimizer steps logged: {train[0]['step']}..{train[-1]['step']} ({len(train)} records)")
        if isinstance(t0, (int, float)) and isinstance(t1, (int, float)):
            lines.append(f"- wall time between first and last record: {t1 - t0:.1f} s")
    lines += ["", "## Final metrics"]
    if train:
        last = train[-1]
        keys_ = ["loss"] + [f"acc_{k}" for k in _acc_steps([last])] + ["lr", "samples_per_s"]
        lines.append("- last training step " + str(last["step"]) + ": "
                     + ", ".join(f"{k} {_fmt(last[k])}" for k in keys_ if k in last))
    if evals:
        last = max(evals, key=lambda r: r["step"])  # the latest step's last eval line
        shown = ["loss"] + [f"acc_{k}" for k in _acc_steps([last], EVAL_PREFIX)] + ["tau", "num_samples"]
        lines.append("- last eval (step " + str(last["step"]) + "): "
                     + ", ".join(f"{k} {_fmt(last[EVAL_PREFIX + k])}" for k in shown if EVAL_PREFIX + k in last))
        taus = series(evals, EVAL_PREFIX + "tau")
        if taus[0]:
            lines.append(f"- tau (held-out prompts): {_fmt(taus[1][0])} at step {taus[0][0]} -> "
                         f"{_fmt(taus[1][-1])} at step {taus[0][-1]}")
    best = run_dir / BEST_FILE
    if best.is_file():
        b = json.loads(best.read_text())
        lines.append(f"- best eval: step {b.get('step')} ({b.get('metric')} = {_fmt(b.get('value', b.get('score')))})"
                     + (f", checkpoint `{b['checkpoint']}`" if b.get("checkpoint") else ""))
    if not train and not evals:
        lines.append("- no metrics recorded")
    lines += ["", "## Plots", ""]
    for name, path in plots.items():
        lines.append(f"![{name}]({path.relative_to(out_dir)})")
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Plots + report.md for a run dir; returns the report.md path."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
    records = read_metrics(run_dir)
    plots = make_plots(records, out_dir)
    md = out_dir / "report.md"
    md.write_text(summary_markdown(run_dir, records, plots, out_dir))
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m torchspec.eval.report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", help="a training run's output_dir (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the report (default RUN_DIR/report)")
    args = p.parse_args(argv)
    try:
        md = write_report(args.run_dir, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
