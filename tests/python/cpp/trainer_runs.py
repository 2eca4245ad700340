"""Running examples/cpp/llama_trainer (C++) and its Python twin (python_trainer.py) as real 2-rank jobs under
torchrun, on a tiny random Llama written as a Hugging Face directory and a uint32 token file."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[3]
CPP_TRAINER = ROOT / "build" / "llama_trainer" / "llama_trainer"
PY_TRAINER = ROOT / "examples" / "cpp" / "llama_trainer" / "python_trainer.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
_STEP = re.compile(r"^step (\d+) loss (\S+)$", re.M)

# Tiny, but every part of the architecture: GQA (4 heads over 2 kv heads), tied embeddings (as SmolLM2), sizes
# that do not divide evenly by 2 ranks (vocab 250, ffn 90).
TINY = dict(vocab_size=250, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=90, max_seq_len=64,
            rope_theta=10000.0, tie_embeddings=True)


def make_hf_dir(out: Path, seed: int = 0, **overrides) -> Path:
    """A random tessera Llama (float32) saved as an HF directory."""
    from tessera.models.hf import save_hf
    from tessera.models.llama import Llama, LlamaConfig

    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**TINY, **overrides}))
    with torch.no_grad():  # not the default init everywhere: norms too, so their gradients matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (1.0 if p.dim() == 1 else 0.0))
    save_hf(model, out)
    return out


def make_tokens(path: Path, n: int, vocab: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    rng.integers(0, vocab, size=n, dtype=np.uint32).astype("<u4").tofile(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(kind: str, args: dict, nproc: int = 2) -> list[str]:
    flags = [str(x) for k, v in args.items() for x in (f"--{k.replace('_', '-')}", v)]
    launch = TORCHRUN + ["--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    if kind == "cpp":
        return launch + ["--no-python", str(CPP_TRAINER)] + flags
    return launch + [str(PY_TRAINER)] + flags


def run(kind: str, args: dict, nproc: int = 2, timeout: float = 300) -> tuple[dict[int, float], str]:
    """Runs a trainer to the end; returns ({step: loss}, stdout). AssertionError with the output if it failed."""
    p = subprocess.run(command(kind, args, nproc), capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"{kind} trainer failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return losses(p.stdout), p.stdout


def losses(stdout: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in _STEP.finditer(stdout)}


def run_and_kill(kind: str, args: dict, after_step: int, timeout: float = 300) -> str:
    """Starts a trainer, waits for "step <after_step>" on its output, then kills rank 1 with SIGKILL; returns the
    output. torchrun then ends the job with a failure."""
    proc = subprocess.Popen(command(kind, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, deadline = [], time.monotonic() + timeout
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(f"step {after_step} "):
                workers = [c for c in psutil.Process(proc.pid).children(recursive=True)]
                rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
                assert rank1, f"no rank-1 worker among {workers}"
                os.kill(rank1[0].pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(out)
        rest, _ = proc.communicate(timeout=120)
        out.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, "the job went on after rank 1 was killed:\n" + "".join(out)
    return "".join(out)


def read_dump(d: Path) -> dict[str, torch.Tensor]:
    """The trainer's --dump-params directory: name -> tensor."""
    out = {}
    for line in (d / "index.txt").read_text().splitlines():
        name, dtype, shape = line.split(" ")
        assert dtype == "Float", line
        t = torch.from_numpy(np.fromfile(d / f"{name}.bin", dtype=np.float32))
        out[name] = t.view([int(x) for x in shape.split(",")])
    return out
