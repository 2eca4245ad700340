"""Text generation with a KV cache: `tessera generate` and the functions behind it.

    model, model_dir = load_model("out/hf")                   # an HF directory or a tessera checkpoint
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    print(generate(model, tok, "Why is the sky blue?", chat=True))

Generation runs in one process on one device: `load_model` builds a plain (unsharded) module, also from a
checkpoint that was saved by many sharded ranks, and none of these functions is collective.

[Note: a checkpoint carries its model config]
A tessera checkpoint (tessera.checkpoint.Checkpointer) holds tensors and JSON extras, not a model class. To be
turned back into a model without the original HF directory it must carry the HF config.json dict of the model as
the plain-dict extras entry "hf_config", next to the module under the state key "model":

    ckpt.save(step, {"model": model, "optim": opt, "hf_config": tessera.models.hf_config(model), ...})

`load_model` reads "hf_config" (JSON, no pickle), builds the family's module with tessera.models.build on the CPU
in the dtypes the checkpoint stores, loads the "model/..." tensors into it (any saving world size: the
checkpoint stores each parameter's full flattened range), and only then converts it to the requested dtype and
device. Other entries (optimizer state, RNG, ...) are ignored.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch
import torch.nn as nn

from tessera import _C
from tessera.checkpoint import Checkpointer
from tessera.errors import CheckpointError, InvalidArgumentError
from tessera.models.hf import config_from_hf_dict, load_hf
from tessera.models.hf.load import read_generation_config
from tessera.models.llama.model import KVCache
from tessera.models.registry import build

MODEL_KEY = "model"  # the state key of the module in a checkpoint (see the note above)
CONFIG_KEY = "hf_config"  # the extras entry holding its HF config.json dict
_STEP_DIR = re.compile(r"step-(\d{10})")


# ---- sampling ------------------------------------------------------------------------------------------------

def _check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0.0:  # also rejects NaN
        raise InvalidArgumentError(f"generate: temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidArgumentError(f"generate: top_p must be in (0, 1], got {top_p}")


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """The next token of each row, int64 [batch], from the last position's logits [batch, vocab].

    temperature == 0: the argmax (greedy). Otherwise softmax(logits / temperature) in float32, restricted to the
    nucleus: the most probable tokens whose probabilities, summed in decreasing order, first reach top_p (the
    most probable token is always kept, so a tiny top_p is greedy), renormalised and sampled with `generator`."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # stable: equal probabilities keep vocabulary order, so the head of the nucleus is argmax's token
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_tensor(eos_token_id, device) -> torch.Tensor | None:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise InvalidArgumentError(f"generate: eos_token_id must be None, an int >= 0 or a non-empty list of them, "
                                   f"got {eos_token_id!r}")
    return torch.tensor(ids, dtype=torch.int64, device=device)


def _left_pad(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The number of left-pad slots of each row, int64 [batch], from an HF-style attention mask (1: token, 0: pad);
    None when there is no mask or no padding. InvalidArgumentError for a mask of another shape, values other than
    0/1, a row without tokens, or padding that is not all on the left."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InvalidArgumentError(f"generate: attention_mask has shape {tuple(attention_mask.shape)}; expected "
                                   f"input_ids' {tuple(input_ids.shape)}")
    if attention_mask.device != input_ids.device:
        raise InvalidArgumentError(f"generate: attention_mask is on {attention_mask.device}, input_ids on "
                                   f"{input_ids.device}")
    m = attention_mask.to(torch.int64)
    if not bool(((m == 0) | (m == 1)).all()):
        raise InvalidArgumentError("generate: attention_mask must hold 0 (pad) and 1 (token) only")
    pad = (m == 0).sum(dim=1)
    slots = torch.arange(m.shape[1], device=m.device)
    bad = ((slots[None, :] >= pad[:, None]).to(torch.int64) != m).any(dim=1) | (pad == m.shape[1])
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise InvalidArgumentError(
            f"generate: row {row} of attention_mask is {m[row].tolist()}; expected left padding: zeros (pad) first, "
            "then ones (the prompt), at least one token. Pad prompts of different lengths on the left")
    return pad if bool(pad.any()) else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_tokens(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                    generator: torch.Generator | None = None, stats: dict | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continues each row of `input_ids` (int64 [batch, prompt_len], on the model's device) by up to
    `max_new_tokens` tokens; returns int64 [batch, prompt_len + n], n <= max_new_tokens.

    Prompts of different lengths: pad them on the LEFT to one length and give `attention_mask` ([batch,
    prompt_len], 1: token, 0: pad, as a transformers tokenizer with padding_side="left" returns it). Each row then
    generates exactly what it would alone: its positions start at its first token and no pad slot is attended to
    (the pad ids themselves are never read). Without attention_mask every row is taken as a whole prompt of
    prompt_len tokens; a padded batch without its mask gives each padded row a different continuation.

    The prompt is prefilled in one forward through a KVCache, then each new token is one forward of one position.
    Token choice: see next_token (temperature 0: greedy; `generator` (on the model's device) makes sampling
    repeatable). With `eos_token_id` (an id or a list), a row is finished once it produced one of them; later
    positions of a finished row are filled with the first EOS id, and generation stops early when every row has
    finished. `stats`, when given, receives prompt_tokens, new_tokens (per row), prefill_s, decode_s (wall
    seconds, after a device sync) and decode_tokens_per_s (batch * decoded positions / decode_s). EOS ids are not
    looked up here: generate() takes them from eos_token_ids (the model's generation config).

    One process: `model` is a plain tessera Llama/Mistral (load_model, load_hf), not a sharded one. Raises
    InvalidArgumentError for an empty or non-2-D prompt or one on another device, a negative max_new_tokens,
    prompt_len + max_new_tokens beyond the model's max_seq_len (positions it has no rotary table for),
    temperature < 0 or top_p outside (0, 1], and an attention_mask that is not left padding of input_ids' shape.
    """
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "max_seq_len"):
        raise InvalidArgumentError(f"generate: expected a tessera model (load_model / load_hf), got "
                                   f"{type(model).__name__}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype != torch.int64:
        raise InvalidArgumentError(f"generate: input_ids must be int64 [batch, prompt_len] with prompt_len >= 1, "
                                   f"got {input_ids.dtype} {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise InvalidArgumentError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_sampling(temperature, top_p)
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if total > cfg.max_seq_len:
        raise InvalidArgumentError(
            f"generate: prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens exceeds "
            f"the model's max_seq_len ({cfg.max_seq_len}); shorten the prompt or lower max_new_tokens")
    param = next(model.parameters())
    if input_ids.device != param.device:
        raise InvalidArgumentError(f"generate: input_ids are on {input_ids.device}, the model on {param.device}")
    eos = _eos_tensor(eos_token_id, param.device)
    pad = _left_pad(attention_mask, input_ids)
    out = [input_ids]
    t0 = time.perf_counter()
    n_decoded = 0
    if max_new_tokens:
        # The last new token is never fed back, so the cache needs total - 1 positions.
        # In the dtype the model computes keys in (bf16 under mixed precision), not the parameters' (fp32 shards).
        cache = KVCache(cfg, batch, total - 1, pad=pad)
        fed = input_ids if pad is None else input_ids.masked_fill(attention_mask == 0, 0)  # any pad id embeds
        logits = model(fed, cache)[:, -1]
        _sync(param.device)
        t_prefill = time.perf_counter()
        finished = torch.zeros(batch, dtype=torch.bool, device=param.device)
        for i in range(max_new_tokens):
            tok = next_token(logits, temperature, top_p, generator)
            if eos is not None:
                tok = torch.where(finished, eos[0], tok)
                finished |= torch.isin(tok, eos)
            out.append(tok[:, None])
            if i + 1 == max_new_tokens or (eos is not None and bool(finished.all())):
                break
            logits = model(tok[:, None], cache)[:, -1]
            n_decoded += 1
    else:
        t_prefill = t0
    _sync(param.device)
    t_end = time.perf_counter()
    ids = torch.cat(out, dim=1)
    if stats is not None:
        decode_s = t_end - t_prefill
        stats.update(prompt_tokens=prompt_len, new_tokens=ids.shape[1] - prompt_len, prefill_s=t_prefill - t0,
                     decode_s=decode_s, decode_tokens_per_s=batch * n_decoded / decode_s if decode_s > 0 else 0.0)
    return ids


# ---- loading -------------------------------------------------------------------------------------------------

def _find_checkpoint(path: Path) -> tuple[str, int | None] | None:
    """(root, step) when `path` is a Checkpointer root (step None: its newest committed step) or one committed
    step-NNNNNNNNNN directory of one; None when it is neither."""
    m = _STEP_DIR.fullmatch(path.name)
    if m and (path / "manifest.json").is_file():
        return str(path.parent), int(m.group(1))
    if (path / "latest").is_file() or any(_STEP_DIR.fullmatch(p.name) for p in path.iterdir()):
        return str(path), None
    return None


def _load_checkpoint(root: str, step: int | None, where: str, dtype, device) -> nn.Module:
    ckpt = Checkpointer(root, read_only=True)  # never touches a save in progress
    if step is None:
        steps = ckpt.committed_steps()
        if not steps:
            raise CheckpointError(f"{where}: a checkpoint directory without a committed checkpoint (no "
                                  "step-*/manifest.json); a save may not have finished yet")
        step = max(steps)
    hf: dict = {}
    try:
        ckpt.load(step, {CONFIG_KEY: hf})
    except CheckpointError as e:
        if f"no entry '{CONFIG_KEY}'" not in str(e):
            raise
        raise CheckpointError(
            f"{where}: checkpoint step {step} has no '{CONFIG_KEY}' entry, so the model it holds is unknown; save "
            f"it with {{'{MODEL_KEY}': model, '{CONFIG_KEY}': tessera.models.hf_config(model), ...}} ({e})") from None
    cfg = config_from_hf_dict(hf, f"{where} (step {step}, '{CONFIG_KEY}')")
    # Built for real (not on meta): the checkpointer copies into existing tensors. Each parameter in the dtype the
    # checkpoint stores it in (its manifest says; the checkpointer rejects another dtype), converted afterwards.
    model = build(cfg, device="cpu")
    stored = _C.CheckpointReader(root, step).tensors  # name -> (dtype name, shape), from the manifest
    for name, p in model.named_parameters():
        dtype_name = stored.get(f"{MODEL_KEY}/{name}", ("float32",))[0]
        p.data = p.data.to(getattr(torch, dtype_name))
    ckpt.load(step, {MODEL_KEY: model})
    model = model.to(dtype=dtype, device=device)
    # A checkpoint has no generation_config.json: config.json's token ids, as transformers derives them.
    model.generation_config = read_generation_config(None, hf)
    return model


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
               device=None) -> tuple[nn.Module, str | None]:
    """A plain tessera model, in eval mode, with `dtype` parameters on `device` (None: CPU), and the HF
    directory it came from (None for a checkpoint; its tokenizer must then come from elsewhere).

    `path` is one of:
    - a Hugging Face model directory (config.json and safetensors weights): tessera.models.load_hf;
    - a tessera checkpoint root (Checkpointer(root)): its newest committed step, saved at any world size and
      strategy, with the "hf_config" extras entry (see [Note: a checkpoint carries its model config]);
    - one committed step directory of such a root (ROOT/step-0000000012).
    Raises InvalidArgumentError for a path that is none of these (naming it and what was expected), and the errors
    of load_hf and Checkpointer.load (CheckpointError: damaged, or not matching its own config).
    """
    p = Path(path)
    if (p / "config.json").is_file():
        return load_hf(p, dtype=dtype, device=device).eval(), str(p)
    found = _find_checkpoint(p) if p.is_dir() else None
    if found is None:
        what = "does not exist" if not p.exists() else ("is a file" if not p.is_dir() else
                                                         "is a directory with neither")
        raise InvalidArgumentError(
            f"{p}: {what}; expected a Hugging Face model directory (config.json + *.safetensors) or a tessera "
            "checkpoint (a Checkpointer root with step-* directories, or one step-* directory)")
    root, step = found
    return _load_checkpoint(root, step, str(p), dtype, device).eval(), None


# ---- text ----------------------------------------------------------------------------------------------------

def _eos_of(gen: dict | None, where: str) -> list[int]:
    value = (gen or {}).get("eos_token_id")
    ids = [] if value is None else [value] if isinstance(value, int) else value
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise InvalidArgumentError(f"{where}: eos_token_id must be an id >= 0 or a list of them, got {value!r}")
    return ids


def _tokenizer_dir(tokenizer) -> str | None:
    d = getattr(tokenizer, "name_or_path", None)
    return d if d and Path(d).is_dir() else None


def eos_token_ids(tokenizer, *dirs: str | os.PathLike | None, model: nn.Module | None = None) -> list[int]:
    """The ids that end a reply, the one rule every generating path uses (generate(), `tessera generate`, a
    recipe's metrics prompt): the union of
    - the tokenizer's eos token;
    - the eos_token_id (an id or a list) of `model.generation_config` (load_hf and load_model set it from
      generation_config.json, else config.json, as transformers does);
    - the eos_token_id of the generation defaults of the tokenizer's own directory and of each of `dirs` that
      exists (generation_config.json, else config.json; tessera.models.hf.read_generation_config).
    A chat model's end-of-turn token is often an EOS only in generation_config.json (Llama 3's <|eot_id|>).
    Sorted, without repeats; empty when none is known."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model is not None:
        ids.update(_eos_of(getattr(model, "generation_config", None), f"{type(model).__name__}.generation_config"))
    for d in (_tokenizer_dir(tokenizer), *dirs):
        if d is not None and Path(d).is_dir():
            ids.update(_eos_of(read_generation_config(d), str(Path(d) / "generation_config.json")))
    return sorted(ids)


def _encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgumentError(f"generate: chat=True, but the tokenizer ({tokenizer.name_or_path}) has no "
                                       "chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)")
        # The template writes the special tokens itself (BOS, turn markers): render it, then encode it as is.
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(prompt).input_ids


def generate(model: nn.Module, tokenizer, prompt: str | list[str], *, chat: bool = False, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             eos_token_id: int | list[int] | None = None, stats: dict | None = None) -> str | list[str]:
    """The model's continuation of `prompt` (only the new text, up to its first EOS, special tokens skipped); for a
    list of prompts, the list of their continuations, generated as one left-padded batch in which each row is
    what its prompt gives alone (greedy: exactly; sampling draws the rows from one generator; see generate_tokens).

    chat=True wraps each prompt as one user turn with the tokenizer's chat template and the generation prompt
    (the assistant's turn header); otherwise the prompt is encoded as it is (with the tokenizer's BOS, if any).
    Sampling (temperature > 0) draws from a generator seeded with `seed` on the model's device, so the same seed
    gives the same text. eos_token_id: None uses eos_token_ids(tokenizer, model=model), which includes the
    generation_config.json of the directory load_hf read; an explicit id or list replaces it. stats: see
    generate_tokens. Raises InvalidArgumentError for chat=True with a tokenizer that has no chat template, an
    empty list of prompts, and those of generate_tokens."""
    _check_sampling(temperature, top_p)
    device = next(model.parameters()).device
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise InvalidArgumentError("generate: an empty list of prompts")
    encoded = [_encode(tokenizer, p, chat) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([[0] * (width - len(e)) + e for e in encoded], dtype=torch.int64)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], dtype=torch.int64)
    if eos_token_id is None:
        eos_token_id = eos_token_ids(tokenizer, model=model) or None
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate_tokens(model, ids.to(device), max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, eos_token_id=eos_token_id, generator=generator, stats=stats,
                          attention_mask=mask.to(device) if width > min(len(e) for e in encoded) else None)
    texts = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return texts[0] if isinstance(prompt, str) else texts
