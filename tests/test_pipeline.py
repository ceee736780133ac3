"""The full pipeline on CPU: dataset -> HF target engines -> local store -> controller -> trainer."""

import json

import torch

from pipeline_helpers import ids_by_epoch, tiny_run_config
from torchspec.pipeline.runner import run_training


def test_two_engine_processes_every_sample_once_per_epoch(tmp_path, tiny_target_dir, cpu_only):
    cfg = tiny_run_config(tmp_path, tiny_target_dir, engines=2, num_epochs=2, save_interval=4, n_eval=4)
    cfg.dataset.eval_interval = 4
    cfg.inference.max_sample_pool_size = 4
    result = run_training(cfg, progress=False)

    from torchspec.data.dataset import from_config, load_tokenizer
    all_ids = sorted(s.sample_id for s in from_config(cfg, load_tokenizer(cfg), progress=False))
    assert len(all_ids) == 12
    epochs = ids_by_epoch(result.trained)
    assert sorted(epochs) == [0, 1]
    for e in (0, 1):
        assert sorted(epochs[e]) == all_ids            # every id exactly once per epoch
    assert not result.interrupted
    assert result.global_step == 12                    # 12 samples / micro-batch 2, 2 epochs
    # backpressure: the pool never held more than max_sample_pool_size samples
    assert result.pool_sizes and max(result.pool_sizes) <= 4
    assert result.store_bytes_end == 0                 # every record deleted: no leak
    # metrics, checkpoints, export
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    lines = [x for x in records if "loss" in x]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert all(x["pool_size"] <= 4 and x["loss"] > 0 for x in lines)
    # eval during training on the held-out conversations: untrained baseline, every 4 steps, improving
    evals = [x for x in records if "eval/loss" in x]
    assert [x["step"] for x in evals] == [0, 4, 8, 12] and evals[0]["eval/num_samples"] == 4
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    best = json.loads((tmp_path / "out" / "eval_best.json").read_text())
    assert best["step"] in (4, 8, 12) and best["checkpoint"] == f"checkpoints/step_{best['step']:08d}"
    assert (tmp_path / "out" / "report" / "report.md").is_file()
    assert [p.name for p in result.checkpoints] == ["step_00000004", "step_00000008", "step_00000012"]
    assert (tmp_path / "out" / "export" / "config.json").is_file()
    state = json.loads((result.checkpoints[-1] / "data_state.json").read_text())
    assert state["epoch"] == 2 and state["trained"] == [] and state["num_samples"] == 12
    # the draft learned something: mean loss of the last epoch is below the first epoch's
    losses = [loss for _, loss in result.losses]
    assert sum(losses[6:]) < sum(losses[:6])


def test_same_seed_single_process_bitwise_identical_losses(tmp_path, tiny_target_dir):
    runs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cfg = tiny_run_config(tmp_path / name, tiny_target_dir, num_epochs=1, seed=seed)
        runs.append(run_training(cfg, progress=False))
    a, b, c = runs
    assert len(a.losses) == 6
    assert a.losses == b.losses                                       # bitwise: floats compared exactly
    assert [x[2] for x in a.trained] == [x[2] for x in b.trained]     # same order of samples
    assert a.losses != c.losses                                       # the seed matters (the test can fail)
    sa = torch.load(a.checkpoints[-1] / "trainer_state.pt", weights_only=False)
    sb = torch.load(b.checkpoints[-1] / "trainer_state.pt", weights_only=False)
    assert sa["global_step"] == sb["global_step"] == 6


def test_two_engines_two_trainer_ranks_gloo(tmp_path, tiny_target_dir, cpu_only):
    """2 engine processes + 2 DDP trainer ranks (gloo). 9 samples: each epoch ends with one sample for
    rank 0 and none for rank 1 (which then joins the step with a zero-loss batch)."""
    cfg = tiny_run_config(tmp_path, tiny_target_dir, n_conversations=9, engines=2, num_epochs=2,
                          training_num_gpus_per_node=2)
    result = run_training(cfg, progress=False)
    epochs = ids_by_epoch(result.trained)
    assert len(epochs[0]) == 9 and sorted(epochs[0]) == sorted(epochs[1]) == sorted(set(epochs[0]))
    assert result.global_step == 2 * 3                   # ceil(9 / (2 ranks x 2)) steps per epoch
    steps = [s for s, _, _ in result.trained]
    assert steps.count(3) == 1 and steps.count(6) == 1   # the short tail step of each epoch
    assert max(result.pool_sizes) <= 4 and result.store_bytes_end == 0
    assert all(loss == loss and loss > 0 for _, loss in result.losses)
