"""The Python path of examples/cpp/llama_trainer: the same training with tessera's Python API (load_hf +
tessera.shard + tessera.optim.AdamW), the same CLI, data order and output, for the parity tests
(tests/python/cpp/test_cpp_trainer.py) and the benchmark (benchmarks/cpp_trainer.py).

    torchrun --nproc-per-node 2 examples/cpp/llama_trainer/python_trainer.py --hf-dir DIR --tokens FILE \
        --steps 20 --batch 2 --seq 64 --lr 1e-4 [--weight-decay 0.0] [--max-grad-norm 1.0] [--checkpoint-dir D] \
        [--save-every N]

Prints "step N loss X" per step on rank 0 (X: the mean of the ranks' mean cross-entropy) and, at the end,
"mean step time S s (steps 2..N)". Checkpoints: {"model", "optim", "train": {"step"}} with
tessera.checkpoint.Checkpointer, the layout the C++ trainer reads and writes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import tessera
from tessera.models.hf import load_hf


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=0.0)
    p.add_argument("--checkpoint-dir", default="")
    p.add_argument("--save-every", type=int, default=10)
    return p.parse_args(argv)


def windows(path: str, seq: int) -> torch.Tensor:
    """int64 [windows, seq + 1]: the token file (raw little-endian uint32) in whole windows."""
    raw = np.fromfile(path, dtype="<u4")
    n = len(raw) // (seq + 1)
    return torch.from_numpy(raw[: n * (seq + 1)].astype(np.int64)).view(n, seq + 1)


def main(argv=None) -> None:
    args = parse(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load_hf(args.hf_dir, shard=True)
    opt = tessera.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=args.weight_decay)
    data = windows(args.tokens, args.seq)
    train = {"step": 0}
    state = {"model": model, "optim": opt, "train": train}
    ckpt = tessera.checkpoint.Checkpointer(args.checkpoint_dir) if args.checkpoint_dir else None
    if ckpt is not None and ckpt.load_latest(state) is not None and rank == 0:
        print(f"resumed from checkpoint step {train['step']}", flush=True)
    times, handle = [], None
    for s in range(train["step"], args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        batch = data[(s * world + rank) * args.batch:(s * world + rank + 1) * args.batch]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        if args.max_grad_norm > 0:
            tessera.clip_grad_norm_(model, args.max_grad_norm)
        opt.step()
        total = torch.tensor([loss.item()], dtype=torch.float64)
        dist.all_reduce(total)
        times.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"step {s + 1} loss {total.item() / world:.9f}", flush=True)
        train["step"] = s + 1
        if ckpt is not None and ((s + 1) % args.save_every == 0 or s + 1 == args.steps):
            handle = ckpt.save(s + 1, state)
    if handle is not None:
        handle.wait()
    if rank == 0 and len(times) > 1:
        print(f"mean step time {sum(times[1:]) / len(times[1:]):.6f} s (steps 2..{len(times)})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
