"""LoRA adapters on a tessera Llama/Mistral: apply, merge.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685) freezes a linear
layer's weight W [out, in] and learns a low-rank update: y = x W^T + s * (x A^T) B^T with A [r, in], B [out, r]
and s = alpha / r (the scaling of the paper, section 4.1, and of peft's LoraConfig without use_rslora). A starts
as kaiming-uniform(a=sqrt(5)) and B as zeros (peft's default init_lora_weights=True), so the adapted model first
computes exactly what the base model computed.

Apply adapters before sharding: a block's adapters then live in the same tessera unit as their frozen base
weights, and tessera.shard puts the trainable adapters first in the unit's flat layout, so only they get gradient
buffers, reduce-scatters and optimizer state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tessera.errors import InvalidArgumentError, StateError
from tessera.shard.runtime import managed_by, unit_of

# tessera target name -> the submodule of a TransformerBlock it lives in.
TARGET_PARENT = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                 "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}
# tessera target name -> the Hugging Face module name (peft's target_modules).
TARGET_HF = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
             "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


@dataclass(frozen=True)
class LoRAConfig:
    """rank (r): the adapters' inner dimension, > 0. alpha: the update is scaled by alpha / rank (> 0).
    dropout: probability in [0, 1) applied to the adapter branch's input during training (peft's lora_dropout).
    targets: which linears of every block get adapters, tessera names from TARGET_PARENT (wq, wk, wv, wo
    for attention; w1 gate, w3 up, w2 down for the MLP). Raises InvalidArgumentError for bad values."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")

    def __post_init__(self):
        if isinstance(self.targets, str):
            raise InvalidArgumentError(f"LoRAConfig: targets must be a sequence of names, got the string "
                                       f"{self.targets!r}; e.g. ('wq', 'wv')")
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise InvalidArgumentError(f"LoRAConfig: rank must be an integer > 0, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise InvalidArgumentError(f"LoRAConfig: alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise InvalidArgumentError(f"LoRAConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if not self.targets:
            raise InvalidArgumentError(f"LoRAConfig: targets is empty; expected some of {sorted(TARGET_PARENT)}")
        unknown = [t for t in self.targets if t not in TARGET_PARENT]
        if unknown:
            raise InvalidArgumentError(f"LoRAConfig: unknown targets {unknown}; expected names from "
                                       f"{sorted(TARGET_PARENT)} (wq/wk/wv/wo attention, w1 gate, w3 up, w2 down)")
        if len(set(self.targets)) != len(self.targets):
            raise InvalidArgumentError(f"LoRAConfig: targets {list(self.targets)} name a linear twice")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen bias-free linear plus a LoRA update: forward(x [..., in]) -> [..., out] =
    x W^T + (dropout(x) A^T B^T) * (alpha / rank).

    `weight` [out, in] is the base nn.Linear's own Parameter object (frozen), kept under the same attribute name so
    the model's state_dict key (layers.N.attention.wq.weight) and save_hf's name mapping do not change. `lora_A`
    [rank, in] and `lora_B` [out, rank] are trainable, in the weight's dtype and on its device."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if base.bias is not None:
            raise InvalidArgumentError("LoRALinear: the base linear has a bias; tessera's decoder linears have none")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, float(alpha), alpha / rank
        self.weight = base.weight  # registered first: parameter order weight, lora_A, lora_B
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        if not w.is_meta:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's reset_lora_parameters
        w.requires_grad_(False)  # last: the base is left as it was if anything above raises
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def materialize_meta(self) -> None:
        """Creates the adapters of a LoRALinear built on the meta device, on the (filled) weight's device and dtype,
        drawing A as __init__ does: load_hf(adapt=...) calls it unit by unit, in module order, so a sharded load
        draws the same A as apply_lora on a loaded model under the same seed."""
        w = self.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"alpha={self.alpha}"


def _is_sharded(model: nn.Module) -> bool:
    return any(unit_of(m) is not None for m in model.modules()) or \
        any(managed_by(p) is not None for p in model.parameters())


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path (layers.N.attention.wq) -> LoRALinear, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Replaces the targeted nn.Linear of every block in `model.layers` by a LoRALinear and freezes every other
    parameter (embeddings, norms, head, untargeted linears); returns `model`, changed in place.

    A is drawn from torch's global RNG, block by block in module order: seed it identically on every rank (as for
    the base model) so the ranks' adapters agree. Call it on the unsharded model, before tessera.shard /
    parallelize; or on the meta-device model through tessera.models.load_hf(path, shard=True,
    adapt=lambda m: apply_lora(m, cfg)), which creates each block's adapters as it fills and shards that block
    (the same A values under the same seed) and never holds the whole model. Raises
    InvalidArgumentError (not a LoRAConfig, no `layers`, a target missing or not a bias-free nn.Linear in some
    block) and StateError (already sharded, or adapters already applied); every target is checked first, so a
    rejected call changes nothing (modules, parameters, requires_grad, the RNG)."""
    if not isinstance(cfg, LoRAConfig):
        raise InvalidArgumentError(f"apply_lora expects a tessera.peft.LoRAConfig, got {type(cfg).__name__}")
    if _is_sharded(model):
        raise StateError(f"apply_lora: {type(model).__name__} is already sharded; apply LoRA to the unsharded "
                         "model, then shard it (its adapters then live in their block's unit)")
    existing = lora_modules(model)
    if existing:
        raise StateError(f"apply_lora: the model already has LoRA adapters (e.g. '{next(iter(existing))}'); "
                         "apply them once (merge_lora removes them)")
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InvalidArgumentError(f"apply_lora expects a tessera Llama/Mistral with `layers`, got "
                                   f"{type(model).__name__}")
    # Every target is found and checked before anything changes: a rejected call leaves the model (modules,
    # parameters, requires_grad) and torch's RNG as they were.
    wanted = {f"{TARGET_PARENT[t]}.{t}" for t in cfg.targets}
    plan = []  # (block, path, base linear), in module order
    for i, block in enumerate(layers):
        # In module order, whatever the order of cfg.targets: A is drawn in the order load_hf(adapt=...) fills.
        found = [(path, m) for path, m in block.named_modules() if path in wanted]
        if len(found) != len(wanted):
            missing = sorted(wanted - {path for path, _ in found})
            raise InvalidArgumentError(f"apply_lora: layers.{i} has no {missing}; nothing was changed")
        for path, base in found:
            if type(base) is not nn.Linear:
                raise InvalidArgumentError(f"apply_lora: layers.{i}.{path} is {type(base).__name__}, expected "
                                           "nn.Linear; nothing was changed")
            if base.bias is not None:
                raise InvalidArgumentError(f"apply_lora: layers.{i}.{path} has a bias; tessera's decoder linears "
                                           "have none; nothing was changed")
            plan.append((block, path, base))
    for p in model.parameters():
        p.requires_grad_(False)
    for block, path, base in plan:
        parent, _, attr = path.rpartition(".")
        setattr(block.get_submodule(parent), attr, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg  # save_adapter writes it to adapter_config.json
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Folds every adapter into its base weight, W <- W + (B @ A) * (alpha / rank) (computed in float32, then
    cast to W's dtype), and puts plain nn.Linear modules back (holding the same, still frozen, weight Parameter);
    returns `model`, changed in place. Afterwards save_hf writes the merged model.

    Unsharded models only. A sharded model's merged export is tessera.models.save_hf(model, dir,
    merge_adapters=True) (collective; it merges unit by unit as it writes and leaves the model unchanged); its
    adapters alone go out with save_adapter. Raises StateError for a sharded model and InvalidArgumentError for a
    model without adapters or with an adapter of the wrong shape or device, before any weight changes."""
    if _is_sharded(model):
        raise StateError("merge_lora: the model is sharded; merge an unsharded copy (see merge_lora's docstring) "
                         "or export the adapters with tessera.peft.save_adapter")
    mods = lora_modules(model)
    if not mods:
        raise InvalidArgumentError(f"merge_lora: {type(model).__name__} has no LoRA adapters")
    # Checked for every adapter before any weight changes, so a rejected merge leaves the model as it was.
    for name, m in mods.items():
        shapes = [tuple(m.weight.shape), tuple(m.lora_A.shape), tuple(m.lora_B.shape)]
        expected = [(m.out_features, m.in_features), (m.rank, m.in_features), (m.out_features, m.rank)]
        if shapes != expected:
            raise InvalidArgumentError(f"merge_lora: {name} has weight, lora_A, lora_B of shapes {shapes}; expected "
                                       f"{expected}; nothing was merged")
        devices = {t.device for t in (m.weight, m.lora_A, m.lora_B)}
        if len(devices) != 1:
            raise InvalidArgumentError(f"merge_lora: {name} has its weight and adapters on {sorted(map(str, devices))}"
                                       "; expected one device; nothing was merged")
    for name, m in mods.items():
        delta = (m.lora_B.float() @ m.lora_A.float()) * m.scaling
        m.weight.add_(delta.to(m.weight.dtype))
        plain = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        plain.weight = m.weight
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, plain)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
