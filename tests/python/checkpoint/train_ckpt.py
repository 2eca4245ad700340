"""A resumable training job on CPU gloo ranks, run as a real process by the checkpoint fault tests.

    python train_ckpt.py --world 2 --steps 6 --save-every 2 --ckpt DIR --out final.pt [--strategy NO_SHARD]

Resumes from the newest valid checkpoint in DIR (printing "resumed from step N" or "fresh start"), trains to
--steps, saving every --save-every steps, and writes the final full_state_dict to --out (rank 0). Data batches
come from the global torch RNG, so a bit-exact resume needs the RNG states restored too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH = 6


def run(rank, world, args, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import tessera
    from models import VOCAB, SEQ, loss_fn, make_model
    from shard.parity import shard_model

    model = shard_model(make_model(), tessera.ShardingStrategy[args.strategy])
    opt = tessera.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    torch.manual_seed(1234)  # the data stream
    train = {"step": 0, "samples_seen": 0}
    state = {"model": model, "optim": opt, "sched": sched, "rng": tessera.checkpoint.RNGState(), "train": train}
    ckpt = tessera.checkpoint.Checkpointer(args.ckpt, keep_last=2)
    resumed = ckpt.load_latest(state)
    if rank == 0:
        print(f"resumed from step {resumed}" if resumed is not None else "fresh start", flush=True)
    per = BATCH // world
    handle = None
    while train["step"] < args.steps:
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
        x, y = tokens[rank * per:(rank + 1) * per, :-1], tokens[rank * per:(rank + 1) * per, 1:]
        loss_fn(model, x, y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        train["step"] += 1
        train["samples_seen"] += BATCH
        if args.save_every and train["step"] % args.save_every == 0:
            handle = ckpt.save(train["step"], state)
    if handle is not None:
        handle.wait()
    sd = tessera.full_state_dict(model)
    if rank == 0:
        torch.save({"model": sd, "train": dict(train)}, args.out)
    dist.destroy_process_group()
    from tessera.process import end_spawned_rank

    end_spawned_rank()  # see [Note: ending spawned rank processes] in tessera/process.py


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="FULL_SHARD")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(run, args=(args.world, args, os.path.join(d, "init")), nprocs=args.world)


if __name__ == "__main__":
    main()
