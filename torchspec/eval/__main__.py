"""python -m torchspec.eval --target PATH --draft EXPORTED_DIR --data FILE [options]

Greedy chain speculative decoding of the target with the exported EAGLE-3 draft, as a server runs it,
over the prompts of a conversation file (each conversation cut before its first assistant token).
Prints tau (mean acceptance length = tokens per target verification forward), per-position acceptance
rates, the token-level match with plain greedy decoding (always 100% for a correct implementation), and
with --speedup an expected-speedup estimate from measured forward costs.
"""

from __future__ import annotations

import argparse
import json
import sys

from torchspec.config.schema import DatasetConfig, TrainingConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m torchspec.eval",
                                description="Acceptance length (tau) of an exported EAGLE-3 draft against its target: "
                                            "greedy chain speculative decoding as a server runs it.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", required=True, help="target model dir")
    p.add_argument("--draft", required=True, help="exported draft dir (a run's output_dir/export)")
    p.add_argument("--data", required=True, help="conversations file(s)/dir (jsonl/json/parquet)")
    p.add_argument("--num-draft-steps", "-k", type=int, default=DatasetConfig.eval_num_draft_steps,
                   help="draft tokens proposed per verification")
    p.add_argument("--max-new-tokens", type=int, default=DatasetConfig.eval_max_new_tokens)
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts (None = all)")
    p.add_argument("--temperature", type=float, default=0.0, help="only 0 (greedy) is supported")
    p.add_argument("--chat-template", default=DatasetConfig.chat_template)
    p.add_argument("--prompt-key", default=DatasetConfig.prompt_key)
    p.add_argument("--max-seq-length", type=int, default=TrainingConfig.max_seq_length)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--no-greedy-check", action="store_true", help="skip the plain greedy reference run")
    p.add_argument("--speedup", action="store_true", help="also measure forward costs, estimate the speedup")
    p.add_argument("--device", default=None, help="None = cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="None = bfloat16 on cuda, float32 on cpu")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    return p


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def run(args) -> dict:
    import torch

    from torchspec.data.dataset import build_dataset
    from torchspec.data.errors import DataError
    from torchspec.eval.acceptance import EvalError, load_target_and_draft, measure_acceptance, prompts_from_samples
    from torchspec.inference.hf import TargetLoadError

    if args.temperature != 0:
        raise EvalError(f"--temperature {args.temperature}: only greedy evaluation (0) is supported")
    if args.num_draft_steps < 1 or args.max_new_tokens < 1:
        raise EvalError("--num-draft-steps and --max-new-tokens must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda")
                                                           else torch.float32)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.target, trust_remote_code=args.trust_remote_code)
        target, draft = load_target_and_draft(args.target, args.draft, device, dtype, args.trust_remote_code)
    except (OSError, TargetLoadError) as e:
        raise EvalError(f"--target {args.target}: {str(e).splitlines()[0]}") from None
    try:
        samples = build_dataset(args.data, tokenizer, chat_template=args.chat_template,
                                max_seq_length=args.max_seq_length, prompt_key=args.prompt_key,
                                progress=False, config_key="--data")
    except DataError as e:
        raise EvalError(str(e)) from None
    prompts = prompts_from_samples(samples, args.num_prompts)
    if not prompts:
        raise EvalError(f"--data {args.data}: no conversation with an assistant turn to prompt with")
    eos = None if args.ignore_eos else _eos_ids(target.model, tokenizer)
    res = measure_acceptance(target, draft, prompts, args.num_draft_steps, args.max_new_tokens, eos,
                             compare_greedy=not args.no_greedy_check, progress=sys.stderr.isatty())
    out = {"target": str(args.target), "draft": str(args.draft), "data": str(args.data),
           "num_draft_steps": args.num_draft_steps, "max_new_tokens": args.max_new_tokens, "device": device,
           "dtype": str(dtype).replace("torch.", ""), **res.as_dict()}
    if args.speedup:
        from torchspec.eval.speedup import estimate_speedup, measure_costs

        costs = measure_costs(target, draft, args.num_draft_steps)
        out["forward_costs"] = costs.as_dict()
        out["estimated_speedup"] = estimate_speedup(res.stats.tau, costs)
    return out


def format_result(r: dict) -> str:
    lines = [f"prompts {r['num_prompts']}, tokens generated {r['tokens_generated']}, k = {r['num_draft_steps']}",
             f"tau (mean acceptance length) = {r['tau']:.4f}  "
             f"({r['num_accepted_tokens']} accepted / {r['num_drafts']} verifications, +1 bonus each)",
             "acceptance rate per draft position: "
             + " ".join(f"{i}:{a:.3f}" for i, a in enumerate(r["acceptance_rate_per_pos"]))]
    if "greedy_match_rate" in r:
        lines.append(f"match with plain greedy decoding: {100 * r['greedy_match_rate']:.2f}% of tokens, "
                     f"{r['identical_outputs']}/{r['num_prompts']} outputs identical")
    if "estimated_speedup" in r:
        c = r["forward_costs"]
        lines.append(f"ESTIMATED speedup {r['estimated_speedup']:.2f}x (target 1 tok {1e3 * c['target_decode_s']:.2f} ms,"
                     f" verify {c['num_draft_steps'] + 1} tok {1e3 * c['target_verify_s']:.2f} ms, draft step "
                     f"{1e3 * c['draft_step_s']:.2f} ms on {c['device']}; an estimate, not a server measurement)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from torchspec.eval.acceptance import EvalError

    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_result(result))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
