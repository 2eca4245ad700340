"""render_chat: a conversation through the tokenizer's chat template into an Example with assistant-only labels.

[Note: finding the assistant tokens]
The template is the authority on what the model sees, so the conversation is rendered once, as text, and tokenized
once (tokenizing turns separately can merge differently at the seams). The assistant turn i occupies the text
between render(messages[:i], add_generation_prompt=True) (everything up to and including the assistant header) and
render(messages[:i+1]); both must be prefixes of the full rendering, which holds for ChatML, Llama 3 and Mistral
templates. Inside that span the message content is located verbatim (or stripped, for templates that trim it);
the trained tokens are those overlapping the content plus the next token when it starts before the span ends: the
end-of-turn token (<|im_end|>, <|eot_id|>, </s>) that teaches the model to stop. The rest of the span (a newline
after the end-of-turn token) and the header are not trained.
"""

from __future__ import annotations

import bisect
from typing import Any

from tessera.data.example import IGNORE_INDEX, Example
from tessera.errors import InvalidArgumentError

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("assistant", "all")


def validate_messages(messages: Any) -> None:
    """Raises InvalidArgumentError naming the message index when `messages` is not a non-empty list of
    {"role": "system"|"user"|"assistant", "content": str} dicts with at least one assistant message."""
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError(f"render_chat: messages must be a non-empty list of dicts, got {messages!r:.200}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidArgumentError(f"render_chat: message {i} is a {type(m).__name__}, expected a dict with "
                                       "'role' and 'content'")
        if m.get("role") not in ROLES:
            raise InvalidArgumentError(f"render_chat: message {i} has role {m.get('role')!r}; expected one of "
                                       f"{list(ROLES)}")
        if "content" not in m:
            raise InvalidArgumentError(f"render_chat: message {i} ({m['role']}) has no 'content'")
        if not isinstance(m["content"], str):
            raise InvalidArgumentError(f"render_chat: message {i} ({m['role']}) has content of type "
                                       f"{type(m['content']).__name__}, expected str")
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidArgumentError(f"render_chat: none of the {len(messages)} messages has role 'assistant'; there "
                                   "is nothing to train on")


def _template_name(tokenizer) -> str:
    return f"the chat template of tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r}"


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        # Templates reject what they do not support (raise_exception), e.g. Mistral's roles that do not alternate.
        raise InvalidArgumentError(f"render_chat: {_template_name(tokenizer)} rejected the first {len(messages)} "
                                   f"messages (roles {[m['role'] for m in messages]}): {e}") from None


def _assistant_spans(tokenizer, messages: list[dict], full: str) -> list[tuple[int, int, int]]:
    """(content_start, content_end, turn_end) character offsets in `full` of each assistant turn's content and
    the end of its rendered turn; see [Note: finding the assistant tokens]."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:  # templates cannot render the empty conversation before it, so its header cannot be located
            raise InvalidArgumentError("render_chat: message 0 is an assistant message; with train_on='assistant' "
                                       "a conversation must start with a system or user message")
        before = _render(tokenizer, messages[:i], True)
        through = _render(tokenizer, messages[:i + 1], False)
        if not (full.startswith(through) and through.startswith(before)):
            raise InvalidArgumentError(
                f"render_chat: {_template_name(tokenizer)} is not prefix-consistent at message {i} (assistant): "
                "rendering the messages before it with the generation prompt, then through it, does not give "
                "prefixes of the full conversation, so its tokens cannot be located")
        turn = full[len(before):len(through)]
        content = m["content"]
        at = turn.find(content)
        if at < 0:
            content = content.strip()
            at = turn.find(content)
        if at < 0:
            raise InvalidArgumentError(f"render_chat: {_template_name(tokenizer)} does not contain the content of "
                                       f"message {i} (assistant) verbatim in its rendered turn {turn!r:.200}")
        start = len(before) + at
        spans.append((start, start + len(content), len(through)))
    return spans


def render_chat(tokenizer, messages: list[dict], *, train_on: str = "assistant") -> Example:
    """Renders `messages` ([{"role": "system"|"user"|"assistant", "content": str}, ...]) with the tokenizer's chat
    template and tokenizes it (a Hugging Face fast tokenizer; the template supplies the special tokens).

    train_on="assistant": labels on the assistant turns' content tokens and their end-of-turn token only (not the
    "<|im_start|>assistant\\n" header, not system/user turns); train_on="all": on every token.
    Returns an Example (input_ids and labels, lists of ints of the same length, not shifted).
    Raises InvalidArgumentError naming the message index for a bad role, missing or non-string content, no
    assistant message; and naming the tokenizer when it has no chat template, is not a fast tokenizer (offsets are
    needed), or its template is not prefix-consistent."""
    if train_on not in TRAIN_ON:
        raise InvalidArgumentError(f"render_chat: train_on={train_on!r}; expected one of {list(TRAIN_ON)}")
    validate_messages(messages)
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgumentError(f"render_chat: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
                                   "template (tokenizer.chat_template is empty); use an instruct tokenizer or set one")
    if not getattr(tokenizer, "is_fast", False):
        raise InvalidArgumentError(f"render_chat: tokenizer {getattr(tokenizer, 'name_or_path', '')!r} is not a fast "
                                   "tokenizer; character offsets (return_offsets_mapping) are needed to find the "
                                   "assistant tokens")
    full = _render(tokenizer, messages, False)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(enc["input_ids"])
    if train_on == "all":
        return Example(ids, list(ids))
    offsets = enc["offset_mapping"]
    ends = [e for _, e in offsets]  # non-decreasing: tokens cover the text left to right
    labels = [IGNORE_INDEX] * len(ids)
    for c_start, c_end, turn_end in _assistant_spans(tokenizer, messages, full):
        t = bisect.bisect_right(ends, c_start)  # the first token ending after the content starts
        while t < len(ids) and offsets[t][0] < c_end:
            labels[t] = ids[t]
            t += 1
        # The next token is the end-of-turn token when it still belongs to this turn (not the next one's header).
        if t < len(ids) and offsets[t][0] < turn_end:
            labels[t] = ids[t]
    return Example(ids, labels)
