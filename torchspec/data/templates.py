"""Chat templates: a conversation -> (text, supervised character spans).

A template renders the whole conversation to one string and reports, for every assistant turn, the
character span the draft must learn to predict: the turn's content (with its reasoning block when
it has one, and its tool calls) and the turn's end-of-turn token. Everything else — the system and
user turns, role headers, separators, and the empty think block that a non-thinking generation
prompt already contains — is scaffolding (loss mask 0).

Names (dataset.chat_template):
  tokenizer  the target tokenizer's own `apply_chat_template` (spans found by locating each
             assistant message's content in the rendered text, plus the special token after it)
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
  plain      "User: ...\nAssistant: ...<eos>\n" for tokenizers without a template
"""

from __future__ import annotations

import json

from torchspec.config.schema import CHAT_TEMPLATES
from torchspec.data.errors import DataError


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

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        raise NotImplementedError

    def identity(self) -> str:
        """What the tokenization cache key records about this template."""
        return f"{self.name}/v1"


class QwenTemplate(ChatTemplate):
    """ChatML. `qwen3=True` applies Qwen3's think-block rules (see the module docstring)."""

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


class TokenizerTemplate(ChatTemplate):
    """The target tokenizer's own chat template (rendered by `apply_chat_template`)."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.template = tokenizer.chat_template
        # Special/added tokens, longest first: the one right after a turn's content ends the turn.
        added = set(getattr(tokenizer, "all_special_tokens", []) or [])
        added |= set((getattr(tokenizer, "get_added_vocab", dict)() or {}).keys())
        self.end_tokens = sorted(added, key=len, reverse=True)

    def identity(self):
        return f"tokenizer/v1/{self.template if isinstance(self.template, str) else json.dumps(self.template)}"

    def render(self, messages):
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # a jinja error raised by the template itself
            raise DataError(f"the tokenizer's chat template failed on this conversation: {e}") from None
        spans, cursor = [], 0
        for m in messages:
            if m["role"] != "assistant":
                start, needle = self._find(text, m["content"], cursor)
                if start >= 0:
                    cursor = start + len(needle)
                continue
            reasoning, answer = split_reasoning(m)
            span_start = None
            if reasoning is not None and reasoning.strip():
                # A non-empty think block: supervised from its opening tag (when rendered) on.
                r_start, r_needle = self._find(text, reasoning.strip(), cursor)
                if r_start >= 0:
                    tag = text.rfind("<think>", cursor, r_start)
                    span_start = tag if tag >= 0 else r_start
                    cursor = r_start + len(r_needle)
            if span_start is None and not answer.strip():
                continue  # e.g. a tool-call-only turn: the template renders the call its own way
            start, needle = self._find(text, answer, cursor)
            if start < 0:
                raise DataError("the tokenizer's chat template changed an assistant message so that its "
                                "text cannot be located; set dataset.chat_template to a named template")
            end = start + len(needle)
            end += len(next((t for t in self.end_tokens if text.startswith(t, end)), ""))
            span_start = start if span_start is None else span_start
            if end > span_start:
                spans.append((span_start, end))
            cursor = end
        return text, spans

    @staticmethod
    def _find(text: str, content: str, cursor: int) -> tuple[int, str]:
        for needle in (content, content.strip()):
            pos = text.find(needle, cursor)
            if pos >= 0:
                return pos, needle
        return -1, content


NAMED = {
    "qwen": lambda tok: QwenTemplate(qwen3=False),
    "qwen3": lambda tok: QwenTemplate(qwen3=True),
    "llama3": lambda tok: Llama3Template(),
    "kimi-k25": lambda tok: KimiK25Template(),
    "kimi-k25-vlm": lambda tok: KimiK25Template(),  # the original TorchSpec's name (text only here)
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
