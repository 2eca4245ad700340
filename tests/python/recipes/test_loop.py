"""The training loop behind `tessera run`, against independent references:
- token-normalised gradient accumulation on 2 ranks equals one-process training on the concatenated batch
  (plain torch model, torch AdamW, torch clipping, the loss summed over tokens / label tokens);
- activation checkpointing changes nothing but memory;
- (a rank killed with SIGKILL and the job resuming bit-identical: test_launch.py; kills at each point of a save:
  tests/python/checkpoint/test_faults.py)
- the demo recipe trains through the CLI and writes metrics.jsonl, TensorBoard events and plots;
- the demo recipe on 3 ranks, where one rank has no held-out rows left: the held-out loss equals a float64
  one-process evaluation; resuming its checkpoint on another number of ranks is refused before anything happens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_ranks

REPO = Path(__file__).resolve().parents[3]
TINY_SMOL = ("model.config=smollm2-135m",
             "model.overrides={dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 128}")


def _chats(path: Path) -> Path:
    """A JSONL file of conversations of very different lengths (so micro-batches hold different label counts)."""
    rows = []
    for i in range(24):
        turns = []
        for j in range(1 + i % 3):
            turns.append({"role": "user", "content": f"Question {i}.{j}: what is {i} plus {j}?"})
            turns.append({"role": "assistant", "content": ("The answer is " + str(i + j) + ". ") * (1 + (i * 7) % 5)})
        rows.append(json.dumps({"messages": turns}))
    path.write_text("\n".join(rows) + "\n")
    return path


def _config(tmp: Path, tokenizer_dir: Path, *extra: str):
    from tessera.recipes.config import load_config

    return load_config(None, [*TINY_SMOL, f"data.tokenizer={tokenizer_dir}", f"data.source={_chats(tmp / 'c.jsonl')}",
                              "data.seq_len=48", "data.eval_fraction=0.1", "training.batch_size=2",
                              "training.grad_accum=2", "training.steps=3", "training.lr=1e-3",
                              "training.warmup_steps=1", "training.weight_decay=0.1", "training.max_grad_norm=0.5",
                              "checkpoint.every=0", "checkpoint.export_hf=false", "metrics.progress=false",
                              "metrics.tensorboard=false", f"output_dir={tmp / 'out'}", *extra])


def _train_ranks(rank, world, cfg, out_file):
    from tessera.recipes.loop import Job

    job = Job(cfg, device=torch.device("cpu"), mixed_precision=None, log=lambda m: None)
    losses = [job.train_step(s).loss for s in range(1, cfg.training.steps + 1)]
    full = {k: v.clone() for k, v in __import__("tessera").full_state_dict(job.model).items()}
    if rank == 0:
        torch.save({"params": full, "losses": losses}, out_file)


def _reference(cfg, tokenizer_dir, world):
    """One process, plain torch: each step's rows (all ranks, all micro-batches) as one batch, the mean over its
    label tokens, torch clipping and torch AdamW with the schedule's LR."""
    import transformers

    import tessera
    from tessera.data import DistributedSampler, build_sft, load_conversations
    from tessera.recipes.build import init_weights, random_init_config
    from tessera.recipes.schedule import lr_at

    t = cfg.training
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    rows, _, _ = build_sft(load_conversations(cfg.data.source), tok, seq_len=cfg.data.seq_len,
                           train_on=cfg.data.train_on, eval_fraction=cfg.data.eval_fraction, seed=t.seed)
    samplers = [DistributedSampler(len(rows), world_size=world, rank=r, seed=t.seed) for r in range(world)]
    torch.manual_seed(t.seed)
    model = tessera.models.build(random_init_config(cfg))
    init_weights(model)
    model = model.double()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    losses, counts = [], []
    for step in range(1, t.steps + 1):
        micro = [s.next_indices(t.batch_size) for s in samplers for _ in range(t.grad_accum)]
        counts += [rows.batch(m).num_label_tokens for m in micro]
        b = rows.batch([i for m in micro for i in m])
        logits = model(b.input_ids, doc_ids=b.doc_ids)
        loss = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), ignore_index=-100)  # mean over labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, lr=t.lr, warmup_steps=t.warmup_steps, total_steps=t.steps,
                            min_lr_ratio=t.min_lr_ratio)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.state_dict(), losses, counts


def test_accumulation_on_two_ranks_equals_one_process(tmp_path, smollm2_dir):
    cfg = _config(tmp_path, smollm2_dir)
    out = tmp_path / "res.pt"
    run_ranks(2, _train_ranks, cfg, str(out))
    got = torch.load(out)
    ref_params, ref_losses, counts = _reference(cfg, smollm2_dir, world=2)
    # The micro-batches hold different numbers of label tokens, so a mean of per-micro-batch means (or of per-rank
    # means) would not give these values: the test tells the two normalisations apart.
    assert len(set(counts)) > 1, counts
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-5)
    # Tolerance 2% of one step's LR: where a gradient is near AdamW's eps, float32 rounding moves m/sqrt(v) visibly.
    for name, ref in ref_params.items():
        torch.testing.assert_close(got["params"][name].double(), ref, atol=2e-5, rtol=1e-4, msg=name)


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path, smollm2_dir):
    results = []
    for ac in ("false", "true"):
        cfg = _config(tmp_path, smollm2_dir, f"model.activation_checkpointing={ac}", "training.grad_accum=1")
        out = tmp_path / f"ac_{ac}.pt"
        run_ranks(2, _train_ranks, cfg, str(out))
        results.append(torch.load(out))
    assert results[0]["losses"] == results[1]["losses"]
    for k, v in results[0]["params"].items():
        assert torch.equal(v, results[1]["params"][k]), k


def _run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tessera", "run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def _metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


DEMO = [str(REPO / "recipes" / "tiny_llama_demo.yaml"), "data.seq_len=32", "training.batch_size=2",
        "training.eval_every=0", "metrics.log_every=1"]


def test_demo_recipe_through_the_cli(tmp_path):
    out = tmp_path / "demo"
    res = _run_cli(*DEMO, "training.steps=12", "training.eval_every=6", f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 rank(s) on cpu" in res.stdout
    rows = _metrics(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("loss", "lr", "tokens", "tokens_per_s", "mfu", "grad_norm", "peak_mem_bytes"):
        assert key in steps[0], key
    assert steps[0]["mfu"] is None  # no known peak on a CPU
    assert steps[-1]["tokens"] == 12 * 2 * 2 * 32
    assert steps[-1]["loss"] < steps[0]["loss"]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    assert [r["step"] for r in evals] == [0, 6, 12]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "config.yaml").is_file()


# The shipped demo recipe at 3 ranks, made tiny. Its 64 held-out rows in blocks of batch_size 8 per rank: rounds of
# 24 rows, and in the third round rank 2 has none left (it runs a fully masked 1-row batch).
DEMO_3 = ["model.overrides={dim: 32, n_layers: 1, n_heads: 2, n_kv_heads: 1, ffn_dim: 64, vocab_size: 256}",
          "data.seq_len=16", "training.batch_size=8", "training.steps=1", "training.eval_every=0",
          "checkpoint.every=1", "checkpoint.export_hf=false", "metrics.progress=false", "metrics.tensorboard=false"]


def _demo_config(out: Path, *extra: str):
    from tessera.recipes.config import load_config

    return load_config(str(REPO / "recipes" / "tiny_llama_demo.yaml"), [*DEMO_3, f"output_dir={out}", *extra])


def _train_job(rank, world, cfg, out_file):
    from tessera.recipes.loop import train

    try:
        summary = train(cfg, device=torch.device("cpu"), mixed_precision=None)
        result = {"eval_loss_before": summary.get("eval_loss_before")}  # absent when resumed
    except Exception as e:  # noqa: BLE001 -- reported per rank: each rank must fail the same clear way
        result = {"error": f"{type(e).__name__}: {e}"}
    torch.save(result, f"{out_file}.{rank}")


@pytest.fixture(scope="module")
def demo_on_three_ranks(tmp_path_factory):
    """(output_dir, per-rank results) of the demo recipe trained for one step on 3 ranks, checkpoint at step 1."""
    out = tmp_path_factory.mktemp("demo3") / "run"
    res = out.parent / "res"
    run_ranks(3, _train_job, _demo_config(out), str(res))
    return out, [torch.load(f"{res}.{r}") for r in range(3)]


def _float64_eval_loss(cfg) -> tuple[float, int]:
    """Mean token cross-entropy of the job's initial model on all its held-out rows, in one process, float64; and
    the number of rows."""
    import tessera
    from tessera.recipes.build import init_weights, random_init_config
    from tessera.recipes.data_sources import build_data

    torch.manual_seed(cfg.training.seed)
    model = tessera.models.build(random_init_config(cfg))
    init_weights(model)
    model = model.double()
    rows = build_data(cfg, None, model.config.vocab_size, rank=0)[1]  # the same rows at any world size
    b = rows.batch(list(range(len(rows))))
    with torch.no_grad():
        logits = model(b.input_ids, doc_ids=b.doc_ids)
    return F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), ignore_index=-100).item(), len(rows)


def test_eval_on_three_ranks_one_without_rows_equals_float64(demo_on_three_ranks, single_rank_group):
    # Before the fix: 1-row synthetic batches had input_ids and labels as views of one storage, and the masked
    # batch's labels.fill_(-100) wrote -100 into rank 2's inputs: IndexError in the embedding, failed collectives.
    out, results = demo_on_three_ranks
    assert all("error" not in r for r in results), results
    cfg = _demo_config(out)
    ref, n_rows = _float64_eval_loss(cfg)
    bs = cfg.training.batch_size
    last_round = (n_rows - 1) // (3 * bs) * 3 * bs
    assert last_round + 2 * bs >= n_rows  # rank 2 has no rows left in the last round (64 rows: 48 + 16)
    for r in results:
        assert r["eval_loss_before"] == pytest.approx(ref, rel=1e-5)


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(root.rglob("*"))}


def test_resume_on_another_world_size_is_refused_before_training(demo_on_three_ranks):
    # Each rank's sampler position counts rows of that rank's share: on 2 ranks it would repeat and skip rows.
    # Before the fix the job resumed (and trained step 2) without a word.
    out, _ = demo_on_three_ranks
    before = _snapshot(out)
    res = out.parent / "resume"
    run_ranks(2, _train_job, _demo_config(out, "training.steps=2", "parallelism.world_size=2"), str(res))
    for r in range(2):
        err = torch.load(f"{res}.{r}").get("error", "")
        assert err.startswith("NotSupportedError: checkpoint step 1 in "), err
        assert "saved by a job on 3 rank(s), and this job has 2" in err, err
        assert "Resume on 3 rank(s) (parallelism.world_size=3), or start a new run in another output_dir" in err
    assert _snapshot(out) == before  # nothing written: no step, no metrics, no config.yaml, no checkpoint
