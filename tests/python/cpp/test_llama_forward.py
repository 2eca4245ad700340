"""The C++ Llama (examples/cpp/llama_trainer/llama.{h,cc}) against tessera's Python Llama on tiny random HF
directories: the same parameter names in the same order, and float32 logits within 1e-5 (tied and untied heads,
Llama 3.1 RoPE scaling, grouped-query attention, weights stored as float32 and as bfloat16)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import tessera.models as tm
from tessera.models.llama.args import LlamaConfig, RopeScaling
from tessera.models.llama.model import Llama

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "cpp" / "llama_trainer"


def build_forward_check() -> Path:
    """examples/cpp/llama_trainer's llama_forward_check, built against the installed CMake package by
    scripts/build_cpp_trainer.sh (scripts/test.sh runs it before pytest)."""
    path = ROOT / "build" / "llama_trainer" / "llama_forward_check"
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/build_cpp_trainer.sh (scripts/test.sh runs it)")
    return path


@pytest.fixture(scope="module")
def forward_check() -> Path:
    return build_forward_check()


# name -> (config, stored dtype). Between them: tied and untied head, Llama 3.1 RoPE scaling with a short original
# context (so all three frequency bands occur), GQA, float32 and bfloat16 files.
CASES = {
    "untied_rope_scaling_f32": (LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                                            rope_theta=50000.0, max_seq_len=64,
                                            rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=16)),
                                torch.float32),
    "tied_f32": (LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                             rope_theta=10000.0, max_seq_len=64, tie_embeddings=True), torch.float32),
    "tied_bf16": (LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                              max_seq_len=64, tie_embeddings=True), torch.bfloat16),
}


def _hf_dir(name: str, out: Path) -> Path:
    cfg, dtype = CASES[name]
    torch.manual_seed(0)
    model = Llama(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):  # random norms, so a swapped or skipped norm shows
                p.uniform_(0.5, 1.5)
            else:
                p.mul_(0.5)
    tm.save_hf(model, out, dtype=dtype)
    return out


def _run(exe: Path, hf_dir: Path, tokens: torch.Tensor, tmp_path: Path):
    (tmp_path / "tokens.bin").write_bytes(tokens.numpy().astype("<i8").tobytes())
    cmd = [str(exe), str(hf_dir), str(tmp_path / "tokens.bin"), str(tokens.shape[0]), str(tokens.shape[1]),
           str(tmp_path / "logits.bin"), str(tmp_path / "names.txt")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_and_names_match_python(name, forward_check, tmp_path):
    hf_dir = _hf_dir(name, tmp_path / "hf")
    ref_model = tm.load_hf(hf_dir, dtype=torch.float32)  # the reference: tessera's Python Llama, same files
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, ref_model.config.vocab_size, (2, 24), generator=g)  # 24 > 16: past the scaling's context
    with torch.no_grad():
        ref = ref_model(tokens).float()

    r = _run(forward_check, hf_dir, tokens, tmp_path)
    assert r.returncode == 0, r.stderr
    names = (tmp_path / "names.txt").read_text().split()
    assert names == [n for n, _ in ref_model.named_parameters()]
    got = torch.from_numpy(np.fromfile(tmp_path / "logits.bin", dtype="<f4").copy())
    assert got.numel() == ref.numel(), f"C++ wrote {got.numel()} logits; expected {tuple(ref.shape)}"
    got = got.reshape(ref.shape)
    diff = (got - ref).abs().max().item()
    print(f"{name}: max |C++ - Python| = {diff:.3g} over logits of magnitude up to {ref.abs().max().item():.3g}")
    assert diff <= 1e-5, f"{name}: max abs diff {diff}"


def test_load_error_names_the_missing_key(forward_check, tmp_path):
    from safetensors.torch import load_file, save_file

    hf_dir = _hf_dir("tied_f32", tmp_path / "hf")
    sd = load_file(hf_dir / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, hf_dir / "model.safetensors")
    r = _run(forward_check, hf_dir, torch.zeros(1, 4, dtype=torch.int64), tmp_path)
    assert r.returncode == 1
    assert f"{hf_dir}: the weights do not match config.json (llama)" in r.stderr
    assert "missing tensors 'model.layers.1.mlp.down_proj.weight'" in r.stderr
