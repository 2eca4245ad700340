"""SFT throughput: `tessera run`'s training step vs transformers' model + torch FSDP2 `fully_shard` + torch AdamW, in
the same run, on the same model, data, batch and sequence length: on CPU ranks over gloo (float32), or on GPUs over
NCCL (bf16 compute, fp32 master weights and reduction on both sides; fused AdamW for the peer).

    python benchmarks/sft.py [--device cpu|cuda] [--world 2] [--steps 6] [--warmup 2] [--batch 2] [--seq 128]
                             [--lora 0] [--model-dir DIR] [--out benchmarks/results/sft_<machine>_YYYYMM.md]

Model: SmolLM2-135M-Instruct (`tessera fetch`, real weights, float32) or --model-dir (an HF Llama directory with a
tokenizer; the GPU machine, which has no network, uses a random-init SmolLM2 written there). Data: chatterbot-corpus conversations,
rendered with the chat template, assistant-only labels, packed into rows of --seq tokens (tessera.data.build_sft);
both sides read the same rows in the same order (tessera.data.DistributedSampler). Loss: the token-weighted mean
over the step's label tokens on both sides.

- tessera: tessera.recipes.loop.Job (load_hf(shard=True) per block + root, tessera.optim.AdamW, the loop's
  train_step: gradient clipping and the label-token all-reduce included). Rows carry doc_ids, so tessera attends
  within each packed conversation only (an explicit mask: the real job's behaviour).
- peer: transformers LlamaForCausalLM.from_pretrained, fully_shard per decoder layer + root, torch.optim.AdamW,
  clip_grad_norm_. It gets the same per-document positions (position_ids) but transformers' SDPA path runs plain
  causal attention over the packed row (no document mask: it has none outside flash-attention), slightly less work
  than tessera's masked attention, and its losses differ from tessera's by the cross-document attention.
With --lora R both train LoRA adapters of rank R on q,k,v,o (peer: peft.get_peft_model before fully_shard).
Reported: median step seconds after warm-up, tokens/s (positions per step / step time), MFU where the device's
peak is known (tessera.metrics.peak_flops), and tessera / peer.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F


def _job_config(args, model_dir: str):
    from tessera.recipes.config import load_config

    overrides = [f"model.hf_dir={model_dir}", "data.source=chatterbot-corpus", f"data.seq_len={args.seq}",
                 f"training.batch_size={args.batch}", f"training.steps={args.steps + args.warmup}",
                 "training.lr=1e-5", "training.warmup_steps=0", "training.min_lr_ratio=1.0", "checkpoint.every=0", "checkpoint.export_hf=false",
                 "metrics.progress=false", "metrics.tensorboard=false", "data.eval_fraction=0.05",
                 "output_dir=" + args.scratch]
    if args.lora:
        overrides.append(f"model.lora.rank={args.lora}")
    return load_config(None, overrides)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tessera(args, model_dir, device):
    import tessera
    from tessera.recipes.loop import Job

    mp_policy = (tessera.MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                 if device.type == "cuda" else None)
    job = Job(_job_config(args, model_dir), device=device, mixed_precision=mp_policy, log=lambda m: None)
    times, losses = [], []
    for step in range(1, args.steps + args.warmup + 1):
        _sync(device)
        t0 = time.perf_counter()
        r = job.train_step(step)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(r.loss)
    return times, losses, job.model.config.flops_per_token(args.seq)


def _peer(args, model_dir, device):
    import transformers
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from tessera.data import DistributedSampler, build_sft, load_conversations

    cfg = _job_config(args, model_dir)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    rows, _, _ = build_sft(load_conversations("chatterbot-corpus"), tok, seq_len=args.seq,
                           train_on="assistant", eval_fraction=cfg.data.eval_fraction, seed=cfg.training.seed)
    sampler = DistributedSampler(len(rows), world_size=dist.get_world_size(), rank=dist.get_rank(),
                                 seed=cfg.training.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="sdpa").to(device)
    if args.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        layers = model.base_model.model.model.layers
    else:
        layers = model.model.layers
    kw = ({"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
          if device.type == "cuda" else {})
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0,
                            fused=device.type == "cuda")
    world = dist.get_world_size()
    times, losses = [], []
    for _ in range(args.steps + args.warmup):
        _sync(device)
        t0 = time.perf_counter()
        b = rows.batch(sampler.next_indices(args.batch))
        n = torch.tensor([float(b.num_label_tokens)], dtype=torch.float64, device=device)
        dist.all_reduce(n)
        logits = model(input_ids=b.input_ids.to(device), position_ids=_positions(b.doc_ids).to(device)).logits
        ce = F.cross_entropy(logits.flatten(0, 1).float(), b.labels.to(device).flatten(), ignore_index=-100,
                             reduction="sum")
        (ce * world / n.item()).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        s = ce.detach().double().reshape(1)
        dist.all_reduce(s)
        losses.append((s / n).item())
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, losses, None


def _positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at each document's first token (int64 [B, T]), as tessera's packed forward uses."""
    idx = torch.arange(doc_ids.shape[1]).expand_as(doc_ids)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return idx - torch.where(first, idx, torch.zeros_like(idx)).cummax(dim=1).values


def worker(rank, world, init_file, framework, args, model_dir, out_file):
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        times, losses, fpt = (_tessera if framework == "tessera" else _peer)(args, model_dir, device)
        if rank == 0:
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            with open(out_file, "w") as f:
                f.write(repr((times, losses, fpt, peak)))
    finally:
        dist.destroy_process_group()
    from tessera.process import end_spawned_rank

    end_spawned_rank()


def run(framework, args, model_dir):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out")
        mp.spawn(worker, args=(args.world, os.path.join(d, "init"), framework, args, model_dir, out),
                 nprocs=args.world, join=True)
        with open(out) as f:
            return eval(f.read())  # noqa: S307 - our own repr of two float lists


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--model-dir", help="an HF Llama directory with a tokenizer (default: the fetched SmolLM2)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="rows per rank per step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: full fine-tuning)")
    ap.add_argument("--out", help="write the markdown report here")
    args = ap.parse_args()
    from tessera.data import load_conversations
    from tessera.metrics import mfu
    from tessera.models.fetch import fetch

    model_dir = args.model_dir or str(fetch("smollm2-135m-instruct", progress=False))
    load_conversations("chatterbot-corpus")  # download once, before the ranks start
    args.scratch = tempfile.mkdtemp(prefix="tessera-sft-bench-")
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{os.cpu_count()}-core CPU"
    res, fpt = {}, None
    for fw in ("tessera", "peer"):
        times, losses, f, peak = run(fw, args, model_dir)
        fpt = fpt or f
        timed = times[args.warmup:]
        med = statistics.median(timed)
        tps = args.world * args.batch * args.seq / med
        res[fw] = {"step_s": med, "tokens_s": tps, "losses": losses, "peak": peak,
                   "mfu": mfu(fpt, tps / args.world, device_name) if fpt else None}
        print(f"{fw}: median step {med:.3f} s, {tps:.0f} tokens/s, losses {[round(x, 4) for x in losses]}",
              flush=True)
    ratio = res["tessera"]["tokens_s"] / res["peer"]["tokens_s"]
    mode = f"LoRA rank {args.lora} on q,k,v,o" if args.lora else "full fine-tuning"
    precision = "bf16 compute, fp32 master weights and reduction" if args.device == "cuda" else "float32"
    backend = "NCCL" if args.device == "cuda" else "gloo"
    lines = [
        f"# SFT throughput on {args.world} {args.device.upper()} rank(s) ({device_name}): tessera vs transformers + "
        f"FSDP2 ({datetime.date.today():%Y-%m})",
        "",
        f"- machine: {platform.node()} ({os.cpu_count()} cores), {device_name}, torch {torch.__version__}, {backend}",
        f"- command: `python benchmarks/sft.py {' '.join(sys.argv[1:])}`",
        f"- model: {'SmolLM2-135M-Instruct (fetched)' if not args.model_dir else args.model_dir}, {precision}, {mode}; "
        f"chatterbot-corpus, assistant-only labels, packed rows of {args.seq} tokens; {args.batch} rows per rank per "
        f"step; {args.steps} timed steps after {args.warmup} warm-up; median step time",
        "",
        "| framework | median step (s) | tokens/s | MFU | peak GiB | losses (all steps) |",
        "|---|---|---|---|---|---|",
    ]
    names = {"tessera": "tessera (`tessera run` loop)", "peer": "transformers + FSDP2 fully_shard + torch AdamW"}
    for fw in ("tessera", "peer"):
        r = res[fw]
        m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**30:.1f}"
        lines.append(f"| {names[fw]} | {r['step_s']:.3f} | {r['tokens_s']:.0f} | {m} | {peak} | "
                     f"{', '.join(f'{x:.3f}' for x in r['losses'])} |")
    lines += ["", f"tessera / peer tokens/s: **{ratio:.3f}**", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
