"""The check every restart test ends with: a run that met faults equals an uninterrupted run of the same recipe at the
same world size (every step once, with the same losses; the HF export and the LoRA adapter bit-identical)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def metrics(out: Path) -> list[dict]:
    """The run's metrics.jsonl records (a torn last line skipped)."""
    f = out / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.endswith("}")]


def assert_same_run(ref: Path, out: Path, context=None) -> None:
    from safetensors.torch import load_file

    a, b = metrics(ref), metrics(out)
    assert [m["step"] for m in b] == [m["step"] for m in a], context  # every step once, the lost ones redone
    assert [m.get("loss") for m in b] == [m.get("loss") for m in a], context
    for sub in ("hf/model.safetensors", "adapter/adapter_model.safetensors"):
        wa, wb = load_file(ref / sub), load_file(out / sub)
        assert wa.keys() == wb.keys(), (sub, context)
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (sub, k, context)
