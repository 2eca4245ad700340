"""What a job trains: the tokenizer, and the model (pretrained or random init, LoRA, activation checkpointing)
sharded across the job's ranks."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import tessera
from tessera.errors import InvalidArgumentError
from tessera.recipes.config import JobConfig


def model_dir(cfg: JobConfig) -> Path | None:
    """The Hugging Face directory the weights come from (fetched on first use), or None for a random-init model."""
    m = cfg.model
    if m.fetch:
        from tessera.models.fetch import fetch

        return fetch(m.fetch, progress=False)
    if m.hf_dir:
        d = Path(m.hf_dir).expanduser()
        if not (d / "config.json").is_file():
            raise InvalidArgumentError(f"model.hf_dir {d}: not a Hugging Face model directory (no config.json); "
                                       "give the directory you downloaded the model to")
        return d
    return None


def load_tokenizer(cfg: JobConfig, weights_dir: Path | None):
    """transformers tokenizer from data.tokenizer (a directory or a `tessera fetch` tokenizer name), else from the
    model's directory; None for the synthetic data source (which needs none)."""
    if cfg.data.source == "synthetic":
        return None
    import transformers

    from tessera.models.fetch import available, fetch

    name = cfg.data.tokenizer
    if name in available():
        d = fetch(name, progress=False)
    elif name:
        d = Path(name).expanduser()
    elif weights_dir is not None:
        d = weights_dir
    else:
        raise InvalidArgumentError("data.tokenizer is needed with a random-init model (model.config): give a "
                                   f"directory or one of {available()}")
    if not d.is_dir():
        raise InvalidArgumentError(f"tokenizer directory {d} does not exist")
    try:
        return transformers.AutoTokenizer.from_pretrained(d)
    except (OSError, ValueError) as e:
        raise InvalidArgumentError(f"{d}: the tokenizer could not be loaded: {e}") from None


def random_init_config(cfg: JobConfig):
    """The LlamaConfig/MistralConfig of model.config (a tessera.models name, or "tiny": the 2 M-parameter demo
    model) with model.overrides applied."""
    from tessera.models.llama import LlamaConfig

    name = cfg.model.config
    base = LlamaConfig.tiny() if name == "tiny" else tessera.models.get(name).config
    try:
        return base.with_(**cfg.model.overrides)
    except TypeError as e:
        fields = sorted(f for f in base.__dataclass_fields__)
        raise InvalidArgumentError(f"model.overrides: {e}; allowed fields: {fields}") from None
    except ValueError as e:
        raise InvalidArgumentError(f"model.overrides give an invalid model: {e}") from None


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Random initialisation as transformers' Llama does (initializer_range 0.02): every matrix (linears and the
    embedding) from N(0, std^2), norm weights 1. PyTorch's defaults (N(0, 1) embeddings, tied to the head) start a
    model at a loss of ~60 nats instead of ln(vocab)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.fill_(1.0)


def _checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing inside each block's forward: the block keeps only its input; its activations are
    recomputed in backward (while tessera holds the block's gathered parameters for its backward)."""
    for block in model.layers:
        inner = block.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def _adapt(cfg: JobConfig):
    def adapt(model: nn.Module) -> None:
        lora = cfg.model.lora
        if lora.rank > 0:
            tessera.peft.apply_lora(model, tessera.peft.LoRAConfig(rank=lora.rank, alpha=lora.alpha,
                                                                   dropout=lora.dropout, targets=lora.targets))
        if cfg.model.activation_checkpointing:
            _checkpoint_blocks(model)
    return adapt


def build_model(cfg: JobConfig, weights_dir: Path | None, *, device: torch.device, group,
                mixed_precision) -> nn.Module:
    """The sharded model on `device` (collective: every rank calls it). Pretrained weights stream in unit by unit
    (tessera.models.load_hf(shard=True)); LoRA adapters are created inside the unit of the linear they adapt.
    Parameters are float32 (the master copy); mixed_precision casts for compute. Random values (a random-init
    model, LoRA's A matrices) come from torch's global generator: the caller seeds it the same on every rank."""
    strategy = tessera.ShardingStrategy[cfg.parallelism.strategy.upper()]
    adapt = _adapt(cfg)
    if weights_dir is not None:
        return tessera.models.load_hf(weights_dir, dtype=torch.float32, device=device, shard=True, group=group,
                                      strategy=strategy, mixed_precision=mixed_precision, adapt=adapt)
    config = random_init_config(cfg)
    model = tessera.models.build(config, device=device)
    init_weights(model)
    adapt(model)
    from tessera.models.registry import family_of

    family_of(config).parallelize(model, group=group, strategy=strategy, mixed_precision=mixed_precision)
    return model
