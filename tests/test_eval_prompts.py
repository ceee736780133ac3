"""Evaluation prompts from conversation files (issue 12, item 7): prompt-only conversations get the
generation prompt, multi-turn ones are evaluated at their last assistant turn (every turn with
all_turns), skips are counted by reason, the CLI prints the counts and caps with --num-prompts."""

import json

import pytest
import torch

from torchspec.data.formats import load_conversations
from torchspec.data.templates import get_template
from torchspec.eval.prompts import (ASSISTANT_TURN, NO_USER, OPEN_END, TOO_LONG, evaluation_points,
                                    select_prompts)

U = lambda text: {"role": "user", "content": text}          # noqa: E731
A = lambda text: {"role": "assistant", "content": text}     # noqa: E731
S = lambda text: {"role": "system", "content": text}        # noqa: E731

# What an evaluation prompt file holds: prompt-only (MT-bench style), multi-turn, and normal conversations.
CONVERSATIONS = [
    [U("def parse(self, text):")],                                        # 1 prompt-only
    [S("You write Python."), U("import os")],                             # 2 prompt-only with a system turn
    [U("first question"), A("first answer"), U("second question")],      # 3 multi-turn, ends with a user turn
    [U("with open(path) as f:"), A("data = f.read()")],                   # 4 normal
    [U("q1"), A("a1"), U("q2"), A("a2"), U("q3"), A("a3")],              # 5 multi-turn, ends with a reply
    [S("no user here"), A("hello")],                                      # 6 nothing for a user to ask
    [U("x = 1\n" * 200), A("y")],                                         # 7 too long for max_seq_length 64
    [U("for i in range(10):"), A("print(i)")],                            # 8 normal
]
MAX_LEN = 64


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    return path


def _server_ids(tok, context):
    """What a server feeds the target: the tokenizer's own template with the generation prompt."""
    return tok.apply_chat_template(context, add_generation_prompt=True, tokenize=True)["input_ids"]


def test_evaluation_points():
    conv3, conv5 = CONVERSATIONS[2], CONVERSATIONS[4]
    assert evaluation_points(conv3) == [(3, OPEN_END)]
    assert evaluation_points(conv3, all_turns=True) == [(1, ASSISTANT_TURN), (3, OPEN_END)]
    assert evaluation_points(conv5) == [(5, ASSISTANT_TURN)]
    assert evaluation_points(conv5, all_turns=True) == [(1, ASSISTANT_TURN), (3, ASSISTANT_TURN),
                                                        (5, ASSISTANT_TURN)]
    assert evaluation_points(CONVERSATIONS[0]) == [(1, OPEN_END)]


def test_last_turn_prompts_are_the_templates_generation_prompt(prompt_file, tiny_tokenizer):
    convs = load_conversations([prompt_file], "messages")
    prompts, sel = select_prompts(convs, tiny_tokenizer, get_template("tokenizer", tiny_tokenizer),
                                  max_seq_length=MAX_LEN)
    contexts = [CONVERSATIONS[0], CONVERSATIONS[1], CONVERSATIONS[2], CONVERSATIONS[3][:1],
                CONVERSATIONS[4][:5], CONVERSATIONS[7][:1]]
    assert prompts == [_server_ids(tiny_tokenizer, c) for c in contexts]
    text = tiny_tokenizer.decode(prompts[2])
    assert text.endswith("second question<|im_end|>\n<|im_start|>assistant\n") and "first answer" in text
    assert sel.num_used == 6 and sel.used == {OPEN_END: 3, ASSISTANT_TURN: 3}
    assert sel.skipped == {NO_USER: 1, TOO_LONG: 1}
    assert sel.first_skipped == {NO_USER: f"{prompt_file} line 6 message 2", TOO_LONG: f"{prompt_file} line 7 message 2"}
    assert sel.summary() == (
        f"prompts: 6 used from 8 conversation(s) (3 ending with a non-assistant turn (generation prompt appended), "
        f"3 at their last assistant turn); skipped 2: 1 no user message before the reply (first: {prompt_file} "
        f"line 6 message 2), 1 prompt longer than max_seq_length=64 tokens (first: {prompt_file} line 7 message 2)")


def test_all_turns_and_limit(prompt_file, tiny_tokenizer):
    convs = load_conversations([prompt_file], "messages")
    tmpl = get_template("tokenizer", tiny_tokenizer)
    prompts, sel = select_prompts(convs, tiny_tokenizer, tmpl, max_seq_length=MAX_LEN, all_turns=True)
    # conv 3 gives 2 (its reply, its open end), conv 5 gives 3, convs 1, 2, 4, 8 one each; 6 and 7 skipped
    assert sel.used == {OPEN_END: 3, ASSISTANT_TURN: 6} and len(prompts) == 9
    assert prompts[2] == _server_ids(tiny_tokenizer, CONVERSATIONS[2][:1])
    assert prompts[5:8] == [_server_ids(tiny_tokenizer, CONVERSATIONS[4][:n]) for n in (1, 3, 5)]
    assert "at every assistant turn" in sel.summary()

    capped, sel = select_prompts(convs, tiny_tokenizer, tmpl, max_seq_length=MAX_LEN, all_turns=True, limit=4)
    assert capped == prompts[:4] and sel.conversations == 3 and sel.total_conversations == 8
    assert "--num-prompts 4 reached after 3 of 8" in sel.summary() and "none skipped" in sel.summary()


@pytest.mark.parametrize("name", ["qwen", "qwen3", "llama3", "kimi-k25", "plain"])
def test_named_template_prompt_is_what_training_treats_as_scaffolding(prompt_file, tiny_tokenizer, name):
    """With a named template the prompt of a turn = the tokens before that turn's supervised span in the
    training tokenization of the same conversation (nothing the draft was trained to predict)."""
    from torchspec.data.tokenize import Encoder, TokenizeOptions, tokenize_one

    convs = load_conversations([prompt_file], "messages")
    tmpl = get_template(name, tiny_tokenizer)
    prompts, sel = select_prompts(convs, tiny_tokenizer, tmpl, max_seq_length=10_000, all_turns=True)
    assert sel.used == {OPEN_END: 3, ASSISTANT_TURN: 7} and sel.skipped == {NO_USER: 1}
    conv5 = convs[4]
    sample = tokenize_one(conv5, Encoder(tiny_tokenizer), tmpl, TokenizeOptions(max_seq_length=10_000))
    m = sample.loss_mask.tolist()
    run_starts = [t for t in range(len(m)) if m[t] and (t == 0 or not m[t - 1])]
    assert len(run_starts) == 3
    ids = sample.input_ids.tolist()

    def check(prompt, run_start, reply):
        if name != "plain":
            assert prompt == ids[:run_start]
        else:  # "Assistant: " + reply: the space is the start of the reply's first token (" a", "3"), not prompt
            assert prompt == ids[:len(prompt)] and len(prompt) == run_start - 1
            assert tiny_tokenizer.decode(ids[len(prompt):]).startswith(" " + reply)
            assert tiny_tokenizer.decode(prompt).endswith("\nAssistant:")

    # conv 5's three turns are prompts 5..7 (convs 1, 2 give one each, conv 3 two, conv 4 one)
    check(prompts[7], run_starts[-1], "a3")
    if name != "qwen3":  # qwen3 keeps think blocks only after the last user turn: earlier cuts differ
        check(prompts[5], run_starts[0], "a1")
        check(prompts[6], run_starts[1], "a2")
    # an open end is the same generation prompt the template gives before a reply
    reply = tokenize_one(load_conversations([_one(prompt_file.parent, [U("def parse(self, text):"), A("ok")])],
                                            "messages")[0], Encoder(tiny_tokenizer), tmpl,
                         TokenizeOptions(max_seq_length=10_000))
    ids = reply.input_ids.tolist()
    check(prompts[0], int(torch.nonzero(reply.loss_mask)[0]), "ok")


def _one(folder, conv):
    path = folder / f"one-{abs(hash(json.dumps(conv)))}.jsonl"
    path.write_text(json.dumps({"messages": conv}) + "\n")
    return path


# ---- the CLI on a tiny target with an untrained draft (fast: 2 new tokens per prompt) ---------------------------
@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_target_dir):
    from transformers import AutoConfig

    from torchspec.export import export_draft
    from torchspec.models.draft import DraftConfig, build_draft

    cfg = AutoConfig.from_pretrained(str(tiny_target_dir))
    torch.manual_seed(0)
    draft = build_draft(DraftConfig.from_target(cfg))
    return export_draft(draft, tmp_path_factory.mktemp("export"), target_config=cfg, aux_layer_ids=[0, 1, 2],
                        dtype=torch.float32, include_embeddings=False)


def _main(tiny_target_dir, export_dir, data, tmp_path, *extra):
    from torchspec.eval.__main__ import main

    out = tmp_path / "result.json"
    rc = main(["--target", str(tiny_target_dir), "--draft", str(export_dir), "--data", str(data),
               "--max-new-tokens", "2", "-k", "2", "--ignore-eos", "--no-greedy-check",
               "--max-seq-length", str(MAX_LEN), "--prompt-key", "messages", "--output", str(out), *extra])
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


def test_cli_uses_prompt_only_and_last_turns_and_prints_the_counts(tiny_target_dir, export_dir, prompt_file,
                                                                   tmp_path, capsys):
    rc, r = _main(tiny_target_dir, export_dir, prompt_file, tmp_path)
    assert rc == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("prompts: 6 used from 8 conversation(s) (3 ending with a non-assistant turn")
    assert "skipped 2: 1 no user message before the reply" in out and "1 prompt longer than max_seq_length=64" in out
    assert r["num_prompts"] == 6 and r["tokens_generated"] == 12
    assert r["prompt_selection"]["used_by_kind"] == {"open_end": 3, "assistant_turn": 3}
    assert r["prompt_selection"]["skipped"] == {"no_user_message": 1, "too_long": 1}

    rc, r = _main(tiny_target_dir, export_dir, prompt_file, tmp_path, "--all-turns", "--num-prompts", "7")
    assert rc == 0 and r["num_prompts"] == 7
    assert "--num-prompts 7 reached after 5 of 8" in capsys.readouterr().out


def test_cli_errors_are_one_line(tiny_target_dir, export_dir, prompt_file, tmp_path, capsys):
    from torchspec.eval.__main__ import main

    rc, _ = _main(tiny_target_dir, export_dir, prompt_file, tmp_path, "--num-prompts", "0")
    assert rc == 2 and capsys.readouterr().err.strip() == (
        "error: --num-prompts 0: must be >= 1 (leave it out to use every prompt)")
    only_system = _one(tmp_path, [S("no user"), A("hi")])
    rc, _ = _main(tiny_target_dir, export_dir, only_system, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: --data {only_system}: no usable prompt; prompts: 0 used")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [U("ok")]}) + "\n" + '{"messages": [\n')
    rc, _ = _main(tiny_target_dir, export_dir, bad, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {bad} line 2: not valid JSON")
    rc = main(["--target", str(tiny_target_dir), "--draft", str(export_dir), "--data", str(prompt_file)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith(f"error: {prompt_file} line 1: no 'conversations' field (--prompt-key)")
    assert "set --prompt-key messages" in err and "dataset.prompt_key" not in err
    rc, _ = _main(tiny_target_dir, export_dir, prompt_file, tmp_path, "--chat-template", "qwen4")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --chat-template: unknown template 'qwen4' (did you mean 'qwen'?)")
