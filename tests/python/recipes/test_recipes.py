"""Every recipe in recipes/ runs: 2 training steps on 2 CPU ranks with its model's dimensions overridden to tiny
ones (same family, vocabulary and tokenizer; LoRA, activation checkpointing and the data settings as the recipe has
them), then evaluation, the before/after answer and the export. The real-size runs need GPUs and the user's model
directories; their arithmetic is checked in test_config.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import run_ranks

REPO = Path(__file__).resolve().parents[3]
TINY = "{dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 128}"

# recipe -> (the named size of its model family, the tokenizer to use in place of the user's model directory)
RECIPES = {
    "tiny_llama_demo": (None, None),
    "smollm2_135m_lora_sft": ("smollm2-135m", "smollm2-135m-instruct"),
    "smollm2_135m_full_sft": ("smollm2-135m", "smollm2-135m-instruct"),
    "llama3_2_1b_full_sft": ("llama3.2-1b", "llama3-tokenizer"),
    "llama3_1_8b_lora_sft": ("llama3.1-8b", "llama3-tokenizer"),
    "llama3_1_70b_lora_sft": ("llama3.1-70b", "llama3-tokenizer"),
    "mistral_7b_lora_sft": ("mistral-7b-v0.3", "mistral-v1-tokenizer"),
}


def test_every_recipe_is_covered():
    assert sorted(RECIPES) == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def _train(rank, world, cfg, out_file):
    from tessera.recipes.loop import train

    summary = train(cfg, device=torch.device("cpu"), mixed_precision=None)
    if rank == 0:
        torch.save(summary, out_file)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_runs_with_tiny_dimensions(name, tmp_path):
    from tessera.recipes.config import load_config

    size, tokenizer = RECIPES[name]
    overrides = ["parallelism.device=cpu", "parallelism.world_size=2", "training.steps=2", "training.batch_size=1",
                 "training.grad_accum=1", "training.eval_every=1", "training.eval_batches=1", "data.seq_len=64",
                 "checkpoint.every=1", "metrics.max_new_tokens=3", "metrics.progress=false",
                 "metrics.tensorboard=false", f"output_dir={tmp_path / 'out'}"]
    if size is not None:
        overrides += [f"model.config={size}", f"model.overrides={TINY}", f"data.tokenizer={tokenizer}",
                      "data.max_conversations=200"]
    cfg = load_config(str(REPO / "recipes" / f"{name}.yaml"), overrides)
    recipe = load_config(str(REPO / "recipes" / f"{name}.yaml"))
    # What the recipe decides is kept: LoRA, activation checkpointing, the data source and labels.
    assert (cfg.model.lora, cfg.model.activation_checkpointing, cfg.data.source, cfg.data.train_on) == (
        recipe.model.lora, recipe.model.activation_checkpointing, recipe.data.source, recipe.data.train_on)
    out = tmp_path / "summary.pt"
    run_ranks(2, _train, cfg, str(out))
    s = torch.load(out)
    assert s["steps_run"] == 2 and s["final_loss"] > 0
    assert s["eval_loss_before"] is not None and s["eval_loss_after"] is not None
    out_dir = tmp_path / "out"
    assert (out_dir / "metrics.jsonl").is_file() and (out_dir / "plots" / "loss.png").is_file()
    if cfg.checkpoint.export_hf:
        # transformers loads the export with no missing or unexpected weights; peft reads the adapter's config.
        import transformers

        _, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir / "hf", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert (out_dir / "adapter").is_dir() == (cfg.model.lora.rank > 0)
        if cfg.model.lora.rank:
            import peft

            assert peft.PeftConfig.from_pretrained(out_dir / "adapter").r == cfg.model.lora.rank
    if tokenizer is not None:
        assert isinstance(s["answer_before"], str) and isinstance(s["answer_after"], str)


def test_plain_text_source_trains_from_a_token_file(tmp_path):
    """Continued pretraining: data.source=text:FILE is tokenized once into a memory-mapped token file under
    <output_dir>/data/, read by offset; a second run reuses it."""
    from tessera.recipes.config import load_config

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Paragraph {i}. " + "The quick brown fox jumps over the lazy dog. " * (3 + i % 4)
                                for i in range(40)))
    cfg = load_config(str(REPO / "recipes" / "tiny_llama_demo.yaml"), [
        f"data.source=text:{text}", "model.config=smollm2-135m", f"model.overrides={TINY}",
        "data.tokenizer=smollm2-135m-instruct", "data.seq_len=64", "training.steps=2", "training.batch_size=2",
        "training.eval_every=0", "metrics.progress=false", "metrics.tensorboard=false", "metrics.prompt=",
        f"output_dir={tmp_path / 'out'}"])
    out = tmp_path / "summary.pt"
    run_ranks(2, _train, cfg, str(out))
    s = torch.load(out)
    assert s["steps_run"] == 2 and s["eval_loss_after"] is not None
    token_files = list((tmp_path / "out" / "data").glob("tokens*"))
    assert token_files, list((tmp_path / "out").rglob("*"))
