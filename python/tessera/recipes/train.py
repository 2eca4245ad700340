"""The training loop `tessera run` drives: builds the Llama-like model, shards it with tessera, trains on
synthetic data and prints loss and tokens/s. Launches `world_size` local CPU ranks (gloo) unless it already
runs under torchrun."""

from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tessera
from tessera import knobs
from tessera.process import end_spawned_rank
from tessera.models.llama import Llama, LlamaConfig, parallelize
from tessera.models.llama.model import cross_entropy
from tessera.recipes.config import Precision, TrainConfig


def synthetic_batch(cfg: TrainConfig, step: int, rank: int) -> torch.Tensor:
    """Sequences that repeat a random 8-token pattern: the model can learn to continue them."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + rank)
    pattern = torch.randint(0, cfg.vocab_size, (cfg.batch_per_rank, 8), generator=g)
    reps = (cfg.seq_len + 1 + 7) // 8
    return pattern.repeat(1, reps)[:, : cfg.seq_len + 1]


def _train(rank: int, cfg: TrainConfig) -> float:
    world = dist.get_world_size()
    torch.manual_seed(cfg.seed)
    model = Llama(LlamaConfig(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                              n_kv_heads=cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, max_seq_len=cfg.seq_len))
    n_params = sum(p.numel() for p in model.parameters())
    mp_policy = (tessera.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if cfg.precision is Precision.bf16 else None)
    parallelize(model, strategy=tessera.ShardingStrategy[cfg.strategy.name.upper()], mixed_precision=mp_policy)
    opt = tessera.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if rank == 0:
        print(f"tessera: {n_params / 1e6:.2f} M params, {world} ranks, strategy {cfg.strategy.value}, "
              f"precision {cfg.precision.value}, {cfg.tokens_per_step} tokens/step", flush=True)
    train = {"step": 0}
    ckpt, handle = None, None
    if cfg.checkpoint_dir:
        ckpt = tessera.checkpoint.Checkpointer(cfg.checkpoint_dir, keep_last=cfg.keep_last)
        resumed = ckpt.load_latest({"model": model, "optim": opt, "train": train})
        if rank == 0:
            print(f"tessera: resumed from checkpoint step {resumed} in {cfg.checkpoint_dir}" if resumed is not None
                  else f"tessera: no checkpoint in {cfg.checkpoint_dir}; starting fresh", flush=True)
    t_start = t_log = time.perf_counter()
    loss_val = float("nan")
    first_step = train["step"] + 1
    last_log_step = first_step - 1
    for step in range(first_step, cfg.steps + 1):
        tokens = synthetic_batch(cfg, step, rank)
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        tessera.clip_grad_norm_(model, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad()
        if step % cfg.log_every == 0 or step == cfg.steps:
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            loss_val = avg.item() / world
            now = time.perf_counter()
            steps_done = step - last_log_step
            last_log_step = step
            if rank == 0:
                tps = cfg.tokens_per_step * steps_done / (now - t_log)
                print(f"step {step:5d}/{cfg.steps}  loss {loss_val:.4f}  tokens/s {tps:,.0f}  "
                      f"elapsed {now - t_start:.1f}s", flush=True)
            t_log = now
        train["step"] = step
        if ckpt is not None and step % cfg.checkpoint_every == 0:
            if handle is not None:
                handle.wait()
            handle = ckpt.save(step, {"model": model, "optim": opt, "train": train})
    if handle is not None:
        handle.wait()
        if rank == 0:
            st = handle.stats
            print(f"checkpoint step {handle.step}: {st['bytes'] / 1e6:.1f} MB/rank, staged in "
                  f"{st['stage_seconds']:.3f}s, durable in {st['durable_seconds']:.3f}s", flush=True)
    if rank == 0:
        total = time.perf_counter() - t_start
        done_steps = max(cfg.steps - first_step + 1, 0)
        print(f"done: {done_steps} steps in {total:.1f}s, {cfg.tokens_per_step * done_steps / max(total, 1e-9):,.0f} tokens/s "
              f"overall, final loss {loss_val:.4f}", flush=True)
    return loss_val


def _spawned(rank: int, cfg: TrainConfig, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=cfg.world_size)
    try:
        _train(rank, cfg)
    finally:
        dist.destroy_process_group()
    end_spawned_rank()  # see [Note: ending spawned rank processes] in tessera/process.py


def run(cfg: TrainConfig) -> None:
    if knobs.launched_by_torchrun():
        dist.init_process_group("gloo")
        try:
            _train(dist.get_rank(), cfg)
        finally:
            dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_spawned, args=(cfg, os.path.join(d, "init")), nprocs=cfg.world_size, join=True)
