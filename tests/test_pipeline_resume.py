"""Kill-and-resume: a run stopped mid-epoch and resumed trains exactly what one clean run trains."""

import json
import shutil

import pytest

from pipeline_helpers import ids_by_epoch, tiny_run_config
from torchspec.pipeline.runner import run_training

STOP_AT = 8          # 6 steps per epoch: step 8 is in the middle of epoch 1
SAVE_INTERVAL = 3    # checkpoints at 3, 6, then 8 from the Ctrl-C path


def _interrupt_at(step_to_stop):
    def on_step(step, metrics):
        if step == step_to_stop:
            raise KeyboardInterrupt   # what Ctrl-C raises in the main process
    return on_step


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, tiny_target_dir):
    tmp = tmp_path_factory.mktemp("clean")
    return run_training(tiny_run_config(tmp, tiny_target_dir, save_interval=SAVE_INTERVAL), progress=False)


@pytest.mark.parametrize("resume_from", ["interrupt", "earlier"])
def test_kill_and_resume_trains_the_clean_runs_samples(tmp_path, tiny_target_dir, clean_run, resume_from):
    cfg = tiny_run_config(tmp_path, tiny_target_dir, save_interval=SAVE_INTERVAL)
    first = run_training(cfg, on_step=_interrupt_at(STOP_AT), progress=False)
    assert first.interrupted and first.global_step == STOP_AT
    assert first.store_bytes_end == 0                       # Ctrl-C emptied the store
    ckpt_dir = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_00000003", "step_00000006", "step_00000008"]
    if resume_from == "earlier":
        # as after kill -9 between saves: the newest checkpoint is step 6, step 7-8's samples were lost
        shutil.rmtree(ckpt_dir / "step_00000008")
    resumed_step = STOP_AT if resume_from == "interrupt" else 6
    state = json.loads((ckpt_dir / f"step_{resumed_step:08d}" / "data_state.json").read_text())
    assert state["epoch"] == 1 and sum(b - a for a, b in state["trained"]) == 2 * (resumed_step - 6)

    cfg.training.load_path = str(tmp_path / "out")          # a run dir: its latest complete checkpoint
    second = run_training(cfg, progress=False)
    assert second.start_step == resumed_step and not second.interrupted

    # What the first run trained up to the checkpoint, plus what the second trained, is the clean run.
    kept = [t for t in first.trained if t[0] <= resumed_step]
    clean = ids_by_epoch(clean_run.trained)
    combined = ids_by_epoch(kept + second.trained)
    assert sorted(combined) == sorted(clean) == [0, 1]
    for e in clean:
        assert sorted(combined[e]) == sorted(clean[e])       # union == clean run's, nothing skipped
        assert len(set(combined[e])) == len(combined[e])     # no sample twice in an epoch
    before = {s for _, e, s in kept if e == 1}      # what the checkpoint's ranges of epoch 1 name
    assert len(before) == 2 * (resumed_step - 6) and not {s for _, e, s in second.trained if e == 1} & before

    # The loss curve continues: step numbers carry on from the checkpoint, and (single process, same
    # data order, restored optimizer/RNG) the values are the clean run's.
    assert [s for s, _ in second.losses] == list(range(resumed_step + 1, 13))
    assert second.losses == [x for x in clean_run.losses if x[0] > resumed_step]
    assert second.store_bytes_end == 0
    metrics = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics][-len(second.losses):] == list(range(resumed_step + 1, 13))
    # every step once: the first run's lines after the resumed checkpoint (7-8 when resuming at 6) are gone
    train_steps = [m["step"] for m in metrics if "loss" in m]
    assert train_steps == list(range(1, 13))


def test_continual_training_loads_weights_only(tmp_path, tiny_target_dir, clean_run):
    cfg = tiny_run_config(tmp_path, tiny_target_dir, num_epochs=1, save_interval=SAVE_INTERVAL)
    cfg.training.load_path = str(clean_run.checkpoints[-1])
    cfg.training.continual_training = True
    run = run_training(cfg, progress=False)
    assert run.start_step == 0 and [s for s, _ in run.losses] == list(range(1, 7))   # schedule restarts
    assert len(ids_by_epoch(run.trained)[0]) == 12                                   # data restarts
    # starting from trained weights, the first loss is below the clean run's first (untrained) loss
    assert run.losses[0][1] < clean_run.losses[0][1]
