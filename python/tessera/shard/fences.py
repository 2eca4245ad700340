"""Staging fences: which checkpoint saves are still copying which units' shards to host memory. They belong to the
shard layer: the optimizer and state-dict loading wait on them without importing tessera.checkpoint.

[Note: checkpoint consistency] Checkpointer.save() returns at once; the shards it saves are copied to host
buffers in the background (staging) while training goes on. Forward and backward never modify parameter or
optimizer shards, so they run freely. Whatever modifies them waits first:
  - tessera.optim.AdamW waits, per unit, only until that unit's pieces are staged;
  - any other torch optimizer waits until every in-flight stage finished (a global optimizer step pre-hook);
  - loading (Checkpointer.load*, tessera.load_full_state_dict) waits for every stage.
So no save can capture a half-updated state, whatever optimizer the user runs.
"""

from __future__ import annotations

import threading

from torch.optim.optimizer import register_optimizer_step_pre_hook

_lock = threading.Lock()
_inflight: list[tuple[object, dict[int, int]]] = []  # (C++ save handle, id(unit) -> index of its last piece)


def register(handle, unit_last_piece: dict[int, int]) -> None:
    with _lock:
        _inflight.append((handle, unit_last_piece))


def wait_for_unit(unit) -> None:
    """Blocks until no in-flight save still stages `unit`'s pieces."""
    with _lock:
        pending = [(h, m[id(unit)]) for h, m in _inflight if id(unit) in m]
    for handle, index in pending:
        handle.wait_staged(index)


def wait_all() -> None:
    """Blocks until every in-flight save finished staging; forgets them."""
    with _lock:
        pending = list(_inflight)
    for handle, _ in pending:
        try:
            handle.wait_all_staged()
        except Exception:  # the save failed: its error is reported by its own wait(); nothing to protect anymore
            pass
    with _lock:
        for item in pending:
            if item in _inflight:
                _inflight.remove(item)


def _optimizer_pre_hook(optimizer, args, kwargs):
    # tessera.optim.AdamW (fences_per_unit) waits per unit itself, only for the units it is about to update.
    if not getattr(optimizer, "fences_per_unit", False) and _inflight:
        wait_all()


register_optimizer_step_pre_hook(_optimizer_pre_hook)
