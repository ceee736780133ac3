"""Adversarial replies: every template supervises each reply and its end-of-turn token, never the template's text.

The oracle is transformers' own assistant mask (`return_assistant_tokens_mask`) of a jinja twin of each
template whose replies sit in `{% generation %}` blocks: the twin renders the same text, and transformers
marks every token that overlaps a reply. Our rule (a token is supervised when it STARTS inside a reply,
tokenize.py) differs from it only on a token that begins in the template's text and runs into the reply
(e.g. "Ġa" after "Assistant:"), so those are the only differences allowed, except for the `tokenizer`
template on a marked template, which must equal transformers' mask exactly.
"""

import copy

import pytest

from torchspec.data.formats import Conversation
from torchspec.data.templates import TEMPLATE_NAMES, get_template
from torchspec.data.tokenize import Encoder, TokenizeOptions, tokenize_one
from torchspec.utils.tiny import CHATML_TEMPLATE

SYSTEM = "You are terse."
ADVERSARIAL = ["assistant", "user", "system", "a", "d", "end", "im_end|>", "<|im_end|>", "<|eot_id|>", "",
               " ", "  \n ", "\n", SYSTEM, "Assistant: ", "think", "It counts items.", "\nhi"]

# Jinja twins of our named templates for system/user/assistant conversations, replies marked. transformers
# renders with trim_blocks, so a newline right after a tag is written {{ '\\n' }}.
_ASSISTANT_LAST_USER = ("{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}"
                        "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}")
CHATML_MARKED = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TWINS = {
    "qwen": CHATML_MARKED,
    "qwen3": _ASSISTANT_LAST_USER + (
        "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
        "{% if loop.index0 > ns.last %}<think>\n\n</think>\n\n{% endif %}"
        "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"),
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}<|eot_id|>{% endgeneration %}"
        "{% else %}{{ m.content | trim }}<|eot_id|>{% endif %}{% endfor %}"),
    "kimi-k25": (
        "{% for m in messages %}{% if m.role == 'assistant' %}<|im_assistant|>assistant<|im_middle|><think></think>"
        "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
        "{% elif m.role == 'user' %}<|im_user|>user<|im_middle|>{{ m.content }}<|im_end|>"
        "{% else %}<|im_system|>system<|im_middle|>{{ m.content }}<|im_end|>{% endif %}{% endfor %}"),
    "plain": (
        "{% for m in messages %}{% if m.role == 'assistant' %}Assistant: "
        "{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}{{ 'System' if m.role == 'system' else 'User' }}: {{ m.content }}\n{% endif %}{% endfor %}"),
    # The `tokenizer` template on the tiny tokenizer's unmarked ChatML template: rendered like qwen.
    "tokenizer": CHATML_MARKED,
}
TWINS["kimi-k25-vlm"] = TWINS["kimi-k25"]


def conversation(reply):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does len do?"},
            {"role": "assistant", "content": reply}, {"role": "user", "content": "And sorted?"},
            {"role": "assistant", "content": "It returns a new list."}]


def with_template(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def ours(tok, name, messages):
    s = tokenize_one(Conversation("x-0", messages, "test line 1"), Encoder(tok), get_template(name, tok),
                     TokenizeOptions(4096))
    return s.input_ids.tolist(), s.loss_mask.tolist()


def theirs(tok, messages):
    """(ids, transformers' assistant mask, offsets, rendered text) of a template with generation markers."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                  tokenizer_kwargs={"return_offsets_mapping": True})
    return out["input_ids"], out["assistant_masks"], out["offset_mapping"], tok.apply_chat_template(messages,
                                                                                                   tokenize=False)


def straddles(i, mask, offsets, text):
    """Token i opens a run of transformers' mask and begins with template whitespace (the leading-space rule)."""
    a, b = offsets[i]
    return mask[i] == 1 and (i == 0 or mask[i - 1] == 0) and text[a:b][:1].isspace()


def test_every_template_has_a_twin():
    assert set(TWINS) == set(TEMPLATE_NAMES)


@pytest.mark.parametrize("reply", ADVERSARIAL, ids=repr)
@pytest.mark.parametrize("name", sorted(TWINS))
def test_adversarial_reply_mask_matches_transformers(tiny_tokenizer, name, reply):
    msgs = conversation(reply)
    twin = with_template(tiny_tokenizer, TWINS[name])
    ids, want, offsets, text = theirs(twin, msgs)
    tok = with_template(tiny_tokenizer, CHATML_TEMPLATE) if name == "tokenizer" else tiny_tokenizer
    got_ids, got = ours(tok, name, msgs)
    assert tok.decode(got_ids, skip_special_tokens=False) == text and got_ids == ids
    pieces = tok.convert_ids_to_tokens(ids)
    bad = [(i, pieces[i], got[i], want[i]) for i in range(len(ids))
           if got[i] != want[i] and not straddles(i, want, offsets, text)]
    assert not bad, f"{name} reply {reply!r}: (token, ours, transformers) differ at {bad}; {list(zip(pieces, got))}"
    # Each assistant turn keeps its end-of-turn token supervised: no reply leaves its turn unsupervised.
    end = {"llama3": "<|eot_id|>"}.get(name, "<|im_end|>")
    ends = [i for i, p in enumerate(pieces) if p == end and got[i]]
    assert len(ends) == 2 + reply.count(end), f"{name} reply {reply!r}: supervised end tokens at {ends}; {list(zip(pieces, got))}"


@pytest.mark.parametrize("reply", ADVERSARIAL, ids=repr)
def test_tokenizer_template_with_generation_markers_is_transformers_mask(tiny_tokenizer, reply):
    msgs = conversation(reply)
    tok = with_template(tiny_tokenizer, CHATML_MARKED)
    ids, want, _, _ = theirs(tok, msgs)
    assert get_template("tokenizer", tok).uses_markers
    assert ours(tok, "tokenizer", msgs) == (ids, want)


@pytest.mark.parametrize("reply", ["assistant", "a", "", "  "], ids=repr)
def test_tokenizer_template_reply_that_the_template_trims(tiny_tokenizer, reply):
    # An unmarked template that changes replies (trims them): located by rendering, not by searching.
    tok = with_template(tiny_tokenizer, TWINS["llama3"].replace("{% generation %}", "").replace(
        "{% endgeneration %}", ""))
    msgs = conversation(reply)
    assert ours(tok, "tokenizer", msgs) == ours(tiny_tokenizer, "llama3", msgs)


@pytest.mark.parametrize("name", sorted(TWINS))
def test_assistant_message_without_content_is_an_empty_reply(tmp_path, tiny_tokenizer, name):
    """One behaviour for every template: a message with no content supervises its end-of-turn token only."""
    from torchspec.data.formats import normalize_messages

    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"},
                             {"from": "human", "value": "again"}, {"from": "gpt", "value": None}]}
    msgs = normalize_messages(rec, "conversations", "t line 1")
    tok = with_template(tiny_tokenizer, CHATML_TEMPLATE) if name == "tokenizer" else tiny_tokenizer
    ids, mask = ours(tok, name, msgs)
    supervised = [p for p, m in zip(tok.convert_ids_to_tokens(ids), mask) if m]
    assert supervised == [{"llama3": "<|eot_id|>"}.get(name, "<|im_end|>")] * 2


# Qwen3-style, unmarked: reasoning (reasoning_content or a <think> block in the content) is rendered only in the
# turns after the last user message, so the template's own text around a reply depends on the reply.
QWEN3_LIKE = _ASSISTANT_LAST_USER + (
    "{% for m in messages %}{% if m.role == 'assistant' %}{% set content = m.content %}"
    "{% set rc = m.reasoning_content or '' %}{% if '</think>' in content %}"
    "{% set rc = content.split('</think>')[0].split('<think>')[-1] %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last %}<think>\n{{ rc.strip('\\n') }}\n</think>\n\n{% endif %}{{ content }}<|im_end|>"
    "{{ '\\n' }}{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{{ '\\n' }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("last", ["It returns a new list.", "assistant", "", "think"], ids=repr)
def test_tokenizer_template_reasoning_located_by_rendering(tiny_tokenizer, last):
    msgs = conversation("<think>\nold thoughts\n</think>\n\nIt counts items.")
    msgs[-1] = {"role": "assistant", "content": last, "reasoning_content": "sorted copies"}
    tok = with_template(tiny_tokenizer, QWEN3_LIKE)
    assert ours(tok, "tokenizer", msgs) == ours(tiny_tokenizer, "qwen3", msgs)
