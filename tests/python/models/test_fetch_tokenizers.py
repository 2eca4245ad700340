"""tessera fetch's llama3-tokenizer and mistral-v1-tokenizer against independent references.

Llama 3: the tiktoken Encoding of llama-models' own Tokenizer class (the wheel's tokenizer.py on the same ranks file;
tiktoken's BPE, not the `tokenizers` library's), and the message framing of the wheel's chat_format.py. Mistral v1:
SentencePiece itself, and the framing of mistral-common's InstructTokenizerV1 (one SentencePiece call per message).
Special-token ids against the published ones. The fetches run once per session (fixtures in conftest.py)."""

from __future__ import annotations

import json
import time

import pytest

from tessera.errors import InternalError
from tessera.models.fetch import chat_tokenizers, download, fetch
from tessera.models.fetch.cache import MANIFEST

transformers = pytest.importorskip("transformers")
sentencepiece = pytest.importorskip("sentencepiece")
pytest.importorskip("tiktoken")

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it?",
    "def f(x):\n    return x**2  # square\n\nclass A:\n\tpass\n",
    "in 2024 there were 123456 items",
    "naïve café 東京",
    "a   b\t\tc\n\n\nd    ",
    "emoji 🤖🎉 ok 👩‍👩‍👧",
    " leading space",
    "",
]
CONVERSATION = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.fixture(scope="module")
def llama3_reference(llama3_tokenizer_dir):
    source = llama3_tokenizer_dir.parent.parent / "downloads" / chat_tokenizers.LLAMA_REQUIREMENT.replace("==", "-")
    return chat_tokenizers.llama_models_tokenizer(source)


@pytest.fixture(scope="module")
def mistral(mistral_v1_tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(mistral_v1_tokenizer_dir)


@pytest.fixture(scope="module")
def sp(mistral_v1_tokenizer_dir):
    source = mistral_v1_tokenizer_dir.parent.parent / "downloads" / "mistral-common-1.13.1"
    return sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model.v1"))


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_ids_equal_tiktoken(llama3, llama3_reference, text):
    ids = llama3(text, add_special_tokens=False).input_ids
    assert ids == llama3_reference.encode(text, bos=False, eos=False)
    assert llama3(text).input_ids == llama3_reference.encode(text, bos=True, eos=False)
    assert llama3.decode(ids) == text


def test_llama3_vocabulary_and_special_tokens(llama3, llama3_reference):
    assert len(llama3) == 128_256 and llama3_reference.n_words == 128_256
    published = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|reserved_special_token_0|>": 128002,
                 "<|finetune_right_pad_id|>": 128004, "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
                 "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
                 "<|reserved_special_token_245|>": 128255}
    assert {t: llama3.convert_tokens_to_ids(t) for t in published} == published
    specials = {i: t.content for i, t in llama3.added_tokens_decoder.items() if t.special}
    assert specials == {i: t for t, i in llama3_reference.special_tokens.items()} and len(specials) == 256
    assert (llama3.bos_token_id, llama3.eos_token_id, llama3.pad_token_id) == (128000, 128009, 128004)
    # Special-token text is one token here, as with tiktoken's allowed_special="all".
    text = "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    assert llama3(text, add_special_tokens=False).input_ids == llama3_reference.model.encode(text,
                                                                                            allowed_special="all")


def test_llama3_chat_template(llama3, llama3_reference):
    text = llama3.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello. How can I help?<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # llama-models' ChatFormat: header = start_header, encode(role), end_header, encode("\n\n"); then the content
    # and <|eot_id|>; BOS first; the generation prompt is the assistant header.
    ref, special = llama3_reference, llama3_reference.special_tokens

    def header(role):
        return ([special["<|start_header_id|>"], *ref.encode(role, bos=False, eos=False),
                 special["<|end_header_id|>"], *ref.encode("\n\n", bos=False, eos=False)])

    expected = [ref.bos_id]
    for m in CONVERSATION:
        expected += header(m["role"]) + ref.encode(m["content"], bos=False, eos=False) + [ref.eot_id]
    expected += header("assistant")
    assert llama3.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False) == expected


@pytest.mark.parametrize("text", TEXTS)
def test_mistral_ids_equal_sentencepiece(mistral, sp, text):
    ids = mistral(text, add_special_tokens=False).input_ids
    assert ids == sp.encode(text)
    assert mistral(text).input_ids == [sp.bos_id(), *sp.encode(text)]
    assert mistral.decode(ids) == text == sp.decode(ids)


def test_mistral_vocabulary_special_tokens_and_chat_template(mistral, sp):
    assert len(mistral) == 32_000 == sp.vocab_size()
    assert [mistral.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert (mistral.unk_token_id, mistral.bos_token_id, mistral.eos_token_id, mistral.pad_token_id) == (0, 1, 2, None)
    text = mistral.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == "<s>[INST] Hi! [/INST] Hello. How can I help?</s>[INST] What is 2+2? [/INST]"
    # mistral-common 1.13.1 InstructTokenizerV1: bos, sp.encode(f"[INST] {user} [/INST]"), sp.encode(assistant), eos.
    expected = [1, *sp.encode("[INST] Hi! [/INST]"), *sp.encode("Hello. How can I help?"), 2,
                *sp.encode("[INST] What is 2+2? [/INST]")]
    assert mistral.apply_chat_template(CONVERSATION, add_generation_prompt=True, return_dict=False) == expected
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        mistral.apply_chat_template(CONVERSATION[1:], tokenize=False)


def _no_work(*args, **kwargs):
    raise AssertionError("fetch downloaded or converted although the cache was valid")


def test_second_fetch_is_a_cached_no_op(llama3_tokenizer_dir, mistral_v1_tokenizer_dir, monkeypatch, capsys):
    for name in ("download_wheel", "fetch_wheel_members"):
        monkeypatch.setattr(download, name, _no_work)
    for name in ("convert_llama3", "convert_mistral_v1"):
        monkeypatch.setattr(chat_tokenizers, name, _no_work)
    start = time.monotonic()
    assert fetch("llama3-tokenizer") == llama3_tokenizer_dir
    assert fetch("mistral-v1-tokenizer") == mistral_v1_tokenizer_dir
    assert time.monotonic() - start < 5.0
    assert capsys.readouterr().err.count("cached at") == 2
    for d in (llama3_tokenizer_dir, mistral_v1_tokenizer_dir):
        files = sorted(json.loads((d / MANIFEST).read_text())["files"])
        assert files == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"], files
        assert "chat_template" in json.loads((d / "tokenizer_config.json").read_text())


def test_self_check_names_the_first_differing_token():
    with pytest.raises(InternalError, match=r"differently from the original from token 2: \[3\] vs \[4\]"):
        chat_tokenizers._self_check("x", [1, 2, 3], [1, 2, 4])


def test_missing_package_is_named():
    with pytest.raises(ImportError, match=r"llama3-tokenizer needs the Python package 'no_such_pkg_x'.*pip install "
                                          r"no_such_pkg_x"):
        chat_tokenizers._require(chat_tokenizers.LLAMA3, "no_such_pkg_x")
