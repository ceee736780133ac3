"""Checkpoints: atomic writes, rotation, latest(), bit-exact round trip (CPU)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torchspec.config.errors import FileError
from torchspec.training.checkpoint import CheckpointManager, is_complete, load_checkpoint, resolve_checkpoint
from test_trainer import batches, make_cfg, make_trainer

REPO = Path(__file__).resolve().parents[1]


def _tiny_save(mgr, step, export_fn=None):
    model = torch.nn.Linear(2, 2)
    return mgr.save(step, {"global_step": step}, {"epoch": 0, "trained_ids": [f"s{step}"]}, model,
                    {"hidden_size": 2}, export_fn=export_fn)


def test_layout_and_export(tmp_path):
    mgr = CheckpointManager(tmp_path)

    def export(draft, out):
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"w": draft.weight.sum().item()}))

    d = _tiny_save(mgr, 7, export)
    assert d == tmp_path / "checkpoints" / "step_00000007"
    names = {p.name for p in d.iterdir()}
    assert names == {"model.safetensors", "draft_config.json", "trainer_state.pt", "data_state.json",
                     "meta.json", "export"}
    d8 = mgr.save(8, {}, None, torch.nn.Linear(2, 2), {}, export_meta={"aux_layer_ids": [1, 2, 3]})
    assert json.loads((d8 / "export_meta.json").read_text()) == {"aux_layer_ids": [1, 2, 3]}
    assert set(load_file(str(d / "model.safetensors"))) == {"weight", "bias"}
    assert json.loads((d / "draft_config.json").read_text()) == {"hidden_size": 2}
    assert (tmp_path / "export" / "config.json").read_text() == (d / "export" / "config.json").read_text()
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_rotation_keeps_the_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, max_checkpoints=2)
    for step in (10, 20, 30, 40):
        _tiny_save(mgr, step)
        assert len(list((tmp_path / "checkpoints").iterdir())) <= 2
    assert [p.name for p in mgr.checkpoints()] == ["step_00000030", "step_00000040"]
    assert mgr.latest().name == "step_00000040"
    keep_all = CheckpointManager(tmp_path / "all")
    for step in (1, 2, 3):
        _tiny_save(keep_all, step)
    assert len(keep_all.checkpoints()) == 3


def test_killed_mid_write_is_never_latest(tmp_path):
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from torchspec.training.checkpoint import CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r})
        mgr.save(1, {{"global_step": 1}}, {{}}, torch.nn.Linear(2, 2), {{}})
        def export(draft, out):   # weights and states are on disk; the export is 'in progress'
            out.mkdir(); (out / "model.safetensors").write_bytes(b"partial")
            Path({str(marker)!r}).touch()
            time.sleep(60)
        mgr.save(2, {{"global_step": 2}}, {{}}, torch.nn.Linear(2, 2), {{}}, export_fn=export)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.time() + 45
        while not marker.exists():
            assert proc.poll() is None, "the writer died before reaching the export"
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    mgr = CheckpointManager(tmp_path)
    root = tmp_path / "checkpoints"
    temps = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert len(temps) == 1 and (temps[0] / "model.safetensors").exists()  # step 2 was half written
    assert mgr.latest() == root / "step_00000001"
    assert resolve_checkpoint(tmp_path) == root / "step_00000001"
    # the next save clears the debris and becomes the latest
    _tiny_save(mgr, 3)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000003"]
    assert mgr.latest().name == "step_00000003"


def test_a_step_dir_with_missing_or_truncated_files_is_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path)
    good = _tiny_save(mgr, 1)
    bad = _tiny_save(mgr, 2)
    with open(bad / "model.safetensors", "r+b") as f:  # e.g. copied by hand and cut short
        f.truncate(10)
    assert not is_complete(bad) and mgr.latest() == good
    with pytest.raises(FileError, match=rf"^training.load_path={bad}: an incomplete checkpoint \(model.safetensors "
                                        r"has 10 bytes, meta.json says \d+: truncated or replaced\); resume from "):
        resolve_checkpoint(bad)
    (bad / "meta.json").unlink()
    assert mgr.latest() == good
    with pytest.raises(FileError, match=rf"^training.load_path={tmp_path}/nope: does not exist$"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileError, match=rf"^training.load_path={bad}: no complete checkpoint there \(expected "):
        resolve_checkpoint(bad)
    with pytest.raises(FileError, match=rf"^training.load_path={bad}/data_state.json: is a file; "):
        resolve_checkpoint(bad / "data_state.json")


def test_a_load_path_with_only_broken_checkpoints_says_what_is_wrong_in_each(tmp_path):
    mgr = CheckpointManager(tmp_path)
    cut = _tiny_save(mgr, 1)
    with open(cut / "trainer_state.pt", "r+b") as f:
        f.truncate(100)
    gone = _tiny_save(mgr, 2)
    (gone / "draft_config.json").unlink()
    with pytest.raises(FileError, match=rf"^training.load_path={tmp_path}: no complete checkpoint there \(incomplete: "
                                        r"step_00000001: trainer_state.pt has 100 bytes, meta.json says \d+: truncated "
                                        r"or replaced; step_00000002: draft_config.json is missing\)$"):
        resolve_checkpoint(tmp_path)


def test_save_load_round_trips_trainer_bit_exactly(tmp_path):
    data = batches(8)
    ref = make_trainer(make_cfg(draft_accumulation_steps=2))
    ref_losses = [ref.train_step(b)["loss"] for b in data]

    tr = make_trainer(make_cfg(draft_accumulation_steps=2))
    losses = [tr.train_step(b)["loss"] for b in data[:4]]
    state = tr.state_dict()
    data_state = {"epoch": 0, "trained_ids": ["a", "b"]}
    CheckpointManager(tmp_path).save(tr.global_step, state, data_state, tr.draft, {"h": 8})

    ck = load_checkpoint(tmp_path)
    assert ck.step == 2 and ck.data_state == data_state and ck.draft_config == {"h": 8}
    for k, v in state["model"].items():
        assert torch.equal(ck.trainer_state["model"][k], v)
    opt_a, opt_b = state["optimizer"]["state"], ck.trainer_state["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name in opt_a[i]:
            assert torch.equal(opt_a[i][name], opt_b[i][name])
    assert ck.trainer_state["scheduler"] == state["scheduler"]
    assert torch.equal(ck.trainer_state["rng"]["torch"], state["rng"]["torch"])
    assert ck.trainer_state["rng"]["python"] == state["rng"]["python"]

    torch.manual_seed(777)
    resumed = make_trainer(make_cfg(draft_accumulation_steps=2), seed=42)
    resumed.load_state_dict(ck.trainer_state)
    losses += [resumed.train_step(b)["loss"] for b in data[4:]]
    assert losses == ref_losses  # the loss curve continues exactly

    weights = load_checkpoint(tmp_path, weights_only=True)
    assert set(weights.trainer_state) == {"model"} and weights.data_state is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _export_writer(tag):
    def export(draft, out):
        out.mkdir()
        (out / "config.json").write_text(json.dumps({"tag": tag}))
    return export


def test_export_is_renamed_over_the_old_one_never_deleted_first(tmp_path, monkeypatch):
    """Issue 12 item 11: at every deletion during a publish, output_dir/export is there and already the new one."""
    import shutil as shutil_mod
    from torchspec.training import checkpoint as ck

    mgr = CheckpointManager(tmp_path)
    _tiny_save(mgr, 1, _export_writer("old"))
    seen = []
    real_rmtree, real_rename = shutil_mod.rmtree, os.rename

    def watching_rmtree(path, *a, **kw):
        exported = tmp_path / "export" / "config.json"
        seen.append(json.loads(exported.read_text())["tag"] if exported.exists() else None)
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(ck.shutil, "rmtree", watching_rmtree)
    for exchange in (True, False):   # Linux' atomic exchange, and the two-rename fallback
        if not exchange:
            monkeypatch.setattr(ck, "_exchange", lambda a, b: False)
        seen.clear()
        _tiny_save(mgr, 2 + exchange, _export_writer(f"new{exchange}"))
        assert seen and all(tag == f"new{exchange}" for tag in seen)
        mgr.export_final(torch.nn.Linear(2, 2), _export_writer("final"))
        assert json.loads((tmp_path / "export" / "config.json").read_text())["tag"] == "final"
    assert not [p for p in tmp_path.rglob(".tmp-*")]

    # killed between the fallback's two renames: the old export sits in the trash, export/ is missing;
    # the next start puts it back and sweeps the rest
    def dying_rename(src, dst):
        real_rename(src, dst)
        if Path(dst).name.startswith(".tmp-trash-export"):
            raise KeyboardInterrupt
    monkeypatch.setattr(ck.os, "rename", dying_rename)
    with pytest.raises(KeyboardInterrupt):
        mgr.export_final(torch.nn.Linear(2, 2), _export_writer("lost"))
    monkeypatch.setattr(ck.os, "rename", real_rename)
    assert not (tmp_path / "export").exists()
    dead = _dead_pid()
    for p in tmp_path.glob(".tmp-*"):   # as if left by a process that is gone
        p.rename(p.with_name(p.name.rsplit("-", 1)[0] + f"-{dead}"))
    CheckpointManager(tmp_path).sweep_stale()
    assert json.loads((tmp_path / "export" / "config.json").read_text())["tag"] == "final"
    assert not [p for p in tmp_path.rglob(".tmp-*")]


def test_stale_temp_dirs_of_dead_runs_are_swept_and_live_ones_kept(tmp_path):
    """Issue 12 item 11: `.tmp-export-PID` / `.tmp-trash-export-PID` / `.tmp-step_N-PID` of dead pids go."""
    mgr = CheckpointManager(tmp_path)
    _tiny_save(mgr, 1, _export_writer("one"))
    dead = _dead_pid()
    stale = [tmp_path / f".tmp-export-{dead}", tmp_path / f".tmp-trash-export-{dead}",
             tmp_path / "checkpoints" / f".tmp-step_00000002-{dead}",
             tmp_path / "checkpoints" / f".tmp-trash-step_00000001-{dead}"]
    live_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".tmp-export-{live_proc.pid}"
        for p in stale + [live]:
            p.mkdir()
            (p / "x").write_text("x")
        assert sorted(CheckpointManager(tmp_path).sweep_stale()) == sorted(stale)
        assert live.exists() and not any(p.exists() for p in stale)
        assert json.loads((tmp_path / "export" / "config.json").read_text())["tag"] == "one"
    finally:
        live_proc.kill()
        live_proc.wait()
