"""The typed config of a training job (`tessera run`): nested sections loaded from YAML, then dotted `key=value`
overrides (`training.lr=1e-4`, `model.lora.rank=16`). Unknown keys and bad values are rejected with a message that
names the key and lists what is allowed.

    output_dir: runs/x               # metrics.jsonl, tensorboard/, plots/, checkpoints/, hf/ (export), adapter/
    model:       where the weights come from (a `tessera fetch` name, an HF directory, or a named size at random
                 init), LoRA, activation checkpointing
    data:        conversations (chat SFT), plain text (continued pretraining) or the synthetic demo; seq_len, split
    parallelism: device (auto: CUDA + NCCL + bf16 if there is a GPU, else CPU + gloo + fp32), ranks, strategy
    training:    steps, batch, gradient accumulation, AdamW, warmup + cosine LR, clipping, eval cadence, seed
    checkpoint:  where, how often, how many kept; resume is automatic
    metrics:     progress bar, metrics.jsonl + TensorBoard, the prompt answered before and after training, energy/CO2
    resilience:  init and collective timeouts, heartbeats, straggler detection

Names that scripts and docs rely on: output_dir, training.steps, training.lr, checkpoint.dir, checkpoint.every,
checkpoint.keep_last.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

import yaml

from tessera.errors import InvalidArgumentError


def _choice(default: str, *allowed: str):
    return field(default=default, metadata={"choices": (default, *allowed)})


@dataclass(kw_only=True)
class LoRASection:
    rank: int = 0  # 0: full fine-tuning (no adapters)
    alpha: float = 16.0
    dropout: float = 0.0
    # tessera's linear names: wq wk wv wo (attention), w1 (gate) w3 (up) w2 (down) (MLP)
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])


@dataclass(kw_only=True)
class ModelSection:
    # Exactly one source of weights: `fetch` (a `tessera fetch` name, e.g. smollm2-135m-instruct), `hf_dir` (a Hugging
    # Face directory: config.json + *.safetensors + tokenizer), or `config` (a named size of tessera.models, e.g.
    # llama3.1-8b or tiny, at random init, with `overrides` of its fields: tests and demos).
    fetch: str = ""
    hf_dir: str = ""
    config: str = ""
    overrides: dict = field(default_factory=dict)
    lora: LoRASection = field(default_factory=LoRASection)
    activation_checkpointing: bool = False


@dataclass(kw_only=True)
class DataSection:
    # chatterbot-corpus | chitchat-dataset | a .jsonl file of {"messages": [...]} (chat SFT); text:PATH[,PATH] (plain
    # text, continued pretraining); synthetic (the repeat-the-pattern demo, no tokenizer).
    source: str = "chatterbot-corpus"
    seq_len: int = 256  # tokens per row; documents are packed into rows and never attend across each other
    train_on: str = _choice("assistant", "all")  # chat SFT: loss on the assistant turns only, or on every token
    eval_fraction: float = 0.05  # held-out conversations/documents, split before packing
    max_conversations: int = 0  # 0: all
    tokenizer: str = ""  # an HF directory or a `tessera fetch` tokenizer name; default: the model's directory


@dataclass(kw_only=True)
class ParallelismSection:
    device: str = _choice("auto", "cpu", "cuda")
    world_size: int = 0  # ranks this command starts; 0: 2 CPU processes, or every visible GPU. Under torchrun: its
    strategy: str = _choice("full_shard", "shard_grad_op", "no_shard")


@dataclass(kw_only=True)
class TrainingSection:
    steps: int = 100
    batch_size: int = 4  # sequences per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = _choice("auto", "fp32", "bf16")  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    eval_every: int = 50  # steps; 0: only before and after training
    eval_batches: int = 0  # 0: the whole held-out split


@dataclass(kw_only=True)
class CheckpointSection:
    dir: str = ""  # default: <output_dir>/checkpoints; the job resumes from the newest valid checkpoint there
    every: int = 50  # steps; 0: never
    keep_last: int = 2
    export_hf: bool = True  # at the end: <output_dir>/hf (merged for LoRA) and <output_dir>/adapter (LoRA)


@dataclass(kw_only=True)
class MetricsSection:
    log_every: int = 10  # steps between progress lines when the output is not a terminal
    progress: bool = True
    tensorboard: bool = True
    prompt: str = "What is the capital of France?"  # chat models answer it before and after training; "" = skip
    max_new_tokens: int = 40
    # Energy and CO2 (tessera.metrics.energy): CO2 grams = kWh x pue x grid_gco2_per_kwh. The energy is what the
    # counters measure (NVML's total-energy counter per GPU, RAPL powercap per CPU package where readable).
    pue: float = 1.0  # data-centre power usage effectiveness; 1.0 counts the measured devices only
    grid_gco2_per_kwh: float = 475.0  # g CO2 per kWh; 475: the world average the IEA reported for 2018


@dataclass(kw_only=True)
class ResilienceSection:
    # How long every rank may take to join the process group (and NCCL communicator); a rank that never comes up
    # fails the job after this, not after a training timeout sized for steady state.
    init_timeout_s: float = 600.0
    # The bound on every collective until the first step finished (allocation, warm-up, a checkpoint load) ...
    first_step_timeout_s: float = 600.0
    # ... and after it: a few times the step time, so a hung peer ends the job in that time, not in ten minutes.
    collective_timeout_s: float = 300.0
    # Each rank's heartbeat through the c10d store: a rank not heard from for heartbeat_timeout_s (stopped, frozen
    # host) is reported by the others, which then exit with status 75 (restartable). 0: no heartbeats.
    heartbeat_interval_s: float = 2.0
    heartbeat_timeout_s: float = 30.0
    # A rank whose compute time per step (step time less its waits in collectives), averaged over straggler_window
    # steps, exceeds straggler_factor x the median rank's is logged as a straggler. window 0: off.
    straggler_factor: float = 1.5
    straggler_window: int = 10


@dataclass(kw_only=True)
class JobConfig:
    output_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    resilience: ResilienceSection = field(default_factory=ResilienceSection)

    def __post_init__(self):
        validate(self)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.output_dir.rstrip('/')}/checkpoints"

    def tokens_per_step(self, world_size: int) -> int:  # noqa: D102
        """Token positions per optimizer step: ranks x grad_accum x batch_size x seq_len."""
        t = self.training
        return world_size * t.grad_accum * t.batch_size * self.data.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def validate(cfg: JobConfig) -> None:
    """Cross-field and range checks; InvalidArgumentError naming the key."""
    t, d, m = cfg.training, cfg.data, cfg.model
    positive = {"training.steps": t.steps, "training.batch_size": t.batch_size, "training.grad_accum": t.grad_accum,
                "data.seq_len": d.seq_len, "metrics.log_every": cfg.metrics.log_every}
    for key, value in positive.items():
        if value <= 0:
            raise InvalidArgumentError(f"config key '{key}' must be > 0, got {value}")
    non_negative = {"training.lr": t.lr, "training.warmup_steps": t.warmup_steps,
                    "training.weight_decay": t.weight_decay, "training.max_grad_norm": t.max_grad_norm,
                    "training.eval_every": t.eval_every, "training.eval_batches": t.eval_batches,
                    "checkpoint.every": cfg.checkpoint.every, "checkpoint.keep_last": cfg.checkpoint.keep_last,
                    "data.max_conversations": d.max_conversations,
                    "parallelism.world_size": cfg.parallelism.world_size, "model.lora.rank": m.lora.rank,
                    "metrics.max_new_tokens": cfg.metrics.max_new_tokens}
    for key, value in non_negative.items():
        if value < 0:
            raise InvalidArgumentError(f"config key '{key}' must be >= 0, got {value}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise InvalidArgumentError(f"config key 'training.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio}")
    if not 0.0 <= d.eval_fraction < 1.0:
        raise InvalidArgumentError(f"config key 'data.eval_fraction' must be in [0, 1), got {d.eval_fraction}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise InvalidArgumentError(f"config key 'training.betas' must be two numbers in [0, 1), got {t.betas}")
    if not 0.0 <= m.lora.dropout < 1.0:
        raise InvalidArgumentError(f"config key 'model.lora.dropout' must be in [0, 1), got {m.lora.dropout}")
    sources = [k for k in ("fetch", "hf_dir", "config") if getattr(m, k)]
    if len(sources) != 1:
        raise InvalidArgumentError(
            "config: give exactly one of model.fetch (a `tessera fetch` name), model.hf_dir (a Hugging Face "
            f"directory) or model.config (a named size at random init); got {sources or 'none'}")
    if m.overrides and not m.config:
        raise InvalidArgumentError("config key 'model.overrides' changes a random-init model's shape; it needs "
                                   "model.config (pretrained weights fix the shape)")
    r = cfg.resilience
    for key in ("init_timeout_s", "first_step_timeout_s", "collective_timeout_s", "heartbeat_interval_s"):
        if getattr(r, key) <= 0:
            raise InvalidArgumentError(f"config key 'resilience.{key}' must be > 0 seconds, got {getattr(r, key)}")
    if r.heartbeat_timeout_s and r.heartbeat_timeout_s < 2 * r.heartbeat_interval_s:
        raise InvalidArgumentError(
            f"config key 'resilience.heartbeat_timeout_s' must be 0 (off) or at least twice "
            f"resilience.heartbeat_interval_s ({r.heartbeat_interval_s} s), got {r.heartbeat_timeout_s}")
    if r.heartbeat_timeout_s < 0 or r.straggler_window < 0:
        raise InvalidArgumentError("config keys 'resilience.heartbeat_timeout_s' and 'resilience.straggler_window' "
                                   f"must be >= 0, got {r.heartbeat_timeout_s} and {r.straggler_window}")
    if r.straggler_factor <= 1.0:
        raise InvalidArgumentError(f"config key 'resilience.straggler_factor' must be > 1, got {r.straggler_factor}")
    if cfg.metrics.pue < 1.0 or cfg.metrics.grid_gco2_per_kwh < 0:
        raise InvalidArgumentError(f"config keys 'metrics.pue' (>= 1) and 'metrics.grid_gco2_per_kwh' (>= 0): got "
                                   f"{cfg.metrics.pue} and {cfg.metrics.grid_gco2_per_kwh}")
    if not cfg.output_dir:
        raise InvalidArgumentError("config key 'output_dir' must not be empty")


# ---- loading -------------------------------------------------------------------------------------------------------

def _sections(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _coerce(key: str, tp, f: dataclasses.Field, raw):
    """raw (a YAML value) as type tp, or InvalidArgumentError naming `key`."""
    choices = f.metadata.get("choices")
    if choices is not None:
        value = str(raw).lower() if raw is not None else ""
        if value not in choices:
            raise InvalidArgumentError(f"config key '{key}': {raw!r} is not one of {list(choices)}")
        return value
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("true", "1", "yes", "on"):
                return True
            if str(raw).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if tp is float:
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if tp is str:
            return "" if raw is None else str(raw)
        if origin is list:
            (item,) = typing.get_args(tp)
            if isinstance(raw, str):
                raw = [s for s in raw.split(",") if s]
            if not isinstance(raw, (list, tuple)):
                raise ValueError
            return [_coerce(f"{key}[{i}]", item, dataclasses.field(), v) for i, v in enumerate(raw)]
        if tp is dict or origin is dict:
            if raw is None:
                return {}
            if not isinstance(raw, dict):
                raise ValueError
            return dict(raw)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"config key '{key}': {raw!r} is not a {getattr(tp, '__name__', tp)}") from None
    raise AssertionError(f"config: unhandled type {tp} of {key}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = _sections(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = f"in section '{prefix.rstrip('.')}'" if prefix else "at the top level"
        raise InvalidArgumentError(f"unknown config key(s) {[prefix + k for k in unknown]} {where}; allowed: "
                                   f"{sorted(fields)}")
    kwargs = {}
    for name, raw in values.items():
        tp, key = hints[name], prefix + name
        if _is_section(tp):
            if raw is None:
                raw = {}
            if not isinstance(raw, dict):
                raise InvalidArgumentError(f"config key '{key}' is a section; expected a mapping of its keys "
                                           f"{sorted(_sections(tp))}, got {raw!r}")
            kwargs[name] = _build(tp, raw, key + ".")
        else:
            kwargs[name] = _coerce(key, tp, fields[name], raw)
    return cls(**kwargs)


def _set_dotted(values: dict, dotted: str, raw) -> None:
    parts = dotted.split(".")
    node = values
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise InvalidArgumentError(f"override {dotted!r}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = raw


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Defaults < the YAML recipe at `path` < `key=value` overrides (dotted keys, YAML values). Raises
    InvalidArgumentError for an unreadable or invalid file, an unknown key (listing the allowed ones), or a bad
    value."""
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
        values = data
    extra: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise InvalidArgumentError(f"override {item!r} is not of the form key=value (e.g. training.lr=1e-4)")
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = raw
        _set_dotted(extra, key.strip(), parsed)
    values = _merge(values, extra)
    # A section's own defaults apply under a partial mapping; a wholesale model.* switch (fetch -> config) from an
    # override must clear the recipe's other weight source, so the last one given wins.
    model = values.get("model")
    if isinstance(model, dict) and isinstance(extra.get("model"), dict):
        given = [k for k in ("fetch", "hf_dir", "config") if extra["model"].get(k)]
        if given:
            for k in ("fetch", "hf_dir", "config"):
                if k not in given:
                    model.pop(k, None)
    return _build(JobConfig, values, "")


def dump(cfg: JobConfig) -> str:
    """The resolved config as YAML (what `tessera config` prints and the run saves as <output_dir>/config.yaml)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
