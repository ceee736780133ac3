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


def spawned_children(pid: int) -> list[int]:
    """The processes `pid` spawned with multiprocessing (engines, trainer ranks), by pid."""
    out = []
    for c in sorted(child_pids(pid)):
        try:
            with open(f"/proc/{c}/cmdline", "rb") as f:
                if b"multiprocessing.spawn" in f.read():
                    out.append(c)
        except OSError:
            pass
    return out


def config_file(cfg: Config, directory: Path) -> Path:
    """`cfg` as a YAML file that `python -m torchspec.train_entry --config` loads."""
    from torchspec.config.render import save_resolved_config

    return save_resolved_config(cfg, directory)


def _resource_tracker(pid: str) -> bool:
    """multiprocessing's resource tracker: one per interpreter, started at its first use, kept till exit."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return False


def two_node_configs(tmp_path: Path, target_dir) -> tuple[Config, Config]:
    """The Ray run over two nodes (2 engines, trainer ranks 0 and 1 on one CPU each) and the local run of the
    same seed and world size (2 spawned engines, 2 spawned ranks) that must train it to the same weights."""
    common = dict(engines=2, num_epochs=2, seed=11, save_interval=3)
    ray_cfg = tiny_run_config(tmp_path / "ray", target_dir, training_num_nodes=2, training_num_gpus_per_node=1,
                              **common)
    ray_cfg.inference.launcher = "ray"
    return ray_cfg, tiny_run_config(tmp_path / "local", target_dir, training_num_gpus_per_node=2, **common)


def assert_same_training(ray_run, local_run) -> None:
    """Two runs of `two_node_configs`: 6 steps each; each step trains the same 4 samples (the pool holds
    exactly one step's worth; only which engine's pair reaches rank 0 first may differ, and the 2-rank
    gradient sum a+b is exact either way), so both checkpoints are bitwise equal, and they differ from
    each other (the steps between changed the weights)."""
    import torch
    from safetensors.torch import load_file

    def weights(checkpoint: Path) -> dict:
        return load_file(checkpoint / "model.safetensors")

    assert ray_run.global_step == local_run.global_step == 6     # 12 samples / (2 ranks x 2), 2 epochs
    assert [sorted(x[2] for x in ray_run.trained if x[0] == s) for s in range(1, 7)] == \
           [sorted(x[2] for x in local_run.trained if x[0] == s) for s in range(1, 7)]
    assert [p.name for p in ray_run.checkpoints] == [p.name for p in local_run.checkpoints] == \
           ["step_00000003", "step_00000006"]
    for ray_ckpt, local_ckpt in zip(ray_run.checkpoints, local_run.checkpoints):
        ray_w, local_w = weights(ray_ckpt), weights(local_ckpt)
        assert ray_w.keys() == local_w.keys() and len(ray_w) > 3
        assert all(torch.equal(ray_w[k], local_w[k]) for k in ray_w)
    first, last = weights(ray_run.checkpoints[0]), weights(ray_run.checkpoints[1])
    assert any(not torch.equal(first[k], last[k]) for k in first)


def kill_after_step_2(monkeypatch, kill):
    """Records the engine groups the run starts; the returned on_step calls kill(the first group) right after
    step 2. Returns (on_step, the steps seen, [the kill's time], the groups)."""
    import time

    from torchspec.pipeline import runner

    engines, start_engines = [], runner.start_engines
    monkeypatch.setattr(runner, "start_engines", lambda *a: engines.append(start_engines(*a)) or engines[-1])
    killed_at, steps = [], []

    def on_step(step, _metrics):
        steps.append(step)
        if step == 2:
            kill(engines[0])
            killed_at.append(time.monotonic())

    return on_step, steps, killed_at, engines
