"""Evaluation prompts from conversation files: what a server is asked to continue.

A conversation gives prompts at its evaluation points:

- it ends with a turn that is not the assistant's (a prompt file, MT-bench style, or a chat whose last
  user turn awaits its reply): the whole conversation, followed by the generation prompt;
- otherwise at its LAST assistant turn: the messages before that turn, followed by the generation prompt;
- `all_turns=True`: at every assistant turn, and at the open end when there is one.

The generation prompt is the chat template's: with the `tokenizer` template the text is the tokenizer's
own `apply_chat_template(context, add_generation_prompt=True)`; a named template (qwen, llama3, ...) has
no such switch, so the context is rendered with one more assistant reply and cut where that reply's
supervised span starts (everything the template puts before a reply is scaffolding, i.e. its generation
prompt; qwen3's empty think block included, as in training), less a trailing space, which belongs to the
reply's first token. The text is tokenized as the training data is (no special tokens added beyond the
template's own). Images in the context are written as the template's image placeholder, as in training, and
the prompt carries them (`Prompt.images`); the target expands the placeholders (eval/speculative.py).

A point is skipped, and counted by reason, when its context has no user message or its prompt is longer
than `max_seq_length` tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torchspec.data.errors import DataError
from torchspec.data.formats import Conversation
from torchspec.data.multimodal import conversation_images, with_placeholders
from torchspec.data.templates import ChatTemplate
from torchspec.data.tokenize import Encoder
from torchspec.eval.speculative import Prompt

OPEN_END = "open_end"            # the conversation ends with a non-assistant turn
ASSISTANT_TURN = "assistant_turn"
NO_USER = "no_user_message"
TOO_LONG = "too_long"

_PLACEHOLDER = "\ue000reply\ue000"  # a reply no template changes (private-use characters, no spaces)


@dataclass
class PromptSelection:
    """What `select_prompts` did: prompts used by kind, points skipped by reason (with the first place)."""

    total_conversations: int = 0
    conversations: int = 0   # looked at (fewer than the total when the limit was reached)
    used: Counter = field(default_factory=Counter)       # OPEN_END / ASSISTANT_TURN -> count
    skipped: Counter = field(default_factory=Counter)    # NO_USER / TOO_LONG -> count
    first_skipped: dict = field(default_factory=dict)    # reason -> location of the first one
    limit: int | None = None
    max_seq_length: int | None = None
    all_turns: bool = False

    @property
    def num_used(self) -> int:
        return sum(self.used.values())

    @property
    def limit_reached(self) -> bool:
        return self.limit is not None and self.num_used >= self.limit

    def reason_text(self, reason: str) -> str:
        if reason == NO_USER:
            return "no user message before the reply"
        return f"prompt longer than max_seq_length={self.max_seq_length} tokens"

    def summary(self) -> str:
        turn = "every assistant turn" if self.all_turns else "their last assistant turn"
        parts = [f"{self.used[OPEN_END]} ending with a non-assistant turn (generation prompt appended)",
                 f"{self.used[ASSISTANT_TURN]} at {turn}"]
        text = (f"prompts: {self.num_used} used from {self.conversations} conversation(s) "
                f"({', '.join(parts)})")
        if self.limit_reached and self.conversations < self.total_conversations:
            text += f"; --num-prompts {self.limit} reached after {self.conversations} of {self.total_conversations}"
        elif self.limit_reached:
            text += f"; capped at --num-prompts {self.limit}"
        n_skip = sum(self.skipped.values())
        if n_skip:
            text += f"; skipped {n_skip}: " + ", ".join(
                f"{n} {self.reason_text(r)} (first: {self.first_skipped[r]})" for r, n in sorted(self.skipped.items()))
        else:
            text += "; none skipped"
        return text

    def as_dict(self) -> dict:
        return {"conversations": self.conversations, "total_conversations": self.total_conversations,
                "used": self.num_used, "used_by_kind": dict(self.used), "skipped": dict(self.skipped),
                "first_skipped": dict(self.first_skipped), "all_turns": self.all_turns, "limit": self.limit}


def evaluation_points(messages: list[dict], all_turns: bool = False) -> list[tuple[int, str]]:
    """[(n, kind)]: prompt = messages[:n] + the generation prompt; kind OPEN_END or ASSISTANT_TURN."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    open_end = messages[-1]["role"] != "assistant"
    points = [(i, ASSISTANT_TURN) for i in turns]
    if open_end:
        points.append((len(messages), OPEN_END))
    return points if all_turns else points[-1:]


def prompt_text(template: ChatTemplate, tokenizer, context: list[dict]) -> str:
    """The text a server is asked to continue after `context` (see the module docstring)."""
    context = with_placeholders(context, template.image_placeholder, template.name)
    if template.name == "tokenizer":  # the tokenizer's own template: its own generation prompt
        try:
            return tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # a jinja error raised by the template itself
            raise DataError(f"the tokenizer's chat template failed on this conversation: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    text, spans = template.render(context + [{"role": "assistant", "content": _PLACEHOLDER}])
    if not spans:
        raise DataError(f"chat template {template.name!r} supervises nothing of an assistant reply")
    # A space before the reply belongs to the reply's first token (BPE and SentencePiece both attach it to the
    # word after it, as the training tokenization does): the prompt ends before it (plain's "Assistant:").
    return text[:spans[-1][0]].rstrip(" ")


def select_prompts(convs: list[Conversation], tokenizer, template: ChatTemplate, *, max_seq_length: int,
                   all_turns: bool = False, limit: int | None = None) -> tuple[list[Prompt], PromptSelection]:
    """(prompts: token ids with their images, what was used and skipped) over `convs`, in order; stops at
    `limit` prompts. The length checked against max_seq_length is before image expansion, as in training."""
    sel = PromptSelection(total_conversations=len(convs), limit=limit, max_seq_length=max_seq_length,
                          all_turns=all_turns)
    encoder = Encoder(tokenizer)
    prompts: list[Prompt] = []
    for conv in convs:
        if sel.limit_reached:
            break
        sel.conversations += 1
        for n, kind in evaluation_points(conv.messages, all_turns):
            if sel.limit_reached:
                break
            context = conv.messages[:n]
            reason = None
            if not any(m["role"] == "user" for m in context):
                reason = NO_USER
            else:
                try:
                    text = prompt_text(template, tokenizer, context)
                except DataError as e:
                    raise DataError(f"{conv.location}: {e}") from None
                ids = encoder.encode([(text, [])])[0][0].tolist()
                if len(ids) > max_seq_length:
                    reason = TOO_LONG
            if reason is not None:
                sel.skipped[reason] += 1
                sel.first_skipped.setdefault(reason, conv.location if n == len(conv.messages)
                                             else f"{conv.location} message {n + 1}")
                continue
            prompts.append(Prompt(ids, conversation_images(context)))
            sel.used[kind] += 1
    return prompts, sel
