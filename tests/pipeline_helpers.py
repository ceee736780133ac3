"""Shared set-up of the end-to-end pipeline tests: a tiny run config over a few real conversations."""

from __future__ import annotations

import collections
from pathlib import Path

from torchspec.config.schema import Config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data" / "python_chat_openai.jsonl"


def write_conversations(path: Path, n: int, skip: int = 0) -> Path:
    lines = EXAMPLES.read_text().splitlines()[skip:skip + n]
    assert len(lines) == n
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_run_config(tmp_path: Path, target_dir, *, n_conversations: int = 12, engines: int = 0,
                    n_eval: int = 0, **training) -> Config:
    """engines=0: single process (target colocated with the trainer); engines=k: k engine processes.
    n_eval > 0: that many other conversations held out for eval during training."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = Config()
    cfg.model.target_model_path = str(target_dir)
    cfg.dataset.train_data_path = str(write_conversations(tmp_path / "train.jsonl", n_conversations))
    cfg.dataset.prompt_key = "messages"
    cfg.dataset.num_proc = 1
    if n_eval:
        cfg.dataset.eval_data_path = str(write_conversations(tmp_path / "eval.jsonl", n_eval, skip=40))
        cfg.dataset.eval_max_samples = None
    t = cfg.training
    t.micro_batch_size = 2
    t.num_epochs = 2
    t.ttt_length = 2
    t.max_seq_length = 128
    t.learning_rate = 3e-3
    t.warmup_ratio = 0.0
    t.save_interval = 1000
    for k, v in training.items():
        setattr(t, k, v)
    i = cfg.inference
    i.colocate = engines == 0
    i.inference_num_gpus = max(engines, 1)
    i.inference_batch_size = 2
    i.inference_buffer_threshold = 2
    i.max_sample_pool_size = 4
    cfg.output_dir = str(tmp_path / "out")
    cfg.cache_dir = str(tmp_path / "cache")
    return cfg


def ids_by_epoch(trained) -> dict[int, list[str]]:
    out = collections.defaultdict(list)
    for _step, epoch, sid in trained:
        out[epoch].append(sid)
    return dict(out)


def child_pids(pid: int | None = None) -> set[int]:
    """Live (not zombie) direct children of process `pid` (default: this one), from /proc, but for
    multiprocessing's resource tracker."""
    import os

    pid = os.getpid() if pid is None else pid
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and not _resource_tracker(entry):
            out.add(int(entry))
    return out


def _resource_tracker(pid: str) -> bool:
    """multiprocessing's resource tracker: one per interpreter, started at its first use, kept till exit."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False
