"""Chat templates: a conversation -> (text, supervised character spans).

A template renders the whole conversation to one string and reports, for every assistant turn, the
character span the draft must learn to predict: the turn's content (with its reasoning block when
it has one, and its tool calls) and the turn's end-of-turn token. Everything else — the system and
user turns, role headers, separators, and the empty think block that a non-thinking generation
prompt already contains — is scaffolding (loss mask 0).

Names (dataset.chat_template):
  tokenizer  the target tokenizer's own `apply_chat_template`; replies found by transformers' assistant
             mask when the template has `{% generation %}` markers, else by rendering with sentinel
             replies (TokenizerTemplate), never by searching for the reply's text

An assistant message without content (missing, null or "") is an empty reply in every template: its
end-of-turn token is supervised, nothing else of the turn (tool calls, when the template renders them, are
part of the reply).
  qwen       ChatML as Qwen2.5 / Qwen3 data is usually stored: each turn's think block kept as the
             data has it; an EMPTY think block (`<think>\n\n</think>\n\n`) is scaffolding.
             Tool results are grouped into a user turn in <tool_response> tags, tool calls are
             <tool_call> JSON (supervised). No default system prompt is added (none of the named
             templates adds one: the data's own system turn is used when present)
  qwen3      Qwen3's own template: think blocks stripped from turns before the last user message;
             the turns after it always carry one (empty = scaffolding, as enable_thinking=False
             puts it in the generation prompt)
  llama3     Llama 3 headers, `<|eot_id|>`; tool results use the `ipython` role
  kimi-k25   Kimi-K2.5: `<|im_assistant|>assistant<|im_middle|>`, `<think>` opens every assistant
             turn (in the generation prompt, so scaffolding); earlier turns' reasoning is stripped
  kimi-k25-vlm  kimi-k25 with Kimi-K2.5's image block (below)
  plain      "User: ...\nAssistant: ...<eos>\n" for tokenizers without a template

Images (data/multimodal.py): a template with an `image_placeholder` writes it where each image sits in a
system/user/tool turn (scaffolding: never supervised); the engine expands it to the image's tokens.
  qwen, qwen3    `<|vision_start|><|image_pad|><|vision_end|>` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)
  kimi-k25-vlm   `<|media_begin|>image<|media_content|><|media_pad|><|media_end|>` + newline (Kimi-K2.5)
The others (llama3, kimi-k25, plain, tokenizer) have none: a conversation with images is a DataError.
"""

from __future__ import annotations

import json
import re

from torchspec.config.schema import CHAT_TEMPLATES
from torchspec.data.errors import DataError
from torchspec.data.multimodal import with_placeholders


class _Builder:
    """Concatenates text pieces and records which character ranges are supervised."""

    def __init__(self):
        self.parts: list[str] = []
        self.n = 0
        self.spans: list[tuple[int, int]] = []  # one per assistant turn

    def add(self, text: str, supervised: bool = False):
        if supervised and text:
            self.spans.append((self.n, self.n + len(text)))
        self.parts.append(text)
        self.n += len(text)

    def result(self) -> tuple[str, list[tuple[int, int]]]:
        return "".join(self.parts), self.spans


def split_reasoning(message: dict) -> tuple[str | None, str]:
    """(reasoning or None when the turn has no think block, answer text).

    The answer loses the newlines that separate it from a think block (template layout, not content).
    """
    content = message["content"]
    if message.get("reasoning_content") is not None:
        return str(message["reasoning_content"]), content.lstrip("\n")
    if "</think>" in content:
        before, after = content.split("</think>", 1)
        return before.split("<think>", 1)[-1], after.lstrip("\n")
    return None, content


def _tool_call_parts(message: dict) -> list[tuple[str, str]]:
    """[(function name, arguments as a JSON string)] of an assistant message's tool calls."""
    out = []
    for tc in message.get("tool_calls") or []:
        fn = tc.get("function", tc) if isinstance(tc, dict) else {}
        args = fn.get("arguments", {})
        out.append((str(fn.get("name", "")), args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
    return out


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _last_user_index(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)


class ChatTemplate:
    name = ""
    image_placeholder: str | None = None   # what stands for one image in the rendered text (None: no images)

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        raise NotImplementedError

    def render_conversation(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """render(), with each image of the conversation written as this template's image_placeholder."""
        return self.render(with_placeholders(messages, self.image_placeholder, self.name))

    def identity(self) -> str:
        """What the tokenization cache key records about this template."""
        return f"{self.name}/v1"


class QwenTemplate(ChatTemplate):
    """ChatML. `qwen3=True` applies Qwen3's think-block rules (see the module docstring)."""

    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"

    def __init__(self, qwen3: bool = False):
        self.qwen3 = qwen3
        self.name = "qwen3" if qwen3 else "qwen"

    def render(self, messages):
        b = _Builder()
        last_user = _last_user_index(messages)
        for i, m in enumerate(messages):
            role = m["role"]
            if role == "assistant":
                b.add("<|im_start|>assistant\n")
                reasoning, answer = split_reasoning(m)
                if self.qwen3:
                    reasoning = None if i < last_user else (reasoning or "")
                if reasoning is None:
                    body = answer
                elif reasoning.strip():
                    thought = reasoning.strip("\n")
                    body = f"<think>\n{thought}\n</think>\n\n{answer}"
                else:
                    b.add("<think>\n\n</think>\n\n")
                    body = answer
                calls = "\n".join(f'<tool_call>\n{{"name": {json.dumps(n)}, "arguments": {a}}}\n</tool_call>'
                                  for n, a in _tool_call_parts(m))
                if calls:
                    body = f"{body}\n{calls}" if body else calls
                b.add(body + "<|im_end|>", supervised=True)
                b.add("\n")
            elif role == "tool":  # Qwen groups consecutive tool results into one user turn
                first = i == 0 or messages[i - 1]["role"] != "tool"
                last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
                b.add(("<|im_start|>user" if first else "")
                      + f"\n<tool_response>\n{m['content']}\n</tool_response>"
                      + ("<|im_end|>\n" if last else ""))
            else:
                b.add(f"<|im_start|>{role}\n{m['content']}<|im_end|>\n")
        return b.result()


class Llama3Template(ChatTemplate):
    name = "llama3"

    def render(self, messages):
        b = _Builder()
        b.add("<|begin_of_text|>")
        for m in messages:
            role = "ipython" if m["role"] == "tool" else m["role"]
            b.add(f"<|start_header_id|>{role}<|end_header_id|>\n\n")
            body = m["content"].strip()
            calls = [json.dumps({"name": n, "parameters": _json_or_text(a)}) for n, a in _tool_call_parts(m)]
            if calls:
                body = "\n".join(([body] if body else []) + calls)
            b.add(body + "<|eot_id|>", supervised=m["role"] == "assistant")
        return b.result()


class KimiK25Template(ChatTemplate):
    name = "kimi-k25"
    HEADERS = {
        "system": "<|im_system|>system<|im_middle|>",
        "user": "<|im_user|>user<|im_middle|>",
        "assistant": "<|im_assistant|>assistant<|im_middle|>",
        "tool": "<|im_system|>tool<|im_middle|>",
    }
    END = "<|im_end|>"

    def render(self, messages):
        b = _Builder()
        last_user = _last_user_index(messages)
        for i, m in enumerate(messages):
            role = m["role"]
            b.add(self.HEADERS[role])
            if role != "assistant":
                body = m["content"]
                if role == "tool" and m.get("tool_call_id"):
                    body = f"## Return of {m['tool_call_id']}\n{body}"
                b.add(body + self.END)
                continue
            reasoning, answer = split_reasoning(m)
            if i < last_user:
                reasoning = None
            calls = "".join(f"<|tool_call_begin|>{n}<|tool_call_argument_begin|>{a}<|tool_call_end|>"
                            for n, a in _tool_call_parts(m))
            if calls:
                answer += f"<|tool_calls_section_begin|>{calls}<|tool_calls_section_end|>"
            if reasoning is not None and reasoning.strip():
                b.add("<think>")  # the thinking-mode generation prompt ends with it
                b.add(f"{reasoning}</think>{answer}{self.END}", supervised=True)
            else:
                b.add("<think></think>")  # the non-thinking generation prompt ends with it
                b.add(answer + self.END, supervised=True)
        return b.result()


class KimiK25VLTemplate(KimiK25Template):
    """Kimi-K2.5 with images: one media block per image (a single `<|media_pad|>` the engine expands)."""

    name = "kimi-k25-vlm"
    image_placeholder = "<|media_begin|>image<|media_content|><|media_pad|><|media_end|>\n"


class PlainTemplate(ChatTemplate):
    """For base models whose tokenizer has no chat template: role labels and the EOS token."""

    name = "plain"
    LABELS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}

    def __init__(self, eos_token: str):
        self.eos_token = eos_token

    def identity(self):
        return f"plain/v1/{self.eos_token}"

    def render(self, messages):
        b = _Builder()
        for m in messages:
            b.add(f"{self.LABELS[m['role']]}: ")
            if m["role"] == "assistant":
                b.add(m["content"] + self.eos_token, supervised=True)
                b.add("\n")
            else:
                b.add(m["content"] + "\n")
        return b.result()


_GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


class TokenizerTemplate(ChatTemplate):
    """The target tokenizer's own chat template (rendered by `apply_chat_template`).

    Replies are never located by searching for their text (a reply may equal any piece of the
    template's own text). Two ways, by what the template offers:
      markers   the template marks replies with `{% generation %}` (and the tokenizer has offsets):
                the supervised tokens are transformers' own assistant mask
                (`return_assistant_tokens_mask`), turned into character spans of the rendered text;
      sentinels otherwise: the conversation is rendered again with a reply replaced by a unique
                sentinel; where that rendering differs from the real one is the reply, plus the
                special token that ends the turn when one follows it.
    An assistant message with no content is an empty reply: its end-of-turn token is supervised
    (as transformers' mask and every named template do).
    """

    name = "tokenizer"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = tokenizer.chat_template
        try:
            resolved = tokenizer.get_chat_template()
        except Exception:  # several named templates and no default: apply_chat_template reports it later
            resolved = self.template if isinstance(self.template, str) else ""
        self.uses_markers = bool(_GENERATION_MARKER.search(resolved or "")) and \
            getattr(tokenizer, "is_fast", False)
        # Special/added tokens, longest first: the one right after a reply ends the turn.
        added = set(getattr(tokenizer, "all_special_tokens", []) or [])
        added |= set((getattr(tokenizer, "get_added_vocab", dict)() or {}).keys())
        self.end_tokens = sorted(added, key=len, reverse=True)

    def identity(self):
        return f"tokenizer/v2/{self.template if isinstance(self.template, str) else json.dumps(self.template)}"

    def _apply(self, messages, **kw):
        try:
            return self.tokenizer.apply_chat_template(messages, **kw)
        except Exception as e:  # a jinja error raised by the template itself
            raise DataError(f"the tokenizer's chat template failed on this conversation: {e}") from None

    def render(self, messages):
        text = self._apply(messages, tokenize=False)
        if self.uses_markers:
            return text, self._marked_spans(messages, text)
        return text, self._sentinel_spans(messages, text)

    def _marked_spans(self, messages, text):
        """Runs of transformers' assistant mask -> character spans of `text`."""
        out = self._apply(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                          tokenizer_kwargs={"return_offsets_mapping": True})
        spans: list[tuple[int, int]] = []
        prev = 0
        for m, (a, b) in zip(out["assistant_masks"], out["offset_mapping"]):
            if m and prev and spans:
                spans[-1] = (spans[-1][0], max(spans[-1][1], b))
            elif m:
                spans.append((a, b))
            prev = m
        return spans

    def _sentinel_spans(self, messages, text):
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            return []
        sentinels = _sentinels(text, len(turns))
        # Fast path: one rendering with every reply replaced; when the real text is that rendering with
        # each sentinel put back as the reply's content, the replies sit exactly there.
        pieces = self._pieces(messages, dict(zip(turns, sentinels)))
        spans = None
        if pieces is not None:
            spans, pos, rebuilt = [], 0, []
            for k, i in enumerate(turns):
                pos += len(pieces[k])
                spans.append((pos, pos + len(messages[i]["content"])))
                pos = spans[-1][1]
                rebuilt += [pieces[k], messages[i]["content"]]
            if "".join(rebuilt + [pieces[-1]]) != text:
                spans = None
        if spans is None:  # the template changes replies or its own text with them: one turn at a time
            spans = [self._diff_span(messages, i, text, sentinels[0]) for i in turns]
        out, prev_end = [], 0
        for i, span in zip(turns, spans):
            if span[0] < prev_end:
                continue  # the template does not render this turn's reply apart from the one before
            start, end = span
            reasoning, _ = split_reasoning(messages[i])
            if reasoning is not None and reasoning.strip():
                tag = text.rfind("<think>", prev_end, start)  # a think block is supervised from its tag
                start = tag if tag >= 0 else start
            end += len(next((t for t in self.end_tokens if text.startswith(t, end)), ""))
            if end > start:
                out.append((start, end))
            prev_end = max(prev_end, end)
        return out

    def _pieces(self, messages, replace: dict[int, str]) -> list[str] | None:
        """The rendering with messages[i]'s reply replaced by replace[i], cut at the sentinels (None when a
        sentinel is not rendered exactly once, in order)."""
        rendered = self._apply([_as_sentinel(m, replace[i]) if i in replace else m for i, m in enumerate(messages)],
                               tokenize=False)
        pieces, pos = [], 0
        for s in replace.values():
            at = rendered.find(s, pos)
            if at < 0 or rendered.count(s) != 1:
                return None
            pieces.append(rendered[pos:at])
            pos = at + len(s)
        return pieces + [rendered[pos:]]

    def _diff_span(self, messages, i, text, sentinel) -> tuple[int, int]:
        """Where `text` differs from the rendering with only reply i replaced (clamped to the sentinel)."""
        pieces = self._pieces(messages, {i: sentinel})
        if pieces is None:
            raise DataError("the tokenizer's chat template does not render assistant replies as given, so their "
                            "tokens cannot be found; set dataset.chat_template to a named template")
        before, after = pieces
        other = before + sentinel + after
        start = min(_common_prefix(text, other), len(before))
        end = len(text) - min(_common_suffix(text, other), len(after), len(text) - start)
        return start, end


def _as_sentinel(message: dict, sentinel: str) -> dict:
    """The message with its reply (content, reasoning, tool calls) replaced by the sentinel."""
    out = {k: v for k, v in message.items() if k not in ("reasoning_content", "tool_calls")}
    out["content"] = sentinel
    return out


def _sentinels(text: str, n: int) -> list[str]:
    """n distinct strings that occur nowhere in `text` (letters and digits only: no template trims them)."""
    tag = "TSPEC"
    while tag in text:
        tag += "X"
    return [f"{tag}{k}R{tag}" for k in range(n)]


def _common_prefix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # the largest n with a[:n] == b[:n], by slice comparisons (C speed)
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str) -> int:
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


NAMED = {
    "qwen": lambda tok: QwenTemplate(qwen3=False),
    "qwen3": lambda tok: QwenTemplate(qwen3=True),
    "llama3": lambda tok: Llama3Template(),
    "kimi-k25": lambda tok: KimiK25Template(),
    "kimi-k25-vlm": lambda tok: KimiK25VLTemplate(),
    "plain": lambda tok: PlainTemplate(_eos_token(tok)),
}
TEMPLATE_NAMES = ("tokenizer",) + tuple(NAMED)
assert TEMPLATE_NAMES == CHAT_TEMPLATES, "config/schema.py CHAT_TEMPLATES must list the templates defined here"


def _eos_token(tokenizer) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise DataError("dataset.chat_template: 'plain' ends assistant turns with the tokenizer's EOS token, "
                        "but this tokenizer has none")
    return eos


def get_template(name: str | None, tokenizer) -> ChatTemplate:
    """The template called `name` (dataset.chat_template); None or "tokenizer" = the tokenizer's own."""
    if name is None or name == "tokenizer":
        if not getattr(tokenizer, "chat_template", None):
            where = getattr(tokenizer, "name_or_path", "") or "the target"
            raise DataError(f"dataset.chat_template: the tokenizer of {where!r} has no chat template of its own; "
                            f"set dataset.chat_template to one of: {', '.join(NAMED)}")
        return TokenizerTemplate(tokenizer)
    if name not in NAMED:
        import difflib

        close = difflib.get_close_matches(name, TEMPLATE_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"dataset.chat_template: unknown template {name!r}{hint}; "
                        f"choose one of: {', '.join(TEMPLATE_NAMES)}")
    return NAMED[name](tokenizer)
