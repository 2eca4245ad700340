"""save_hf: a tessera Llama/Mistral module, plain or sharded -> a Hugging Face model directory that
transformers' AutoModelForCausalLM.from_pretrained loads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from tessera.errors import InvalidArgumentError
from tessera.models.hf.safetensors_files import INDEX, SINGLE, StreamingWriter
from tessera.models.registry import build, family_of
from tessera.shard.runtime import unit_of
from tessera.shard.state_dict import iter_full_params

DEFAULT_MAX_FILE_BYTES = 5 * 2**30  # transformers' save_pretrained default max_shard_size ("5GB")
# Files a model directory's tokenizer and generation defaults live in; save_hf copies them from `files_from`.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "tokenizer.model")
_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _is_sharded(module: nn.Module) -> bool:
    return any(unit_of(m) is not None for m in module.modules())


def save_hf(module: nn.Module, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None,
            max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, files_from: str | os.PathLike | None = None,
            merge_adapters: bool = False) -> list[str]:
    """Writes `module` (a tessera Llama or Mistral, plain or sharded) as a Hugging Face directory: config.json and
    safetensors weights, split into files of at most `max_file_bytes` bytes with model.safetensors.index.json when
    larger. dtype: the stored dtype (None: the parameters' dtype). files_from: an HF directory whose tokenizer and
    generation files (TOKENIZER_FILES) are copied along. merge_adapters: for a model with LoRA adapters
    (tessera.peft.apply_lora), write W + (B @ A) * scaling for each adapted weight (computed in float32) and leave the
    adapters out; the module itself is not changed. This is the merged export of a sharded LoRA model, where
    tessera.peft.merge_lora cannot run: each block's adapters arrive in the same unit as their base weight.

    For a sharded module this is collective (call it on every rank): units are all-gathered one at a time and rank
    0 writes each tensor at its place in the files as it arrives, so peak host memory is about one unit. Files are
    written under temporary names and moved into place at the end; the other ranks return once they are there.
    Returns the weight file names. Raises InvalidArgumentError for a module without a tessera model config or
    whose parameters do not match it (e.g. unmerged LoRA adapters).
    """
    cfg = getattr(module, "config", None)
    fam = family_of(cfg) if cfg is not None else None
    if fam is None:
        raise InvalidArgumentError(f"save_hf expects a tessera model (tessera.models.load_hf or get(...).build()), "
                                   f"got {type(module).__name__} without a model config")
    shapes = {name: shape for name, shape in _meta_shapes(cfg).items()}
    scaling = _adapter_scalings(module) if merge_adapters else {}
    extra = [name for name, _ in module.named_parameters()
             if name not in shapes and name.rpartition(".")[0] not in scaling]
    if extra:  # they would be left out of the files silently (a LoRA model saved unmerged lost its training)
        raise InvalidArgumentError(
            f"save_hf: {type(module).__name__} has parameters the {fam.name} layout does not have: "
            f"{extra[:4]}{' ...' if len(extra) > 4 else ''}; for LoRA adapters pass merge_adapters=True (or "
            "tessera.peft.merge_lora first), or export them with tessera.peft.save_adapter")
    params = list(module.parameters())
    dtype = dtype or (params[0].dtype if params else torch.float32)
    hf_specs = {fam.adapter.to_hf(name): shape for name, shape in shapes.items()}
    out = Path(out_dir)
    sharded = _is_sharded(module) and dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if sharded else 0
    writer = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        writer = StreamingWriter(out, hf_specs, dtype, max_file_bytes)
    try:
        pending: dict[str, dict[str, torch.Tensor]] = {}  # adapted module path -> its weight, lora_A, lora_B
        for name, full in iter_full_params(module):
            path, _, attr = name.rpartition(".")
            if path in scaling:
                parts = pending.setdefault(path, {})
                parts[attr] = full
                if len(parts) < 3:
                    continue
                del pending[path]
                name = f"{path}.weight"
                w, a, b = parts["weight"], parts["lora_A"], parts["lora_B"]
                full = (w.float() + (b.float() @ a.float()) * scaling[path]).to(w.dtype) if writer else w
            if name in shapes and writer is not None:
                writer.write(fam.adapter.to_hf(name), full)
        if writer is not None:
            files = writer.commit()
            _write_side_files(out, fam.adapter.config_to_hf(cfg, _DTYPE_NAME.get(dtype, str(dtype))), files,
                              files_from, getattr(module, "generation_config", None))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if sharded:
        dist.barrier()  # the other ranks return once rank 0's files are in place
        if rank != 0:
            files = sorted(p.name for p in out.glob("*.safetensors"))
    return files


def _adapter_scalings(module: nn.Module) -> dict[str, float]:
    """Module path -> scaling of every LoRA-adapted linear (a module with lora_A, lora_B and scaling: the duck type
    of tessera.peft.LoRALinear, which models must not import)."""
    return {name: float(m.scaling) for name, m in module.named_modules()
            if hasattr(m, "lora_A") and hasattr(m, "lora_B") and hasattr(m, "scaling")}


def _meta_shapes(cfg) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in build(cfg, device="meta").named_parameters()}


def _write_side_files(out: Path, hf_config: dict, files: list[str], files_from, generation_config) -> None:
    """config.json, the copied tokenizer files, generation_config.json, and removal of weight files a previous save
    left that this one did not write (a stale index would point a reader at old weights).

    generation_config.json comes from `files_from` when it has one, else from the module's `generation_config` (the
    dict tessera.models.load_hf attaches), so an export keeps the EOS ids a chat model stops at (often an EOS only in
    that file, e.g. Llama 3's <|eot_id|>) even when no source directory is given."""
    keep = set(files) | ({INDEX} if len(files) > 1 else set())
    for p in out.iterdir():
        if (p.name == SINGLE or p.name == INDEX or
                (p.name.startswith("model-") and p.name.endswith(".safetensors"))) and p.name not in keep:
            p.unlink()
    if files_from is not None:
        src = Path(files_from)
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and src.resolve() != out.resolve():
                shutil.copyfile(src / name, out / f".{name}.tmp")
                os.replace(out / f".{name}.tmp", out / name)
    if generation_config and not (files_from is not None and (Path(files_from) / "generation_config.json").is_file()):
        tmp = out / f".generation_config.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(dict(generation_config), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / "generation_config.json")
    tmp = out / f".config.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "config.json")


def hf_config(module: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The HF config.json dict save_hf would write for `module` (a tessera model): store it with a checkpoint
    (Checkpointer extras) so the checkpoint can be turned back into a model without the original directory."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        raise InvalidArgumentError(f"{type(module).__name__} has no tessera model config")
    dtype = dtype or next(module.parameters()).dtype
    return family_of(cfg).adapter.config_to_hf(cfg, _DTYPE_NAME.get(dtype, str(dtype)))
