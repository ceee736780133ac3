"""Regeneration: every assistant turn of a conversation replaced by the target's own reply.

The reply to assistant turn k is generated from the conversation as the chat template renders it up to
that turn: system / user / tool turns verbatim, assistant turns before k already regenerated (so
multi-turn data stays on-policy). A conversation whose last message is not an assistant turn gets one
more, generated, assistant turn (a file of prompts is a training set).

Engines are reached through one function, `generate(prompts, stop_ids, settings) -> [Completion]`
(torchspec/inference/generate.py has the hf / vllm / sgl ones): token ids in, token ids out, the stop
token not included. Conversations are handled in groups; within a group the k-th replies of all its
conversations go to the engine in one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from torchspec.data.errors import DataError
from torchspec.data.formats import Conversation
from torchspec.data.templates import ChatTemplate
from torchspec.data.tokenize import Encoder

# Stands in for a reply while a template renders the conversation up to it (cut off there).
_REPLY = "\x00torchspec-reply\x00"


@dataclass
class Completion:
    token_ids: list[int]   # the reply, without the stop token
    truncated: bool        # cut at max_new_tokens (no stop token was generated)


GenerateFn = Callable[[list[list[int]], list[int], object], list[Completion]]


@dataclass
class Regenerated:
    sample_id: str                     # the source conversation's id
    location: str                      # the source file and line
    messages: list[dict]               # the conversation with the target's replies
    replies: list[list[int]] = field(default_factory=list)   # token ids of each generated reply, in order
    truncated: bool = False            # some reply hit max_new_tokens
    cut: bool = False                  # later turns dropped: a prompt exceeded max_prompt_tokens
    dropped: bool = False              # on_truncated=drop and a reply was truncated: not to be trained on

    @property
    def generated_tokens(self) -> int:
        return sum(len(r) for r in self.replies)


class TurnPrompter:
    """Token ids of the prompt for the next assistant turn, and the ids that end a reply, for one template."""

    def __init__(self, template: ChatTemplate, tokenizer):
        self.template = template
        self.tokenizer = tokenizer
        self.encoder = Encoder(tokenizer)
        self.stop_ids = self._stop_ids()

    def _render_to_reply(self, messages: list[dict]) -> tuple[str, str]:
        """(the text before the reply of a new assistant turn after `messages`, the template's end of that turn)."""
        text, spans = self.template.render([*messages, {"role": "assistant", "content": _REPLY}])
        at = text.rfind(_REPLY)
        if at < 0 or not spans:
            raise DataError(f"dataset.chat_template: the template {self.template.name!r} does not render an "
                            "assistant reply as written; it cannot be used with dataset.regenerate")
        end = spans[-1][1]
        return text[:at], text[at + len(_REPLY):end]

    def _stop_ids(self) -> list[int]:
        _, end_of_turn = self._render_to_reply([{"role": "user", "content": "hi"}])
        ids = []
        if end_of_turn:
            ids += self.encode(end_of_turn)[:1]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if isinstance(eos, int) and eos not in ids:
            ids.append(eos)
        if not ids:
            raise DataError(f"dataset.chat_template: {self.template.name!r} ends an assistant turn with no token and "
                            "the tokenizer has no EOS token: a generated reply could never end")
        return ids

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.encoder.encode([(text, [])])[0][0]]

    def prompt(self, messages: list[dict]) -> list[int]:
        return self.encode(self._render_to_reply(messages)[0])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


class _Progress:
    """One conversation on its way: messages written so far and the originals still to go."""

    def __init__(self, conv: Conversation):
        self.out = Regenerated(conv.sample_id, conv.location, [])
        self.rest = list(conv.messages)
        self.final_reply = bool(conv.messages) and conv.messages[-1]["role"] != "assistant"
        self.done = False

    def next_turn(self) -> bool:
        """Copy the turns up to the next reply to generate; False when the conversation is complete."""
        while self.rest and self.rest[0]["role"] != "assistant":
            self.out.messages.append(self.rest.pop(0))
        if self.rest:
            self.rest.pop(0)   # the original reply: replaced by the target's
            return True
        if self.final_reply:
            self.final_reply = False
            return True
        self.done = True
        return False


def regenerate(convs: Sequence[Conversation], prompter: TurnPrompter, generate: GenerateFn, settings,
               max_prompt_tokens: int | None = None) -> Iterator[list[Regenerated]]:
    """Regenerate `convs` in groups of `settings.batch_size`, yielding each group (in input order) when done.

    `settings` has max_new_tokens, temperature, top_p, top_k, seed, on_truncated (dataset.generation).
    A turn whose prompt is longer than `max_prompt_tokens` is not generated: the conversation ends before it
    (training would truncate it there anyway). With on_truncated="drop", a conversation with a truncated
    reply stops generating and comes back with `dropped` set.
    """
    size = int(settings.batch_size)
    for start in range(0, len(convs), size):
        group = [_Progress(c) for c in convs[start:start + size]]
        active = [p for p in group if p.next_turn()]
        while active:
            prompts, asking = [], []
            for p in active:
                ids = prompter.prompt(p.out.messages)
                if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                    p.out.cut, p.done = True, True
                    continue
                prompts.append(ids)
                asking.append(p)
            completions = generate(prompts, prompter.stop_ids, settings) if prompts else []
            if len(completions) != len(prompts):
                raise RuntimeError(f"generate returned {len(completions)} replies for {len(prompts)} prompts")
            for p, c in zip(asking, completions):
                p.out.replies.append(list(c.token_ids))
                p.out.messages.append({"role": "assistant", "content": prompter.decode(list(c.token_ids))})
                if c.truncated:
                    p.out.truncated = True
                    if settings.on_truncated == "drop":
                        p.out.dropped, p.done = True, True
            active = [p for p in asking if not p.done and p.next_turn()]
        yield [p.out for p in group]
