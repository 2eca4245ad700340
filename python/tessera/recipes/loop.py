"""One rank's training job behind `tessera run`: model, data, AdamW, warmup + cosine LR, gradient accumulation,
clipping, held-out evaluation, checkpoints with exact resume, metrics, and the export at the end.

[Note: the loss is normalised by label tokens]
A step's loss is the sum of the token cross-entropies over every micro-batch on every rank, divided by the number
of label tokens (labels != -100) in all of them: the mean over the step's tokens, as one process would compute it
on the concatenated batch, whatever the split into ranks and micro-batches (averaging per-micro-batch means instead
weights a short conversation's tokens more; Unsloth and HF transformers fixed that bug in their gradient
accumulation in 2024). Each rank backpropagates sum_ce * world / n_global: tessera averages gradients over the
ranks, so the world factor makes the average a sum.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tessera
from tessera import _C, exitcodes
from tessera.errors import NotSupportedError
from tessera.recipes import build, data_sources
from tessera.recipes.config import JobConfig, dump
from tessera.recipes.faults import FaultInjector
from tessera.recipes.schedule import lr_at
from tessera.resilience.straggler import StragglerMonitor
from tessera.shard import waits


class PerRank:
    """Puts `obj.state_dict()` in a checkpoint per rank (rank r restores what rank r saved): the data sampler's
    position, so a resumed job draws exactly the batches an uninterrupted one would have. A load only keeps what
    was saved; apply() restores it, once Job.resume_from has checked that the checkpoint was saved on as many
    ranks (rank r's position in another world's share of the rows would repeat or skip rows)."""

    per_rank = True

    def __init__(self, obj):
        self.obj = obj
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return self.obj.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.loaded = sd

    def apply(self) -> None:
        """Restores the loaded state into obj (nothing when none was loaded)."""
        if self.loaded is not None:
            self.obj.load_state_dict(self.loaded)
            self.loaded = None


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int  # token positions processed (all ranks, all micro-batches)
    label_tokens: int


class Job:
    """The job on this rank; every method that runs the model is collective (every rank calls it in step)."""

    def __init__(self, cfg: JobConfig, *, device: torch.device, mixed_precision, log):
        self.cfg, self.device, self.log = cfg, device, log
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        t = cfg.training
        self.weights_dir = build.model_dir(cfg)
        self.tokenizer = build.load_tokenizer(cfg, self.weights_dir)
        torch.manual_seed(t.seed)  # the same initial weights and LoRA matrices on every rank
        self.model = build.build_model(cfg, self.weights_dir, device=device, group=None,
                                       mixed_precision=mixed_precision)
        self.vocab_size = self.model.config.vocab_size
        self.train_rows, self.eval_rows, self.data_stats = data_sources.build_data(
            cfg, self.tokenizer, self.vocab_size, rank=self.rank)
        from tessera.data import DistributedSampler

        self.sampler = DistributedSampler(len(self.train_rows), world_size=self.world, rank=self.rank,
                                          seed=t.seed)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = tessera.optim.AdamW(trainable, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.faults = FaultInjector.from_knobs(rank=self.rank, checkpoint_dir=cfg.checkpoint_dir)
        if self.faults is not None:
            self._arm_faults()
        # energy_j: joules the job used up to this checkpoint, all attempts (tessera.metrics.energy)
        self.train_state = {"step": 0, "tokens": 0, "energy_j": 0.0}
        self.per_rank = {"sampler": PerRank(self.sampler), "rng": tessera.checkpoint.RNGState()}

    def _arm_faults(self) -> None:
        """Hooks at the moments tessera.recipes.faults names (fault suite only): entering the forward, the middle
        layer's gradient in backward, after the optimizer updated the parameters."""
        f = self.faults
        self.model.register_forward_pre_hook(lambda *_: f.at("forward"))
        layers = getattr(self.model, "layers", None)
        middle = layers[len(layers) // 2] if layers is not None and len(layers) else self.model

        def on_output(_mod, _args, out):
            if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g: f.at("backward"))
        middle.register_forward_hook(on_output)
        self.opt.register_step_post_hook(lambda *_: f.at("optimizer"))

    # ---- one optimizer step --------------------------------------------------------------------------------

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        t0 = time.perf_counter()
        dist.all_reduce(t)
        waits.add(time.perf_counter() - t0)  # see tessera.resilience.straggler
        return t.tolist()

    def _forward_ce_sum(self, batch) -> torch.Tensor:
        logits = self.model(batch.input_ids.to(self.device), doc_ids=batch.doc_ids.to(self.device))
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.to(self.device).flatten(),
                               ignore_index=-100, reduction="sum")

    def train_step(self, step: int) -> StepResult:
        """See [Note: the loss is normalised by label tokens]."""
        t = self.cfg.training
        tessera.set_step(step)  # named in collective timeout messages
        if self.faults is not None:
            self.faults.begin_step(step)
        lr = lr_at(step, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps, min_lr_ratio=t.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr
        batches = [self.train_rows.batch(self.sampler.next_indices(t.batch_size)) for _ in range(t.grad_accum)]
        n_local = sum(b.num_label_tokens for b in batches)
        (n_global,) = self._all_sum([n_local])
        scale = self.world / max(n_global, 1.0)
        ce_local = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.train()
        for i, b in enumerate(batches):
            if t.grad_accum > 1:
                tessera.set_requires_gradient_sync(self.model, i == t.grad_accum - 1)
            ce = self._forward_ce_sum(b)
            (ce * scale).backward()
            ce_local += ce.detach().double()
        max_norm = t.max_grad_norm if t.max_grad_norm > 0 else math.inf
        grad_norm = float(tessera.clip_grad_norm_(self.model, max_norm))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        (ce_sum,) = self._all_sum([float(ce_local)])
        positions = self.world * t.grad_accum * t.batch_size * self.cfg.data.seq_len
        return StepResult(loss=ce_sum / max(n_global, 1.0), grad_norm=grad_norm, tokens=positions,
                          label_tokens=int(n_global))

    # ---- evaluation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean token cross-entropy on the held-out rows (None when there are none). Rows are dealt out to the ranks
        in contiguous blocks of batch_size; a rank with nothing left runs a fully masked batch, so every rank runs
        the same number of forwards (each forward all-gathers). See [Note: batches are read-only]."""
        from tessera.data import IGNORE_INDEX, Batch

        rows = self.eval_rows
        if rows is None or len(rows) == 0:
            return None
        bs = self.cfg.training.batch_size
        per_round = bs * self.world
        rounds = math.ceil(len(rows) / per_round)
        if self.cfg.training.eval_batches:
            rounds = min(rounds, self.cfg.training.eval_batches)
        self.model.eval()
        ce, n = 0.0, 0
        for r in range(rounds):
            start = r * per_round + self.rank * bs
            idx = [i for i in range(start, start + bs) if i < len(rows)]
            batch = rows.batch(idx or [0])
            if not idx:  # new labels, never labels.fill_(): the batch's tensors may share storage
                batch = Batch(batch.input_ids, torch.full_like(batch.labels, IGNORE_INDEX), batch.doc_ids)
            ce += float(self._forward_ce_sum(batch))
            n += batch.num_label_tokens
        self.model.train()
        ce_sum, n_sum = self._all_sum([ce, n])
        return ce_sum / n_sum if n_sum else None

    @torch.no_grad()
    def answer(self) -> str | None:
        """The model's greedy answer to metrics.prompt as a user turn (chat models only; collective)."""
        tok = self.tokenizer
        if not self.cfg.metrics.prompt or tok is None or not getattr(tok, "chat_template", None):
            return None
        from tessera.models.generate import eos_token_ids, generate

        self.model.eval()
        text = generate(self.model, tok, self.cfg.metrics.prompt, chat=True,
                        max_new_tokens=self.cfg.metrics.max_new_tokens,
                        eos_token_id=eos_token_ids(tok, self.weights_dir) or None)
        self.model.train()
        return text.strip()

    # ---- checkpoints and export ----------------------------------------------------------------------------

    def resume_from(self, step: int) -> None:
        """After checkpoint `step` was loaded into checkpoint_state(): checks that it was saved on this job's number
        of ranks, then restores this rank's sampler position. Raises NotSupportedError (on every rank alike: all
        read the same manifest) otherwise, before a step is trained or a file written.
        [Note: resuming on another world size] Each rank's sampler position indexes that rank's share of the rows
        (every world_size-th row of the epoch's order), so positions saved by W ranks mean other rows on W' ranks:
        resuming would repeat some rows and skip others. Until the data order is resharded on load, it is refused."""
        saved = _C.CheckpointReader(self.cfg.checkpoint_dir, step).world_size
        if saved != self.world:
            raise NotSupportedError(
                f"checkpoint step {step} in {self.cfg.checkpoint_dir} was saved by a job on {saved} rank(s), and "
                f"this job has {self.world}: resuming on a different number of ranks is not supported yet (each "
                f"rank's position in the training data would repeat or skip rows). Resume on {saved} rank(s) "
                f"(parallelism.world_size={saved}), or start a new run in another output_dir (or checkpoint.dir)")
        for v in self.per_rank.values():
            if isinstance(v, PerRank):
                v.apply()

    def checkpoint_state(self) -> dict:
        """Everything exact resume needs: weights, AdamW state, step and token counters (the LR is a function of the
        step), each rank's sampler position and RNG states (dropout)."""
        return {"model": self.model, "optim": self.opt, "train": self.train_state, **self.per_rank}

    def export(self) -> list[str]:
        """<output_dir>/hf (merged weights for LoRA, float32, with the tokenizer) and, for LoRA, <output_dir>/adapter
        (peft format). Collective."""
        out = self.cfg.output_dir
        lora = self.cfg.model.lora.rank > 0
        hf_dir = os.path.join(out, "hf")
        tessera.models.save_hf(self.model, hf_dir, merge_adapters=lora, files_from=self.weights_dir)
        if self.weights_dir is None and self.tokenizer is not None and self.rank == 0:
            self.tokenizer.save_pretrained(hf_dir)
        paths = [hf_dir]
        if lora:
            adapter = os.path.join(out, "adapter")
            base = str(self.weights_dir) if self.weights_dir is not None else None
            tessera.peft.save_adapter(self.model, adapter, base_model_name_or_path=base)
            paths.append(adapter)
        return paths


def describe(job: Job) -> str:
    cfg, s = job.cfg, job.data_stats
    t = cfg.training
    n_total = sum(p.numel() for p in job.model.parameters()) * job.world  # shards (padding included) x ranks
    trainable = sum(p.numel() for p in job.opt.param_groups[0]["params"]) * job.world
    src = cfg.model.fetch or cfg.model.hf_dir or f"{cfg.model.config} (random init)"
    lines = [
        f"tessera run: {src}, ~{n_total / 1e6:.1f} M parameters, trainable ~{trainable / 1e6:.2f} M"
        + (f" (LoRA rank {cfg.model.lora.rank}, alpha {cfg.model.lora.alpha:g})" if cfg.model.lora.rank else ""),
        f"  {job.world} rank(s) on {job.device.type}, {cfg.parallelism.strategy}, {t.steps} steps x "
        f"{cfg.tokens_per_step(job.world):,} tokens ({job.world} ranks x {t.grad_accum} micro-batches x "
        f"{t.batch_size} rows x {cfg.data.seq_len} tokens)",
        f"  data {cfg.data.source}: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                                  for k, v in s.items()),
        f"  output {cfg.output_dir}",
    ]
    return "\n".join(lines)


def train(cfg: JobConfig, *, device: torch.device, mixed_precision) -> dict:
    """Runs the job on this rank (collective); returns a summary dict on every rank: steps run, final loss,
    eval_loss before/after, answers before/after, export paths."""
    from tessera.metrics import MetricsWriter, Progress, energy, mfu, peak_memory_bytes

    rank = dist.get_rank()
    meter = energy.rank_meter(device)  # this attempt's energy counts from here
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    res = cfg.resilience
    # See [Note: init and training timeouts] in tessera/shard/comm.py: long until the first step is done.
    tessera.set_timeouts(init_s=res.init_timeout_s, collective_s=res.first_step_timeout_s)
    job = Job(cfg, device=device, mixed_precision=mixed_precision, log=say)
    say(describe(job))
    t = cfg.training
    ckpt = None
    if cfg.checkpoint.every > 0 or os.path.isdir(cfg.checkpoint_dir):
        ckpt = tessera.checkpoint.Checkpointer(cfg.checkpoint_dir, keep_last=cfg.checkpoint.keep_last,
                                               crash_point=job.faults.crash_point() if job.faults else None)
    if job.faults is not None and ckpt is not None and ckpt.committed_steps():
        job.faults.before_load()
    try:
        resumed = ckpt.load_latest(job.checkpoint_state()) if ckpt is not None else None
    except tessera.CheckpointError as e:  # checkpoints exist and none loads: starting again cannot help
        e.exit_status = exitcodes.NO_CHECKPOINT
        raise
    if resumed is not None:
        job.resume_from(resumed)  # before anything is written or trained
    start = job.train_state["step"]
    earlier_j = job.train_state.get("energy_j", 0.0)  # earlier attempts, up to the checkpoint resumed from
    measuring = True  # until the first all-reduce shows that no rank has an energy counter
    summary: dict = {"resumed_from": resumed}
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
            f.write(dump(cfg))
    if resumed is not None:
        say(f"  resumed from checkpoint step {resumed} in {cfg.checkpoint_dir}")
    if start == 0:
        summary["eval_loss_before"] = job.evaluate()
        summary["answer_before"] = job.answer()
        if summary["eval_loss_before"] is not None:
            say(f"  held-out loss before training: {summary['eval_loss_before']:.4f}")
        if summary["answer_before"] is not None:
            say(f"  answer before training: {summary['answer_before']!r}")
    writer = MetricsWriter(cfg.output_dir, tensorboard=cfg.metrics.tensorboard,
                           resume_step=start or None) if rank == 0 else None
    if writer is not None and start == 0 and summary.get("eval_loss_before") is not None:
        writer.log(0, {"eval_loss": summary["eval_loss_before"], "eval_ppl": math.exp(summary["eval_loss_before"])})
    progress = Progress(t.steps, initial_step=start, enabled=rank == 0 and cfg.metrics.progress,
                        log_every=cfg.metrics.log_every)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flops_per_token = job.model.config.flops_per_token(cfg.data.seq_len)
    handle = None
    result = None
    t_last = time.perf_counter()
    stragglers = StragglerMonitor.from_config(cfg.resilience, rank=rank, world=job.world, device=device, say=say)
    for step in range(start + 1, t.steps + 1):
        if stragglers is not None:
            stragglers.begin_step(step)
        result = job.train_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        tps = result.tokens / (now - t_last)
        t_last = now
        if step == start + 1:  # the first step of this attempt is done: steady-state bounds from now on
            _set_collective_timeout(res.collective_timeout_s)
            if job.faults is not None and rank == 0:
                job.faults.mark("first_step")
        found = stragglers.end_step(step) if stragglers is not None else None  # every window steps: all-gathers
        job.train_state["step"] = step
        job.train_state["tokens"] += result.tokens
        m = {"loss": result.loss, "lr": job.opt.param_groups[0]["lr"], "tokens": job.train_state["tokens"],
             "tokens_per_s": tps, "mfu": mfu(flops_per_token, tps, device_name), "grad_norm": result.grad_norm,
             "peak_mem_bytes": peak_memory_bytes(device), "label_tokens": result.label_tokens,
             "time": round(time.time(), 3), **(found or {})}  # time: wall clock (s since the epoch) at the step's end
        if measuring and (joules := energy.job_joules(meter, device)) is not None:  # absent, not 0, unmeasured
            m["energy_j"] = job.train_state["energy_j"] = earlier_j + joules
            m["co2_g"] = energy.co2_grams(m["energy_j"], cfg.metrics.pue, cfg.metrics.grid_gco2_per_kwh)
        else:  # no rank has a counter (the same answer on every rank): no all-reduce per step from now on
            measuring = False
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            m["eval_loss"] = job.evaluate()
            if m["eval_loss"] is not None:
                m["eval_ppl"] = math.exp(m["eval_loss"])
                progress.write(f"step {step}: held-out loss {m['eval_loss']:.4f}")
        if step == t.steps:
            m["eval_loss"] = summary["eval_loss_after"] = job.evaluate()
            if m["eval_loss"] is not None:
                m["eval_ppl"] = math.exp(m["eval_loss"])
        if writer is not None:
            writer.log(step, m)
        progress.update(step, loss=result.loss, lr=m["lr"], tokens_per_s=tps, mfu=m["mfu"],
                        peak_mem_bytes=m["peak_mem_bytes"])
        if handle is not None and handle.done and not handle.waited:
            handle.wait()  # a failed save (a full disk) ends the attempt now, not at the next save
        if ckpt is not None and cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == t.steps):
            if job.faults is not None:
                job.faults.before_save(step)
            handle = ckpt.save(step, job.checkpoint_state())
        t_last = time.perf_counter()  # the time of eval and of starting a save is not training throughput
    progress.close()
    _set_collective_timeout(res.first_step_timeout_s)  # the final eval and export may keep ranks waiting longer
    if handle is not None:
        handle.wait()
    if writer is not None:
        writer.close()
    summary["steps_run"] = t.steps - start
    summary["final_loss"] = result.loss if result is not None else None
    if "eval_loss_after" not in summary and t.steps > start:
        summary["eval_loss_after"] = job.evaluate()
    summary["answer_after"] = job.answer()
    summary["exports"] = job.export() if cfg.checkpoint.export_hf else []
    if rank == 0:
        from tessera.metrics import plot_run

        summary["plots"] = [str(p) for p in plot_run(cfg.output_dir)]
    if measuring and (joules := energy.job_joules(meter, device)) is not None:
        summary["energy_kwh"] = (earlier_j + joules) / energy.JOULES_PER_KWH
        summary["co2_g"] = energy.co2_grams(earlier_j + joules, cfg.metrics.pue, cfg.metrics.grid_gco2_per_kwh)
    _print_summary(say, summary)
    return summary


def _set_collective_timeout(seconds: float) -> None:
    """Bounds tessera's collectives and torch.distributed's own (the loop's all-reduces) by `seconds`."""
    tessera.set_timeouts(collective_s=seconds)
    # torch has no public setter for a live group's timeout; _set_pg_timeout is what its own docs point to.
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=seconds))


def _print_summary(say, s: dict) -> None:
    if s.get("final_loss") is not None:
        say(f"done: {s['steps_run']} steps, final train loss {s['final_loss']:.4f}")
    before, after = s.get("eval_loss_before"), s.get("eval_loss_after")
    if after is not None:
        say(f"  held-out loss: {'%.4f' % before if before is not None else '(not measured: resumed)'} before -> "
            f"{after:.4f} after")
    if s.get("answer_before") is not None:
        say(f"  answer before: {s['answer_before']!r}")
    if s.get("answer_after") is not None:
        say(f"  answer after:  {s['answer_after']!r}")
    for p in s.get("exports", []):
        say(f"  exported: {p}")
    if s.get("plots"):
        say(f"  plots: {', '.join(s['plots'])}")
    if s.get("energy_kwh") is not None:
        say(f"  energy: {s['energy_kwh']:.6g} kWh (all ranks, all attempts), CO2 {s['co2_g']:.4g} g")
    else:
        from tessera.metrics.energy import NOT_MEASURED

        say(f"  {NOT_MEASURED}")
