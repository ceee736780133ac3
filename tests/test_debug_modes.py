"""debug.debug_inference_only / debug_train_only / save_debug_train_data: an offline capture of hidden-state
records, training from it with no engine, and an online run that keeps what it trained on."""

import json

import pytest

from pipeline_helpers import tiny_run_config
from torchspec.config.errors import ConfigError
from torchspec.config.validate import validate_config as validate
from torchspec.pipeline.runner import run_training


def _cfg(tmp_path, target, **debug):
    cfg = tiny_run_config(tmp_path, target, n_conversations=10, num_epochs=2)
    for k, v in debug.items():
        setattr(cfg.debug, k, v)
    return cfg


def test_capture_then_train_only_equals_the_online_run(tmp_path, tiny_target_dir, monkeypatch):
    cap = tmp_path / "capture"
    online = run_training(_cfg(tmp_path / "online", tiny_target_dir), progress=False)

    got = run_training(_cfg(tmp_path / "cap", tiny_target_dir, debug_inference_only=True,
                            save_debug_train_data=str(cap)), progress=False)
    lines = [json.loads(x) for x in (cap / "records.jsonl").read_text().splitlines()]
    assert len(lines) == len({x["sample_id"] for x in lines}) == 10
    assert got.generated_tokens == sum(x["length"] for x in lines) and got.losses == []
    assert not (tmp_path / "cap" / "out" / "export").exists()   # nothing trained

    from torchspec.inference import hf   # a train-only run never runs the target

    monkeypatch.setattr(hf.HFEngine, "generate", lambda *a, **k: pytest.fail("target forward in train-only"))
    replay = run_training(_cfg(tmp_path / "replay", tiny_target_dir, debug_train_only=True,
                               save_debug_train_data=str(cap)), progress=False)
    assert [s for _, _, s in replay.trained] == [s for _, _, s in online.trained]
    assert replay.losses == online.losses    # bitwise: the same records, the same order


def test_capture_resumes_without_running_captured_samples_again(tmp_path, tiny_target_dir, monkeypatch):
    cap = tmp_path / "capture"
    cfg = _cfg(tmp_path / "a", tiny_target_dir, debug_inference_only=True, save_debug_train_data=str(cap))
    from torchspec.inference import hf

    real, seen = hf.HFEngine.generate, []

    def generate(self, samples):
        seen.extend(s.sample_id for s in samples)
        if len(seen) > 4:
            raise KeyboardInterrupt
        return real(self, samples)

    monkeypatch.setattr(hf.HFEngine, "generate", generate)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, progress=False)
    first = {json.loads(x)["sample_id"] for x in (cap / "records.jsonl").read_text().splitlines()}
    assert len(first) == 4
    seen.clear()
    monkeypatch.setattr(hf.HFEngine, "generate", real)
    run_training(cfg, progress=False)
    lines = (cap / "records.jsonl").read_text().splitlines()
    assert len(lines) == 10 and first <= {json.loads(x)["sample_id"] for x in lines}


def test_online_run_keeps_the_records_it_trained_on(tmp_path, tiny_target_dir):
    cap = tmp_path / "kept"
    r = run_training(_cfg(tmp_path / "o", tiny_target_dir, save_debug_train_data=str(cap)), progress=False)
    ids = {json.loads(x)["sample_id"] for x in (cap / "records.jsonl").read_text().splitlines()}
    assert ids == {s for _, _, s in r.trained}   # every trained sample once (2 epochs, written once)


def test_debug_modes_need_a_directory_and_a_matching_capture(tmp_path, tiny_target_dir):
    for mode in ("debug_inference_only", "debug_train_only"):
        cfg = _cfg(tmp_path, tiny_target_dir, **{mode: True})
        with pytest.raises(ConfigError, match=f"debug.{mode}=True: needs debug.save_debug_train_data"):
            validate(cfg)
    with pytest.raises(ConfigError, match="no capture there"):
        run_training(_cfg(tmp_path / "t", tiny_target_dir, debug_train_only=True,
                          save_debug_train_data=str(tmp_path / "none")), progress=False)
    cap = tmp_path / "capture"
    run_training(_cfg(tmp_path / "c", tiny_target_dir, debug_inference_only=True, save_debug_train_data=str(cap)),
                 progress=False)
    cfg = _cfg(tmp_path / "t2", tiny_target_dir, debug_train_only=True, save_debug_train_data=str(cap))
    cfg.training.max_seq_length = 64
    with pytest.raises(ConfigError, match="max_seq_length: 128 there, 64 now"):
        run_training(cfg, progress=False)
