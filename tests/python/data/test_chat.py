"""render_chat on real chat tokenizers: the trained tokens are exactly the assistant contents and their end-of-turn
token, checked by decoding them and comparing with the message strings (an independent reference)."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoTokenizer

from tessera.data import IGNORE_INDEX, render_chat
from tessera.errors import InvalidArgumentError

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Tell me a joke."},
    {"role": "assistant", "content": "Why did the\nchicken cross the road? To get to 42 sides."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "No."},
]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def labelled_runs(tok, ex) -> list[str]:
    """Each maximal run of labelled tokens, decoded with its special tokens."""
    runs, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == tid
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_assistant_labels_are_contents_plus_im_end(smol):
    ex = render_chat(smol, CONV)
    expected = [m["content"] + "<|im_end|>" for m in CONV if m["role"] == "assistant"]
    assert labelled_runs(smol, ex) == expected
    # The tokens are the template's rendering tokenized as a whole.
    assert ex.input_ids == smol(smol.apply_chat_template(CONV, tokenize=False), add_special_tokens=False)["input_ids"]


def test_single_turn_default_system_prompt(smol):
    conv = [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": " Leading space kept."}]
    ex = render_chat(smol, conv)
    assert labelled_runs(smol, ex) == [" Leading space kept.<|im_end|>"]


def test_train_on_all_labels_every_token(smol):
    ex = render_chat(smol, CONV, train_on="all")
    assert ex.labels == ex.input_ids
    assert smol.decode(ex.input_ids, skip_special_tokens=False) == smol.apply_chat_template(CONV, tokenize=False)


def test_empty_assistant_content_trains_end_of_turn(smol):
    conv = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]
    assert labelled_runs(smol, render_chat(smol, conv)) == ["<|im_end|>"]


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], r"message 1 has role 'bot'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], r"message 1 \(assistant\) has no 'content'"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}],
     r"message 0 \(user\) has content of type int"),
    ([{"role": "user", "content": "a"}], r"none of the 1 messages has role 'assistant'"),
    ([], r"non-empty list"),
    (["hello"], r"message 0 is a str"),
])
def test_bad_messages_name_the_message(smol, messages, match):
    with pytest.raises(InvalidArgumentError, match=match):
        render_chat(smol, messages)


def test_bad_train_on_and_missing_template(smol):
    with pytest.raises(InvalidArgumentError, match=r"train_on='prompt'"):
        render_chat(smol, CONV, train_on="prompt")
    bare = copy.deepcopy(smol)
    bare.chat_template = None
    with pytest.raises(InvalidArgumentError, match=r"has no chat template"):
        render_chat(bare, CONV)


def test_assistant_first_and_inconsistent_template_are_named(smol):
    conv = [{"role": "assistant", "content": "I speak first."}, {"role": "user", "content": "ok"}]
    with pytest.raises(InvalidArgumentError, match=r"message 0 is an assistant message"):
        render_chat(smol, conv)
    assert render_chat(smol, conv, train_on="all").labels == render_chat(smol, conv, train_on="all").input_ids
    # A template whose output starts with the message count: a shorter conversation is not a prefix of a longer.
    counting = copy.deepcopy(smol)
    counting.chat_template = ("{{ messages | length }}{% for m in messages %}<|im_start|>{{ m.role }}\n"
                              "{{ m.content }}<|im_end|>\n{% endfor %}"
                              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(InvalidArgumentError, match=r"chat template .* not prefix-consistent at message 2"):
        render_chat(counting, CONV)


def test_llama3_template_eot_id(llama3_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_dir)
    ex = render_chat(tok, CONV)
    # Llama 3's template trims contents; these have no surrounding whitespace.
    assert labelled_runs(tok, ex) == [m["content"] + "<|eot_id|>" for m in CONV if m["role"] == "assistant"]
    assert ex.input_ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")


def test_mistral_v1_template_eos_and_rejection(mistral_v1_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(mistral_v1_tokenizer_dir)
    conv = [m for m in CONV if m["role"] != "system"]  # Mistral's template knows user and assistant only
    ex = render_chat(tok, conv)
    # SentencePiece decoding drops the space the template puts before each answer ("[/INST] answer").
    assert labelled_runs(tok, ex) == [m["content"] + "</s>" for m in conv if m["role"] == "assistant"]
    with pytest.raises(InvalidArgumentError, match=r"chat template .* rejected .*roles must alternate"):
        render_chat(tok, [conv[0], conv[0], conv[1]])
