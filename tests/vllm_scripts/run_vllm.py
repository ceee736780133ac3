"""Runs inside the vLLM venv (scripts/setup_vllm.sh), called by tests/test_vllm*.py via subprocess.

Greedy generation of token-id prompts with vLLM on CPU, optionally with EAGLE-3 speculative decoding,
writing the generated token ids and vLLM's spec_decode counters as JSON.

  python run_vllm.py SPEC.json OUT.json
SPEC: {"target": DIR, "prompts": [[ids]...], "max_tokens": N, "max_model_len": M, "ignore_eos": true,
       "runs": [{"draft": DIR or null, "num_speculative_tokens": k}, ...]}
       ("ignore_eos": false stops a reply at the target's EOS, as `python -m torchspec.eval` does by default)
OUT:  {"runs": [{"outputs": [[ids]...], "spec_decode": {num_drafts, num_draft_tokens,
       num_accepted_tokens, accepted_per_pos} (speculative runs only)}, ...]}
One process runs every engine in turn (vLLM's import and start-up dominate the time on CPU).
"""

import gc
import json
import os
import sys


def spec_decode_counters(metrics) -> dict:
    want = {"vllm:spec_decode_num_drafts": "num_drafts",
            "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
            "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens"}
    out = {v: 0 for v in want.values()}
    per_pos: dict[int, int] = {}
    for m in metrics:
        if m.name in want:
            out[want[m.name]] += int(m.value)
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            values = getattr(m, "values", None)
            if values is None:  # one counter per position, labelled
                pos = int(m.labels["position"])
                per_pos[pos] = per_pos.get(pos, 0) + int(m.value)
            else:
                for i, v in enumerate(values):
                    per_pos[i] = per_pos.get(i, 0) + int(v)
    out["accepted_per_pos"] = [per_pos[i] for i in sorted(per_pos)]
    return out


def run_one(spec: dict, run: dict) -> dict:
    from vllm import LLM, SamplingParams

    kwargs = dict(model=spec["target"], dtype="float32", enforce_eager=True, gpu_memory_utilization=0.2,
                  max_model_len=spec.get("max_model_len", 512), disable_log_stats=False, seed=0,
                  max_num_seqs=max(1, len(spec["prompts"])))
    if run.get("draft"):
        kwargs["speculative_config"] = {"method": "eagle3", "model": run["draft"],
                                        "num_speculative_tokens": run["num_speculative_tokens"]}
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=spec.get("ignore_eos", True))
    outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], params, use_tqdm=False)
    result = {"outputs": [list(o.outputs[0].token_ids) for o in outs]}
    if run.get("draft"):
        result["spec_decode"] = spec_decode_counters(llm.get_metrics())
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main(spec_path: str, out_path: str) -> None:
    spec = json.load(open(spec_path))
    result = {"runs": [run_one(spec, run) for run in spec["runs"]]}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    main(sys.argv[1], sys.argv[2])
