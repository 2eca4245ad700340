"""build_sft and build_text end to end on small real inputs with SmolLM2's tokenizer."""

from __future__ import annotations

import os

import pytest
from transformers import AutoTokenizer

from tessera.data import IGNORE_INDEX, build_sft, build_text, render_chat, split_documents, split_heldout
from tessera.errors import InvalidArgumentError


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def conversations(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Question number {i}?"},
             {"role": "assistant", "content": f"Answer number {i} is " + "very " * (i % 7) + "short."}]
            for i in range(n)]


def test_build_sft_split_and_stats(smol):
    convs = conversations(40)
    train, heldout, stats = build_sft(convs, smol, seq_len=96, eval_fraction=0.1, seed=3)
    train_idx, eval_idx = split_heldout(40, 0.1, seed=3)
    assert stats["train_conversations"] == len(train_idx) == 36 and stats["eval_conversations"] == 4
    assert stats["train_rows"] == len(train) and stats["eval_rows"] == len(heldout)
    assert stats["truncated"] == 0 and stats["dropped"] == 0
    # No leak: each conversation's answer text appears in exactly its own side's rows.
    text = {name: smol.decode(rows.input_ids.flatten().tolist()) for name, rows in (("train", train),
                                                                                    ("eval", heldout))}
    for i in range(40):
        side, other = ("eval", "train") if i in eval_idx else ("train", "eval")
        assert f"Answer number {i} is" in text[side] and f"Answer number {i} is" not in text[other]
    # Label tokens: the trained tokens of each rendered train conversation (none is at position 0, so shifting
    # keeps them all); the rows' targets decode to the assistant answers.
    examples = [render_chat(smol, convs[i]) for i in train_idx]
    assert stats["label_tokens"] == train.num_label_tokens == sum(e.num_label_tokens for e in examples)
    assert stats["tokens"] == sum(len(render_chat(smol, c).input_ids) for c in convs)
    targets = smol.decode([t for t in train.labels.flatten().tolist() if t != IGNORE_INDEX])
    assert targets == "".join(convs[i][1]["content"] + "<|im_end|>" for i in train_idx)
    assert int(train.input_ids[train.labels == IGNORE_INDEX][-1]) == smol.pad_token_id  # the padding


def test_build_sft_no_eval_and_named_errors(smol):
    train, heldout, stats = build_sft(conversations(5), smol, seq_len=64, eval_fraction=0.0)
    assert heldout is None and stats["eval_rows"] == 0 and train.num_docs == 5
    bad = conversations(3)
    bad[1][1]["role"] = "bot"
    with pytest.raises(InvalidArgumentError, match=r"conversation 1: render_chat: message 1 has role 'bot'"):
        build_sft(bad, smol, seq_len=64, eval_fraction=0.0)


def write_text(path, paragraphs: list[str]) -> None:
    path.write_text("\n\n".join(paragraphs) + "\n")


def test_build_text_tokenizes_once_and_reuses(smol, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    write_text(a, [f"Paragraph {i} of the first file. " * 40 for i in range(6)])
    write_text(b, [f"Second file, paragraph {i}." * 30 for i in range(5)])
    cache = tmp_path / "cache" / "corpus.tok"
    train, heldout, stats = build_text([str(a), str(b)], smol, seq_len=64, cache_path=str(cache),
                                       eval_fraction=0.2, seed=1)
    docs = split_documents(a.read_text()) + split_documents(b.read_text())
    tokens = [smol(d, add_special_tokens=False)["input_ids"] + [smol.eos_token_id] for d in docs]
    train_idx, eval_idx = split_heldout(len(docs), 0.2, seed=1)
    assert stats["documents"] == len(docs) and stats["eval_docs"] == len(eval_idx) >= 1
    assert stats["tokens"] == sum(len(t) for t in tokens) and not stats["reused"]
    # The train rows read back the train documents' token stream, in order.
    stream = [t for i in train_idx for t in tokens[i]]
    assert len(train) == (len(stream) - 1) // 64 == stats["train_rows"]
    batch = train.batch(list(range(len(train))))
    assert batch.input_ids.flatten().tolist() == stream[:len(train) * 64]
    eval_stream = [t for i in eval_idx for t in tokens[i]]
    assert heldout.batch([0]).input_ids[0].tolist() == eval_stream[:64]
    # Reused while the inputs are unchanged; rebuilt when one changes.
    assert build_text([str(a), str(b)], smol, seq_len=64, cache_path=str(cache), eval_fraction=0.2,
                      seed=1)[2]["reused"]
    write_text(b, ["Changed text. " * 50])
    os.utime(b, ns=(1, 1))
    _, _, again = build_text([str(a), str(b)], smol, seq_len=64, cache_path=str(cache), eval_fraction=0.2, seed=1)
    assert not again["reused"] and again["documents"] == len(split_documents(a.read_text())) + 1


def test_build_text_too_short(smol, tmp_path):
    a = tmp_path / "a.txt"
    write_text(a, ["tiny"])
    with pytest.raises(InvalidArgumentError, match=r"train part .* fewer than one row of seq_len \+ 1 = 65"):
        build_text([str(a)], smol, seq_len=64, cache_path=str(tmp_path / "c.tok"), eval_fraction=0.0)
