"""Recipe configs: YAML + key=value overrides into the typed TrainConfig, with clear errors; and the CLI."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tessera.errors import InvalidArgumentError
from tessera.recipes.config import Precision, Strategy, load_config


def test_defaults_yaml_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 7\nstrategy: no_shard\nlr: 1.0e-4\n")
    cfg = load_config(str(recipe), ["steps=9", "precision=bf16"])
    assert (cfg.steps, cfg.strategy, cfg.lr, cfg.precision) == (9, Strategy.no_shard, 1e-4, Precision.bf16)
    assert load_config().world_size == 2
    assert load_config().tokens_per_step == 2 * 8 * 128


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=3"], r"unknown config key\(s\) \['stepz'\]; allowed keys: \[.*'steps'"),
        (["steps=abc"], r"config key 'steps': 'abc' is not a int"),
        (["strategy=zero9"], r"config key 'strategy': 'zero9' is not one of \['full_shard'"),
        (["steps"], r"override 'steps' is not of the form key=value"),
        (["steps=0"], r"config key 'steps' must be > 0"),
        (["dim=100", "n_heads=8"], r"dim \(100\) must divide by n_heads \(8\)"),
    ],
)
def test_bad_config_is_rejected(overrides, message):
    with pytest.raises(InvalidArgumentError, match=message):
        load_config(None, overrides)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(InvalidArgumentError, match="cannot read recipe .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_cli_trains_on_two_cpu_ranks():
    args = ["steps=4", "log_every=2", "n_layers=1", "seq_len=16", "batch_per_rank=2", "dim=64", "ffn_dim=128"]
    out = subprocess.run([sys.executable, "-m", "tessera", "run", *args], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [l for l in out.stdout.splitlines() if l.startswith("step ")]
    assert len(lines) == 2, out.stdout
    losses = [float(re.search(r"loss (\S+)", l).group(1)) for l in lines]
    assert all(0 < l < 10 for l in losses)
    assert "2 ranks" in out.stdout and "tokens/s" in lines[-1]


def test_cli_reports_bad_key():
    out = subprocess.run([sys.executable, "-m", "tessera", "run", "bogus=1"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "unknown config key(s) ['bogus']" in out.stderr


def test_cli_checkpoints_and_resumes(tmp_path):
    base = ["log_every=1", "n_layers=1", "seq_len=16", "batch_per_rank=2", "dim=64", "ffn_dim=128",
            f"checkpoint_dir={tmp_path / 'ckpt'}", "checkpoint_every=2"]
    first = subprocess.run([sys.executable, "-m", "tessera", "run", *base, "steps=4"], capture_output=True,
                           text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "starting fresh" in first.stdout and "checkpoint step 4:" in first.stdout
    again = subprocess.run([sys.executable, "-m", "tessera", "run", *base, "steps=6"], capture_output=True,
                           text=True, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from checkpoint step 4" in again.stdout
    steps = [int(re.search(r"step\s+(\d+)/", l).group(1)) for l in again.stdout.splitlines() if l.startswith("step ")]
    assert steps == [5, 6], again.stdout
