"""load_conversations: conversation corpora from pinned PyPI wheels (fetched once, cached, sha256-checked) or a
local JSONL file.

- "chatterbot-corpus": chatterbot-corpus==1.3.3 (BSD), chatterbot_corpus/data/english/*.yml (21 files, 2,026
  conversations): each conversation is a list of strings alternating user / assistant.
- "chitchat-dataset": chitchat-dataset==0.9.0 (MIT), chitchat_dataset/dataset.json (40 MB, 7,168 conversations):
  each conversation is a list of turns, each turn a list of utterances by one sender; consecutive turns by the same
  sender merge into one message (utterances joined by newlines), the first sender is the user, then they alternate.
  Chats with a single sender (3,150 of them) are skipped: there is no reply to train on; 4,018 remain.
- a path to a .jsonl file: one {"messages": [{"role": ..., "content": ...}, ...]} object per line (blank lines
  skipped).

The extracted files are cached under <cache root>/data/<name>/ (cache root: tessera.knobs cache_dir, i.e.
TESSERA_CACHE_DIR or ~/.cache/tessera) with the fetch cache's manifest (see [Note: the fetch cache] in
tessera/models/fetch/cache.py). Order is deterministic: files sorted by name, conversations in file order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tessera.errors import InvalidArgumentError

CHATTERBOT = "chatterbot-corpus"
CHITCHAT = "chitchat-dataset"

CHATTERBOT_REQUIREMENT = "chatterbot-corpus==1.3.3"
CHATTERBOT_WHEEL_SHA256 = "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"  # 345,706 bytes
# english/<file> -> sha256 (the whole english/ folder of the wheel).
CHATTERBOT_FILES = {
    "ai.yml": "620a65787a56641db4a03e1419a7578e813967218cf6721e3ea4ef90844916aa",
    "botprofile.yml": "1a694c5288f3f8f87d027d2f98dae71d02efa88e28853a6e5d27e6dbce907294",
    "coding.yml": "1726a8900a82ee32dad559809564f9ae97df9c52f42a8f1fcde84b1d54b1d260",
    "computers.yml": "a222c5a432efe4289e6c5edf1c3d99fd26c48df99db0ff893d1d5ab569f5b750",
    "conversations.yml": "1cf105b5802f377b2dc145f741f7df85629c9ca27e450538165286a75b5e3416",
    "emotion.yml": "510a018938c1880dd0f67e1ae458e26878c91a570daef5a84fb83713c89f0989",
    "food.yml": "68eab2497721d03044d520b70c27d8a0d8ba8e505b3265fb3a1ff3e1a64c7124",
    "gossip.yml": "d6f1b1613ed70821fc1c427bdd00395f58b77ff57d76fbe4ab8cb2038cf15c9b",
    "greetings.yml": "0dd7eb8dcee8e2a38cd1a137bcfbd7f3eb732cddfa1bd396fac5a24b063a4d55",
    "health.yml": "eb88edc5302d688ca096374c7e3f5b9d7cd821f053a17d80204c4acdc20ea4f5",
    "history.yml": "0ff4beeb6ef9b641dc12e1039a149c6a03eb8f2e183702fad2b0997fcc1d63e3",
    "humor.yml": "d2aa03a63f0e8e054589f642788afbc41b8c76f5d734c50901a9a63b359ea06b",
    "literature.yml": "9361ff1478273d811259ca307a1e6be23a5e08e776a5bc5d9524fb13deb886f1",
    "money.yml": "2911d9766625ff5c2feb3d784f2951b2ebd5e9658547efce7568d0282c49274b",
    "movies.yml": "075ca9d91a527206c635c88bf0353323826a25a6f2057be1bc71888af389f842",
    "politics.yml": "c436d5efedea6f715a8a811423a8edf396097771eb11e43b1f0a43a6aee7c2f0",
    "psychology.yml": "5047c211d35f715af4fbc3398f111135e99d34afcd0905a661c40bdeb1413a58",
    "science.yml": "3c259799bba36c67a1601fc264ec01ab051e9e63950734ce1ef644e022081fe7",
    "sports.yml": "8d1bcc632cad4058e3b8490daa15dcd7c2a51790a7b9140b252600b794590403",
    "tech_support.yml": "8a87cdf32579c8efdd9c5f3ef166ae9fb76dcf271b958f5e2265b9246b430655",
    "trivia.yml": "3a9de77e6d82803d1ea3eba48cf6543c884908f4c4f50501fed69f88112994dc",
}

CHITCHAT_REQUIREMENT = "chitchat-dataset==0.9.0"
CHITCHAT_WHEEL_SHA256 = "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e"  # 8,105,664 bytes
CHITCHAT_JSON_SHA256 = "d2a5d0bf6acf354fef51f3af39cbece2220d3b8f6086b658c3d335105798312a"  # 40,303,934 bytes

KNOWN = (CHATTERBOT, CHITCHAT)


def _fetch(name: str, cache_dir, log_enabled: bool) -> Path:
    """The verified cache directory <cache root>/data/<name>/, downloaded and extracted on first use."""
    from tessera import knobs
    from tessera.models.fetch import cache, download

    root = Path(cache_dir) if cache_dir is not None else knobs.load().cache_dir
    if name == CHATTERBOT:
        req, wheel_sha = CHATTERBOT_REQUIREMENT, CHATTERBOT_WHEEL_SHA256
        members = {f"chatterbot_corpus/data/english/{f}": (sha, f) for f, sha in CHATTERBOT_FILES.items()}
    else:
        req, wheel_sha = CHITCHAT_REQUIREMENT, CHITCHAT_WHEEL_SHA256
        members = {"chitchat_dataset/dataset.json": (CHITCHAT_JSON_SHA256, "dataset.json")}
    pinned = {fname: sha for sha, fname in members.values()}
    log = cache.Log(log_enabled)
    meta = {"source": name, "requirement": req, "wheel_sha256": wheel_sha}
    return cache.ensure(root / "data" / name, meta,
                        lambda tmp: download.fetch_wheel_members(req, wheel_sha, members, tmp, log), log,
                        what=name, pinned=pinned)


def _chatterbot(directory: Path) -> list[list[dict]]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when built with it: ~10x faster
    conversations = []
    for fname in sorted(CHATTERBOT_FILES):
        with open(directory / fname, encoding="utf-8") as f:
            data = yaml.load(f, Loader=loader)
        for strings in data["conversations"]:
            # YAML turns some answers into numbers or booleans; the corpus means them as text.
            conversations.append([{"role": "user" if j % 2 == 0 else "assistant", "content": str(s)}
                                  for j, s in enumerate(strings)])
    return conversations


def _chitchat(directory: Path) -> list[list[dict]]:
    with open(directory / "dataset.json", encoding="utf-8") as f:
        data = json.load(f)
    conversations = []
    for conv in data.values():  # the file's order (a JSON object keeps it)
        merged: list[tuple[str, list[str]]] = []  # (sender, utterances)
        for turn in conv["messages"]:
            for utt in turn:
                if merged and merged[-1][0] == utt["sender"]:
                    merged[-1][1].append(utt["text"])
                else:
                    merged.append((utt["sender"], [utt["text"]]))
        if len(merged) < 2:
            continue  # 3,150 chats where only one person wrote (abandoned): no answer to train on
        conversations.append([{"role": "user" if j % 2 == 0 else "assistant", "content": "\n".join(texts)}
                              for j, (_, texts) in enumerate(merged)])
    return conversations


def _jsonl(path: Path) -> list[list[dict]]:
    conversations = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidArgumentError(f"load_conversations: {path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                raise InvalidArgumentError(f"load_conversations: {path}:{lineno}: expected an object with a "
                                           f"'messages' list, found {line.strip()[:200]!r}")
            conversations.append(obj["messages"])
    return conversations


def load_conversations(source: str, *, cache_dir=None, max_conversations: int | None = None,
                       log: bool = False) -> list[list[dict]]:
    """Conversations from `source` ("chatterbot-corpus", "chitchat-dataset" or a path to a .jsonl file), each a
    list of {"role": "user"|"assistant"|"system", "content": str} dicts, in a deterministic order; the first
    `max_conversations` of them when given. cache_dir overrides the cache root (default tessera.knobs cache_dir).

    Raises InvalidArgumentError for an unknown source (listing the known ones), a bad JSONL line (naming file and
    line); tessera.FetchError when a download fails or does not match its pinned sha256."""
    if max_conversations is not None and max_conversations < 0:
        raise InvalidArgumentError(f"load_conversations: max_conversations={max_conversations}, expected >= 0")
    if source in KNOWN:
        directory = _fetch(source, cache_dir, log)
        convs = _chatterbot(directory) if source == CHATTERBOT else _chitchat(directory)
    elif source.endswith(".jsonl") and os.path.isfile(source):
        convs = _jsonl(Path(source))
    else:
        raise InvalidArgumentError(f"load_conversations: unknown source {source!r}; expected one of {list(KNOWN)} "
                                   "or the path of an existing .jsonl file")
    return convs if max_conversations is None else convs[:max_conversations]
