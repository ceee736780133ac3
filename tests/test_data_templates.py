"""Chat templates: token-by-token loss masks on a two-turn conversation, for every named template."""

import pytest

from torchspec.data.formats import Conversation
from torchspec.data.templates import TEMPLATE_NAMES, get_template
from torchspec.data.tokenize import Encoder, TokenizeOptions, tokenize_one

TWO_TURNS = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What does len do?"},
    {"role": "assistant", "content": "It counts items."},
    {"role": "user", "content": "And sorted?"},
    {"role": "assistant", "content": "It returns a new sorted list."},
]

CHATML = [
    ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat does len do?<|im_end|>\n"
     "<|im_start|>assistant\n", 0),
    ("It counts items.<|im_end|>", 1),
    ("\n<|im_start|>user\nAnd sorted?<|im_end|>\n<|im_start|>assistant\n", 0),
    ("It returns a new sorted list.<|im_end|>", 1),
    ("\n", 0),
]

# Hand-written renderings: (text, 1 if every token of it is supervised else 0).
EXPECTED = {
    "tokenizer": CHATML,  # the tiny tokenizer carries a ChatML template of its own
    "qwen": CHATML,
    "qwen3": CHATML[:3] + [("<think>\n\n</think>\n\n", 0)] + CHATML[3:],  # empty think: in the prompt
    "llama3": [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nWhat does len do?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("It counts items.<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\nAnd sorted?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0),
        ("It returns a new sorted list.<|eot_id|>", 1),
    ],
    "kimi-k25": [
        ("<|im_system|>system<|im_middle|>You are terse.<|im_end|><|im_user|>user<|im_middle|>What does len do?"
         "<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>", 0),
        ("It counts items.<|im_end|>", 1),
        ("<|im_user|>user<|im_middle|>And sorted?<|im_end|><|im_assistant|>assistant<|im_middle|><think></think>", 0),
        ("It returns a new sorted list.<|im_end|>", 1),
    ],
    "plain": [
        ("System: You are terse.\nUser: What does len do?\nAssistant: ", 0),
        ("It counts items.<|im_end|>", 1),  # the tiny tokenizer's EOS token
        ("\nUser: And sorted?\nAssistant: ", 0),
        ("It returns a new sorted list.<|im_end|>", 1),
        ("\n", 0),
    ],
}
EXPECTED["kimi-k25-vlm"] = EXPECTED["kimi-k25"]


def expected_tokens(tok, segments):
    ids, mask = [], []
    for text, m in segments:
        t = tok.encode(text, add_special_tokens=False)
        ids += t
        mask += [m] * len(t)
    return ids, mask


def tokenize(tok, name, messages, max_len=4096, last_only=False):
    conv = Conversation("x-0", messages, "test line 1")
    s = tokenize_one(conv, Encoder(tok), get_template(name, tok), TokenizeOptions(max_len, last_only))
    return s.input_ids.tolist(), s.loss_mask.tolist()


def assert_tokens(tok, got, segments):
    ids, mask = got
    want_ids, want_mask = expected_tokens(tok, segments)
    pieces = tok.convert_ids_to_tokens(ids)
    assert ids == want_ids, f"ids differ:\n{pieces}\n{tok.convert_ids_to_tokens(want_ids)}"
    for i, (p, m, w) in enumerate(zip(pieces, mask, want_mask)):
        assert m == w, f"token {i} {p!r}: mask {m}, expected {w}; tokens {list(zip(pieces, mask))}"


def test_every_template_is_covered():
    assert set(EXPECTED) == set(TEMPLATE_NAMES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turn_mask_token_by_token(tiny_tokenizer, name):
    got = tokenize(tiny_tokenizer, name, TWO_TURNS)
    assert_tokens(tiny_tokenizer, got, EXPECTED[name])
    # Whole-text tokenization: the ids are exactly what the template's text encodes to.
    text = "".join(t for t, _ in EXPECTED[name])
    assert got[0] == tiny_tokenizer.encode(text, add_special_tokens=False)
    supervised = tiny_tokenizer.decode([i for i, m in zip(*got) if m])
    assert supervised.replace("<|eot_id|>", "<|im_end|>") == \
        "It counts items.<|im_end|>It returns a new sorted list.<|im_end|>"


def test_last_turn_loss_only(tiny_tokenizer):
    got = tokenize(tiny_tokenizer, "qwen", TWO_TURNS, last_only=True)
    segs = [(t, 0) for t, _ in CHATML[:3]] + CHATML[3:]
    assert_tokens(tiny_tokenizer, got, segs)


def with_reasoning(first_answer, last_answer):
    return TWO_TURNS[:2] + [{"role": "assistant", "content": first_answer}, TWO_TURNS[3],
                            {"role": "assistant", "content": last_answer}]


def test_qwen_keeps_think_blocks_and_masks_empty_ones(tiny_tokenizer):
    msgs = with_reasoning("<think>\nlen calls __len__\n</think>\n\nIt counts items.",
                          "<think>\n\n</think>\n\nIt returns a new sorted list.")
    got = tokenize(tiny_tokenizer, "qwen", msgs)
    assert_tokens(tiny_tokenizer, got, [
        CHATML[0], ("<think>\nlen calls __len__\n</think>\n\nIt counts items.<|im_end|>", 1), CHATML[2],
        ("<think>\n\n</think>\n\n", 0), CHATML[3], CHATML[4]])


def test_qwen3_strips_history_reasoning_and_supervises_last(tiny_tokenizer):
    msgs = with_reasoning("<think>\nold thoughts\n</think>\n\nIt counts items.",
                          "It returns a new sorted list.")
    msgs[-1]["reasoning_content"] = "sorted copies"
    got = tokenize(tiny_tokenizer, "qwen3", msgs)
    assert_tokens(tiny_tokenizer, got, CHATML[:3] + [
        ("<think>\nsorted copies\n</think>\n\nIt returns a new sorted list.<|im_end|>", 1), CHATML[4]])


def test_kimi_think_opener_is_prompt(tiny_tokenizer):
    msgs = with_reasoning("<think>old</think>It counts items.", "<think>copies</think>It returns a new sorted list.")
    got = tokenize(tiny_tokenizer, "kimi-k25", msgs)
    k = EXPECTED["kimi-k25"]
    # The earlier turn's reasoning is stripped (an empty block, scaffolding); the last turn's
    # `<think>` ends the thinking-mode generation prompt, so only what follows it is supervised.
    last_prompt = k[2][0].removesuffix("<think></think>") + "<think>"
    assert_tokens(tiny_tokenizer, got, [k[0], k[1], (last_prompt, 0),
                                        ("copies</think>It returns a new sorted list.<|im_end|>", 1)])


def test_tokenizer_template_thinking(tiny_tokenizer):
    msgs = with_reasoning("It counts items.", "<think>\nhmm\n</think>\n\nIt returns a new sorted list.")
    got = tokenize(tiny_tokenizer, "tokenizer", msgs)
    assert_tokens(tiny_tokenizer, got, CHATML[:3] + [
        ("<think>\nhmm\n</think>\n\nIt returns a new sorted list.<|im_end|>", 1), CHATML[4]])


def test_qwen_tool_turns(tiny_tokenizer):
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "wx", "arguments": {"c": "Oslo"}}}]},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "It rains."},
    ]
    got = tokenize(tiny_tokenizer, "qwen", msgs)
    assert_tokens(tiny_tokenizer, got, [
        ("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n", 0),
        ('<tool_call>\n{"name": "wx", "arguments": {"c": "Oslo"}}\n</tool_call><|im_end|>', 1),
        ("\n<|im_start|>user\n<tool_response>\nrain\n</tool_response><|im_end|>\n<|im_start|>assistant\n", 0),
        ("It rains.<|im_end|>", 1), ("\n", 0)])


def test_truncation_keeps_prefix(tiny_tokenizer):
    full = tokenize(tiny_tokenizer, "qwen", TWO_TURNS)
    cut = tokenize(tiny_tokenizer, "qwen", TWO_TURNS, max_len=20)
    assert cut[0] == full[0][:20] and cut[1] == full[1][:20]


def test_tokenizer_template_tool_call_only_turn_is_not_misplaced(tiny_tokenizer):
    # The tiny template renders content only, so the tool-call turn is an empty reply: its end-of-turn
    # token is supervised (the documented rule for a reply without content), nothing else of it.
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "wx", "arguments": "{}"}}]},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "It rains."},
    ]
    got = tokenize(tiny_tokenizer, "tokenizer", msgs)
    assert_tokens(tiny_tokenizer, got, [
        ("<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n", 0), ("<|im_end|>", 1),
        ("\n<|im_start|>tool\nrain<|im_end|>\n<|im_start|>assistant\n", 0), ("It rains.<|im_end|>", 1), ("\n", 0)])


def test_tokenizer_without_offsets_encodes_by_segments(tiny_tokenizer):
    class NoOffsets:  # stands in for a "slow" (pure Python) tokenizer: encode() only
        def encode(self, text, add_special_tokens=False):
            return tiny_tokenizer.encode(text, add_special_tokens=add_special_tokens)

    rendered = [get_template("qwen", tiny_tokenizer).render(TWO_TURNS)]
    (ids, mask), = Encoder(NoOffsets()).encode(rendered)
    assert_tokens(tiny_tokenizer, (ids.tolist(), mask.tolist()), CHATML)
