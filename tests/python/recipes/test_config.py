"""Job configs: nested sections from YAML + dotted key=value overrides, clear errors for unknown keys and bad values;
every recipe in recipes/ is valid; `tessera config` prints the resolved YAML; the LR schedule."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tessera.errors import InvalidArgumentError
from tessera.recipes.config import dump, load_config
from tessera.recipes.schedule import lr_at

RECIPES = sorted((Path(__file__).resolve().parents[3] / "recipes").glob("*.yaml"))


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output_dir: out\nmodel: {fetch: smollm2-135m-instruct, lora: {rank: 8}}\n"
                      "training: {steps: 7, lr: 1.0e-4}\nparallelism: {strategy: no_shard}\n")
    cfg = load_config(str(recipe), ["training.steps=9", "training.precision=BF16", "model.lora.alpha=4",
                                    "model.lora.targets=[wq, w2]", "checkpoint.every=3"])
    assert (cfg.training.steps, cfg.training.lr, cfg.training.precision) == (9, 1e-4, "bf16")
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets) == (8, 4.0, ["wq", "w2"])
    assert cfg.parallelism.strategy == "no_shard" and cfg.checkpoint.every == 3
    assert cfg.checkpoint_dir == "out/checkpoints"  # the default: under output_dir
    assert cfg.tokens_per_step(2) == 2 * 1 * 4 * 256
    # The dump is a complete recipe: loading it gives the same config.
    again = tmp_path / "again.yaml"
    again.write_text(dump(cfg))
    assert load_config(str(again)) == cfg


def test_override_switches_the_weight_source():
    cfg = load_config(str(RECIPES[0].parent / "smollm2_135m_lora_sft.yaml"),
                      ["model.config=llama3.1-8b", "model.overrides={dim: 64, n_layers: 2}"])
    assert (cfg.model.fetch, cfg.model.config, cfg.model.overrides) == ("", "llama3.1-8b", {"dim": 64, "n_layers": 2})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=3"], r"unknown config key\(s\) \['stepz'\] at the top level; allowed: \['checkpoint', 'data',"),
        (["training.stepz=3"], r"unknown config key\(s\) \['training.stepz'\] in section 'training'; allowed: "
                               r"\[.*'steps'"),
        (["training.steps=abc"], r"config key 'training.steps': 'abc' is not a int"),
        (["training.steps=2.5"], r"config key 'training.steps': 2.5 is not a int"),
        (["parallelism.strategy=zero9"], r"config key 'parallelism.strategy': 'zero9' is not one of \['full_shard'"),
        (["training.steps"], r"override 'training.steps' is not of the form key=value"),
        (["training.steps=0"], r"config key 'training.steps' must be > 0, got 0"),
        (["training.lr=-1"], r"config key 'training.lr' must be >= 0"),
        (["data.eval_fraction=1"], r"'data.eval_fraction' must be in \[0, 1\)"),
        (["training=3"], r"config key 'training' is a section; expected a mapping"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(InvalidArgumentError, match=message):
        load_config(None, ["model.fetch=smollm2-135m-instruct"] + overrides)


def test_two_weight_sources_in_one_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {fetch: smollm2-135m-instruct, hf_dir: /x}\n")
    with pytest.raises(InvalidArgumentError, match=r"give exactly one of model.fetch .* got \['fetch', 'hf_dir'\]"):
        load_config(str(recipe))


def test_no_weight_source_and_overrides_without_config():
    with pytest.raises(InvalidArgumentError, match="give exactly one of model.fetch"):
        load_config(None, [])
    with pytest.raises(InvalidArgumentError, match="'model.overrides' changes a random-init model's shape"):
        load_config(None, ["model.fetch=x", "model.overrides={dim: 8}"])


def test_missing_or_bad_recipe_file(tmp_path):
    with pytest.raises(InvalidArgumentError, match="cannot read recipe .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(InvalidArgumentError, match="is not valid YAML"):
        load_config(str(bad))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_is_valid(recipe):
    cfg = load_config(str(recipe))
    text = recipe.read_text()
    assert "tokens per step" in text and "memory per" in text, f"{recipe.name} must show its arithmetic"
    # The arithmetic in the header agrees with the config.
    world = cfg.parallelism.world_size or 2
    assert f"{cfg.tokens_per_step(world):,}" in text, (recipe.name, cfg.tokens_per_step(world))


def test_cli_config_prints_yaml():
    out = subprocess.run([sys.executable, "-m", "tessera", "config", str(RECIPES[0].parent / "tiny_llama_demo.yaml"),
                          "training.steps=3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["training"]["steps"] == 3 and printed["model"]["config"] == "tiny"


def test_cli_reports_bad_key():
    out = subprocess.run([sys.executable, "-m", "tessera", "run", "bogus=1"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "unknown config key(s) ['bogus']" in out.stderr


def test_lr_schedule_matches_transformers():
    """Warmup + cosine against transformers' get_cosine_schedule_with_warmup (floor 0), and the floor."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=50)
    for k in range(0, 51):  # after k scheduler steps, transformers' lr is lambda(k) x lr
        ours = lr_at(k, lr=3e-4, warmup_steps=5, total_steps=50, min_lr_ratio=0.0)
        assert math.isclose(ours, opt.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15), k
        opt.step()
        sched.step()
    assert lr_at(50, lr=1.0, warmup_steps=5, total_steps=50, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(5, lr=1.0, warmup_steps=5, total_steps=50, min_lr_ratio=0.1) == 1.0
