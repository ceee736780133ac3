"""Regeneration (issue 14): the target writes every assistant turn (torchspec/data/regenerate.py,
torchspec/inference/generate.py, python -m torchspec.regenerate)."""

import pytest

from torchspec.config import ConfigError, load_config

REQUIRED_SET = ["model.target_model_path=/x", "dataset.train_data_path=/y"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("dataset.generation.max_new_tokens=0", "dataset.generation.max_new_tokens=0: must be > 0 (command line)"),
        ("dataset.generation.temperature=-0.5", "dataset.generation.temperature=-0.5: must be >= 0 (command line)"),
        ("dataset.generation.top_p=0", "dataset.generation.top_p=0.0: must be in (0, 1] (1 = off) (command line)"),
        ("dataset.generation.top_p=1.5", "dataset.generation.top_p=1.5: must be in (0, 1]"),
        ("dataset.generation.top_k=-1", "dataset.generation.top_k=-1: must be >= 0 (command line)"),
        ("dataset.generation.seed=-3", "dataset.generation.seed=-3: must be >= 0"),
        ("dataset.generation.batch_size=0", "dataset.generation.batch_size=0: must be > 0"),
        ("dataset.generation.on_truncated=cut",
         "dataset.generation.on_truncated='cut': unknown value, expected one of keep, drop"),
        ("dataset.generation.temprature=1", "unknown key 'dataset.generation.temprature' (command line); "
                                            "did you mean 'dataset.generation.temperature'?"),
        ("dataset.regenerate=maybe", "dataset.regenerate: expected true or false"),
    ],
)
def test_bad_generation_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], [*REQUIRED_SET, override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_generation_settings_load():
    cfg = load_config([], [*REQUIRED_SET, "dataset.regenerate=true", "dataset.generation.temperature=0.7",
                           "dataset.generation.top_k=20", "dataset.generation.on_truncated=drop"])
    g = cfg.dataset.generation
    assert cfg.dataset.regenerate is True
    assert (g.temperature, g.top_k, g.top_p, g.on_truncated, g.max_new_tokens) == (0.7, 20, 1.0, "drop", 512)


# ---------------------------------------------------------------- generation against the tiny target

import torch  # noqa: E402

from torchspec.config.schema import GenerationConfig  # noqa: E402
from torchspec.data.formats import Conversation  # noqa: E402
from torchspec.data.regenerate import TurnPrompter, regenerate  # noqa: E402
from torchspec.data.templates import get_template  # noqa: E402
from torchspec.data.tokenize import TokenizeOptions, tokenize_one, Encoder  # noqa: E402


@pytest.fixture(scope="module")
def target(tiny_target_dir):
    from torchspec.inference.hf import load_target

    return load_target(str(tiny_target_dir), torch.float32, "cpu")


def _hf(target, tiny_tokenizer):
    from torchspec.inference.generate import HFGenerator

    return HFGenerator(target, tiny_tokenizer.pad_token_id)


def greedy_loop(model, prompt: list[int], stop_ids: list[int], max_new_tokens: int) -> tuple[list[int], bool]:
    """The target's own greedy decoding, one full forward per token (no cache, no padding)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in stop_ids:
                return out, False
            out.append(nxt)
            ids.append(nxt)
    return out, True


def _conv(i, *turns):
    roles = ["user", "assistant"]
    return Conversation(f"c-{i}", [{"role": roles[j % 2], "content": t} for j, t in enumerate(turns)], f"f line {i}")


CONVS = [
    _conv(0, "def add(a, b):", "return a + b", "and subtract?", "return a - b"),
    _conv(1, "import os\nprint(os.getcwd())"),                   # prompt only: its reply is generated
    _conv(2, "class Foo:", "pass"),
    _conv(3, "for i in range(10):\n    print(i)", "ok", "while True:"),   # ends with a user turn
]


def test_replies_equal_the_targets_greedy_decoding_token_for_token(target, tiny_tokenizer):
    settings = GenerationConfig(max_new_tokens=12, batch_size=3)   # groups of 3 + 1, left-padded batches
    prompter = TurnPrompter(get_template("qwen", tiny_tokenizer), tiny_tokenizer)
    out = [r for group in regenerate(CONVS, prompter, _hf(target, tiny_tokenizer), settings) for r in group]
    assert [r.sample_id for r in out] == ["c-0", "c-1", "c-2", "c-3"]
    assert [len(r.replies) for r in out] == [2, 1, 1, 2]
    assert [[m["role"] for m in r.messages] for r in out] == [
        ["user", "assistant", "user", "assistant"], ["user", "assistant"], ["user", "assistant"],
        ["user", "assistant", "user", "assistant"]]
    for conv, r in zip(CONVS, out):
        # user turns verbatim
        assert [m for m in r.messages if m["role"] == "user"] == [m for m in conv.messages if m["role"] == "user"]
        # each reply is the target's greedy continuation of the conversation so far (earlier replies regenerated)
        for k, reply in enumerate(r.replies):
            upto = [i for i, m in enumerate(r.messages) if m["role"] == "assistant"][k]
            prompt = prompter.prompt(r.messages[:upto])
            ref, cut = greedy_loop(target, prompt, prompter.stop_ids, settings.max_new_tokens)
            assert reply == ref, (conv.sample_id, k)
            assert r.messages[upto]["content"] == tiny_tokenizer.decode(ref)
            assert r.truncated >= cut
    # the later turn is conditioned on the regenerated earlier one: its prompt holds the target's first reply
    first = tiny_tokenizer.decode(out[0].replies[0])
    assert first != "return a + b" and first in tiny_tokenizer.decode(prompter.prompt(out[0].messages[:3]))
    assert "<|im_start|>assistant\n" + first + "<|im_end|>" in tiny_tokenizer.decode(prompter.prompt(out[0].messages[:3]))


@pytest.fixture(scope="module")
def stopping_target(target, tiny_tokenizer):
    """The tiny target made to end its turns: <|im_end|> takes the place of the token most of its greedy
    replies use (same lm_head row, that token's row damped), so replies stop where that token would come."""
    import collections
    import copy

    model = copy.deepcopy(target)
    prompter = TurnPrompter(get_template("qwen", tiny_tokenizer), tiny_tokenizer)
    seen = collections.Counter()
    for c in CONVS:
        reply, _ = greedy_loop(model, prompter.prompt(c.messages[:1]), prompter.stop_ids, 16)
        seen.update(set(reply[1:]))
    token = seen.most_common(1)[0][0]
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        w[tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")] = w[token]
        w[token] *= 0.9
    return model


def test_masks_cover_exactly_the_generated_tokens_plus_end_of_turn(stopping_target, tiny_tokenizer):
    settings = GenerationConfig(max_new_tokens=24, batch_size=4)
    template = get_template("qwen", tiny_tokenizer)
    prompter = TurnPrompter(template, tiny_tokenizer)
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prompter.stop_ids[0] == im_end
    out = [r for group in regenerate(CONVS, prompter, _hf(stopping_target, tiny_tokenizer), settings) for r in group]
    ended = [len(x) for r in out for x in r.replies if len(x) < settings.max_new_tokens]
    assert len(ended) >= 3, [[len(x) for x in r.replies] for r in out]   # most replies ended with <|im_end|>
    canonical = 0
    for r in out:
        sample = tokenize_one(Conversation(r.sample_id, r.messages, r.location), Encoder(tiny_tokenizer), template,
                              TokenizeOptions(max_seq_length=100_000))
        ids, mask = sample.input_ids.tolist(), sample.loss_mask.tolist()
        runs, run = [], None      # the supervised runs of the record, one per reply
        for t, m in zip(ids, mask):
            if m and run is None:
                run = []
                runs.append(run)
            if m:
                run.append(t)
            else:
                run = None
        assert len(runs) == len(r.replies), r.sample_id
        for reply, run in zip(r.replies, runs):
            # each run is the reply's text closed by the end-of-turn token (a reply cut at max_new_tokens and
            # kept gets it from the template) and nothing else ...
            assert run[-1] == im_end and tiny_tokenizer.decode(run[:-1]) == tiny_tokenizer.decode(reply)
            # ... and, token for token, the generated ids wherever they are the tokenizer's own spelling of that
            # text (a random target may emit a spelling the tokenizer would not: the record holds the tokenizer's)
            if tiny_tokenizer.encode(tiny_tokenizer.decode(reply), add_special_tokens=False) == reply:
                canonical += 1
                assert run == reply + [im_end]
    assert canonical >= 1
