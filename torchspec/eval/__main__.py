"""python -m torchspec.eval --target PATH --draft EXPORTED_DIR --data FILE [options]

Greedy chain speculative decoding of the target with the exported EAGLE-3 draft, as a server runs it,
over the prompts of a conversation file: a conversation that ends with a user turn is one prompt (the
chat template's generation prompt appended); one that ends with an assistant reply is evaluated at its
last assistant turn (every assistant turn with --all-turns). How many prompts were used, and why any
were skipped, is printed first. Image conversations need a vision-language target (Qwen-VL family): the
prompts keep their images and the target runs them as in training (placeholders expanded, pixel inputs).
Prints tau (mean acceptance length = tokens per target verification forward), per-position acceptance
rates, the token-level match with plain greedy decoding (always 100% for a correct implementation), and
with --speedup an expected-speedup estimate from measured forward costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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
    p.add_argument("--all-turns", action="store_true",
                   help="evaluate every assistant turn of a conversation, not only its last one")
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
    p.add_argument("--output", default=None,
                   help="also write the results as JSON to this file (its folder is made if missing)")
    return p


# The data code's messages name config keys; on this command line the same settings are flags.
_FLAGS = {"dataset.prompt_key": "--prompt-key", "dataset.chat_template": "--chat-template"}


def _as_flags(message: str) -> str:
    for key, flag in _FLAGS.items():
        message = message.replace(f"set {key}: ", f"set {flag} ").replace(key, flag)
    return message


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


def check_output(path) -> None:
    """--output can be written when the evaluation ends: not a directory, and its folder exists or can be
    made (utils/paths.check_writable_dir, as output_dir)."""
    from torchspec.config.errors import FileError
    from torchspec.eval.acceptance import EvalError
    from torchspec.utils.paths import check_writable_dir

    out = Path(path)
    if out.is_dir():
        raise EvalError(f"--output {path}: is a directory; give a file path (e.g. {out / 'eval.json'})")
    if out.exists() and not os.access(out, os.W_OK):
        raise EvalError(f"--output {path}: {out} is not writable")
    try:
        check_writable_dir(out.parent, key="--output", label=f"--output {path}")
    except FileError as e:
        raise EvalError(str(e)) from None


def check_target(target) -> None:
    """--target is a local model dir (with its config.json) or a hub id: the cheap part of loading it, made
    before the prompts are read (a bad config.json is reported, naming the file, by the tokenizer's load)."""
    from torchspec.eval.acceptance import EvalError
    from torchspec.utils.hub import is_hub_id

    path = Path(target).expanduser()
    if not path.exists():
        if is_hub_id(target):
            return
        raise EvalError(f"--target {target}: no such directory (give a local model dir or a hub id org/name)")
    if not path.is_dir():
        raise EvalError(f"--target {target}: is a file; give the target's model dir")
    if not (path / "config.json").is_file():
        raise EvalError(f"--target {target}: {path / 'config.json'} is missing (a model dir holds config.json, "
                        "the tokenizer files and the weights)")


def write_output(path, result: dict) -> None:
    from torchspec.eval.acceptance import EvalError

    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    except OSError as e:
        raise EvalError(f"--output {path}: not written ({e.strerror or e}); only the summary above was kept"
                        ) from None


def run(args, say=print) -> dict:
    """The evaluation `args` ask for, as a dict; `say` gets the prompt selection line before it starts."""
    import torch

    from torchspec.data.errors import DataError
    from torchspec.data.formats import load_conversations, resolve_files
    from torchspec.data.templates import get_template
    from torchspec.eval.acceptance import EvalError, draft_export_dir, load_target_and_draft, measure_acceptance
    from torchspec.eval.prompts import select_prompts
    from torchspec.inference.hf import TargetLoadError

    if args.temperature != 0:
        raise EvalError(f"--temperature {args.temperature}: only greedy evaluation (0) is supported")
    if args.num_draft_steps < 1 or args.max_new_tokens < 1:
        raise EvalError("--num-draft-steps and --max-new-tokens must be >= 1")
    if args.num_prompts is not None and args.num_prompts < 1:
        raise EvalError(f"--num-prompts {args.num_prompts}: must be >= 1 (leave it out to use every prompt)")
    if args.max_seq_length < 1:
        raise EvalError(f"--max-seq-length {args.max_seq_length}: must be >= 1")
    if args.output:
        check_output(args.output)
    draft_export_dir(args.draft)  # cheap, so before the prompts and the target: a bad dir is reported first
    check_target(args.target)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda")
                                                           else torch.float32)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.target, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise EvalError(f"--target {args.target}: {str(e).splitlines()[0]}") from None
    try:  # the prompts first: a bad file is reported before any model is loaded
        convs = load_conversations(resolve_files(args.data, "--data"), args.prompt_key)
        template = get_template(args.chat_template, tokenizer)
        prompts, selection = select_prompts(convs, tokenizer, template, max_seq_length=args.max_seq_length,
                                            all_turns=args.all_turns, limit=args.num_prompts)
    except DataError as e:
        raise EvalError(_as_flags(str(e))) from None
    if not prompts:
        raise EvalError(f"--data {args.data}: no usable prompt; {selection.summary()}")
    say(selection.summary())
    try:
        target, draft = load_target_and_draft(args.target, args.draft, device, dtype, args.trust_remote_code)
    except (OSError, TargetLoadError) as e:
        raise EvalError(f"--target {args.target}: {str(e).splitlines()[0]}") from None
    with_images = sum(1 for p in prompts if p.images)
    if with_images and target.vision is None:
        raise EvalError(f"--data {args.data}: {with_images} prompt(s) have images, but --target {args.target} is not "
                        "a vision-language model")
    eos = None if args.ignore_eos else _eos_ids(target.model, tokenizer)
    res = measure_acceptance(target, draft, prompts, args.num_draft_steps, args.max_new_tokens, eos,
                             compare_greedy=not args.no_greedy_check, progress=sys.stderr.isatty())
    out = {"target": str(args.target), "draft": str(args.draft), "data": str(args.data),
           "num_draft_steps": args.num_draft_steps, "max_new_tokens": args.max_new_tokens, "device": device,
           "dtype": str(dtype).replace("torch.", ""), "prompt_selection": selection.as_dict(), **res.as_dict(),
           # what was asked and answered, token ids per prompt (another engine can be run on the same prompts)
           "prompt_token_ids": [list(p) for p in prompts], "outputs": res.outputs}
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
        result = run(args, say=lambda line: print(line, flush=True))
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_result(result))
    if args.output:
        try:
            write_output(args.output, result)
        except EvalError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
