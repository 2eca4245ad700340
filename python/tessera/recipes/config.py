"""The typed config of a training job. YAML recipes and `key=value` overrides load into it; unknown keys and bad
values are rejected with a message naming the key and what is allowed."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import yaml

from tessera.errors import InvalidArgumentError


class Strategy(enum.Enum):
    full_shard = "full_shard"
    shard_grad_op = "shard_grad_op"
    no_shard = "no_shard"


class Precision(enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 compute, fp32 master weights and gradient reduction


@dataclass(kw_only=True)
class TrainConfig:
    # Model: a Llama-like decoder (tessera.models.llama). The default is the embedded demo model:
    # 256 vocab (bytes) x 256 dim x 4 layers = 2.4 M parameters.
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    ffn_dim: int = 688
    # Data: synthetic "repeat the pattern" sequences (learnable, so the loss visibly falls).
    seq_len: int = 128
    batch_per_rank: int = 8
    # Run: 2 ranks x 8 sequences x 128 tokens = 2,048 tokens per step.
    world_size: int = 2
    steps: int = 60
    lr: float = 3e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    strategy: Strategy = Strategy.full_shard
    precision: Precision = Precision.fp32
    seed: int = 0
    log_every: int = 10
    # Checkpointing: empty dir = off. With a dir, the job resumes from the newest valid checkpoint there.
    checkpoint_dir: str = ""
    checkpoint_every: int = 20
    keep_last: int = 3

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "seq_len",
                     "batch_per_rank", "world_size", "steps", "lr", "log_every", "checkpoint_every"):
            if not getattr(self, name) > 0:
                raise InvalidArgumentError(f"config key '{name}' must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise InvalidArgumentError("config: weight_decay must be >= 0 and max_grad_norm > 0")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise InvalidArgumentError(
                f"config: dim ({self.dim}) must divide by n_heads ({self.n_heads}), and n_heads by n_kv_heads "
                f"({self.n_kv_heads})"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.world_size * self.batch_per_rank * self.seq_len


def _coerce(field: dataclasses.Field, raw):
    kind = field.type
    name = field.name
    try:
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "str":
            return "" if raw is None else str(raw)
        if kind in ("Strategy", "Precision"):
            enum_cls = Strategy if kind == "Strategy" else Precision
            return enum_cls(str(raw).lower())
    except ValueError:
        allowed = {"Strategy": [s.value for s in Strategy], "Precision": [p.value for p in Precision]}.get(kind)
        expected = f"one of {allowed}" if allowed else f"a {kind}"
        raise InvalidArgumentError(f"config key '{name}': {raw!r} is not {expected}") from None
    return raw


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults < YAML file < `key=value` overrides."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise InvalidArgumentError(f"cannot read recipe {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise InvalidArgumentError(f"recipe {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"recipe {path} must be a mapping of keys to values")
        values.update(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise InvalidArgumentError(f"override {item!r} is not of the form key=value")
        values[key.strip()] = yaml.safe_load(raw)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise InvalidArgumentError(f"unknown config key(s) {unknown}; allowed keys: {sorted(fields)}")
    return TrainConfig(**{k: _coerce(fields[k], v) for k, v in values.items()})
