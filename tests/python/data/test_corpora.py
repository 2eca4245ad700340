"""load_conversations: both corpora really downloaded from PyPI (pinned wheels, cached in the tessera cache like
the model fixtures), their counts and first conversation against the source files; JSONL files good and bad."""

from __future__ import annotations

import json

import pytest

from tessera.data import load_conversations
from tessera.errors import InvalidArgumentError


def test_chatterbot_corpus():
    convs = load_conversations("chatterbot-corpus")
    assert len(convs) == 2026  # 21 english/*.yml files (REAL_INPUTS.md)
    # ai.yml comes first (files sorted by name); its first conversation:
    assert convs[0] == [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "Artificial Intelligence is the branch of engineering and science devoted "
                                         "to constructing machines that think."},
    ]
    for conv in convs:
        assert conv and all(m["role"] == ("user", "assistant")[j % 2] for j, m in enumerate(conv))
        assert all(isinstance(m["content"], str) for m in conv)
    assert load_conversations("chatterbot-corpus", max_conversations=3) == convs[:3]


def test_chitchat_dataset():
    convs = load_conversations("chitchat-dataset")
    # 7,168 chats in dataset.json, 3,150 of them with one sender only (skipped); the other 4,018 hold 135,587 runs
    # of utterances by one sender (counted from dataset.json directly).
    assert len(convs) == 4018
    assert sum(len(c) for c in convs) == 135587
    assert convs[0][:3] == [
        {"role": "user", "content": "Hello\nHow are you doing today?"},
        {"role": "assistant", "content": "whats up MD\nim doing good\nhow are you doing?"},
        {"role": "user", "content": "Im alright, I just took a nap. But it was one of those naps that doesnt help "
                                    "anything. It just makes everything worse and you question all your life choices"},
    ]
    assert all(m["role"] == ("user", "assistant")[j % 2] for c in convs for j, m in enumerate(c))
    assert min(len(c) for c in convs) >= 2  # every conversation has an assistant message


def test_cache_dir_and_manifest(tmp_path):
    convs = load_conversations("chatterbot-corpus", cache_dir=tmp_path, max_conversations=2)
    assert len(convs) == 2
    manifest = json.loads((tmp_path / "data" / "chatterbot-corpus" / "MANIFEST.json").read_text())
    assert manifest["meta"]["requirement"] == "chatterbot-corpus==1.3.3" and len(manifest["files"]) == 21


def test_jsonl(tmp_path):
    good = tmp_path / "good.jsonl"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    good.write_text(json.dumps({"messages": conv}) + "\n\n" + json.dumps({"messages": conv[:1], "id": 2}) + "\n")
    assert load_conversations(str(good)) == [conv, conv[:1]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": conv}) + "\n{not json\n")
    with pytest.raises(InvalidArgumentError, match=rf"{bad}:2: not valid JSON"):
        load_conversations(str(bad))
    bad.write_text(json.dumps({"messages": conv}) + "\n" + json.dumps({"msgs": conv}) + "\n")
    with pytest.raises(InvalidArgumentError, match=rf"{bad}:2: expected an object with a 'messages' list"):
        load_conversations(str(bad))


def test_unknown_source_lists_known():
    with pytest.raises(InvalidArgumentError, match=r"unknown source 'alpaca'.*'chatterbot-corpus', 'chitchat-dataset'"):
        load_conversations("alpaca")
