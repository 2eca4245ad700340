"""Staging fences: which checkpoint saves are still copying which units' shards to host memory. They belong to the
shard layer: the optimizer and state-dict loading wait on them without importing tessera.checkpoint.

[Note: checkpoint consistency] A checkpoint is the state at the moment save() was called; a save never mixes two
moments and never holds a value later than the one at save(). Checkpointer.save() returns at once, so:
  - Everything that is not a unit's shard (module buffers such as BatchNorm's running statistics, parameters no
    unit manages, tensors in plain dicts, their optimizer state) is copied in save(): nothing fences it (the next
    forward updates running statistics at once), and it is small. Non-floating buffers and scalars are JSON, also
    taken in save().
  - Unit shards (parameters and their optimizer state) are copied to host buffers in the background (staging)
    while training goes on. Forward and backward never modify them; whatever does waits first:
      - tessera.optim.AdamW waits, per unit, only until that unit's pieces are staged;
      - any other torch optimizer waits until every in-flight stage finished (a global optimizer step pre-hook);
      - loading (Checkpointer.load*, tessera.load_full_state_dict) waits for every stage.
  - Any other in-place write to a unit shard (user code, a custom optimizer stepping without the torch hook) is
    caught by the tensor's version counter: recorded in save(), compared right after each piece is staged and
    before the fence releases it (so the optimizer's writes after the release are not flagged). A change fails the
    save: wait() raises CheckpointError "<tensor> changed in place after save() while it was being staged (version
    a -> b)". See [Note: staged pieces must not change] in csrc/tessera/python/bind_checkpoint.cpp for its limits.
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
    """Blocks until no in-flight save still stages `unit`'s pieces. A save whose staging failed protects
    nothing anymore: its error is reported by its own wait(), not by the optimizer step waiting here."""
    with _lock:
        pending = [(h, m[id(unit)]) for h, m in _inflight if id(unit) in m]
    for handle, index in pending:
        try:
            handle.wait_staged(index)
        except Exception:  # noqa: BLE001 (see the docstring)
            pass


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
