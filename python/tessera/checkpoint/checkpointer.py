"""tessera.checkpoint.Checkpointer: asynchronous, verifiable, resharding checkpoints (DESIGN.md section 4).

    ckpt = tessera.checkpoint.Checkpointer("/ckpt", keep_last=3)
    state = {"model": model, "optim": opt, "sched": scheduler, "rng": tessera.checkpoint.RNGState(),
             "train": {"step": 0, "data_pos": 0}}
    start = ckpt.load_latest(state)          # None on a fresh start, else the step it resumed from (raises
                                             # CheckpointError if checkpoints exist but none loads)
    ...
    handle = ckpt.save(step, state)          # returns at once; training continues (see fences.py)
    handle.wait()                            # optional: blocks until committed, raises CheckpointError on failure

The C++ engine (csrc/tessera/checkpoint) stages, writes, checksums and commits; this file maps the state to it.
Format and commit protocol: docs/checkpoint_format.md.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn

from tessera import _C, knobs
from tessera.checkpoint import extras, jsonio
from tessera.checkpoint.state import Collected, collect_module, collect_optimizer, restore_optimizer_json
from tessera.errors import CheckpointError, InvalidArgumentError, StateError, TesseraError
from tessera.shard import fences

log = logging.getLogger("tessera.checkpoint")

# A rank's load error shared with the other ranks is cut to this many bytes (the mismatch lists are already capped).
_MAX_ERROR_BYTES = 8192

# Every live Checkpointer, for the exit hook below.
_live: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


@atexit.register
def _finish_saves_at_exit() -> None:
    """A save still in flight when the script ends is finished (committed, or its failure logged) before the
    interpreter shuts down, while everything it needs is alive; otherwise its thread would be cut off or joined
    somewhere inside interpreter teardown. (A process that ends with os._exit skips this: the save is then simply
    not committed and the previous checkpoint stays the latest.)"""
    for ckpt in list(_live):
        pending = ckpt._pending
        if pending is None or pending.done:
            continue
        log.warning("tessera checkpoint: finishing checkpoint step %d in %s before exit", pending.step, ckpt.root)
        try:
            pending.wait()
        except CheckpointError as e:
            log.error("tessera checkpoint: %s", e)


class SaveHandle:
    """A save in flight. wait() blocks until it is committed and raises CheckpointError if it failed."""

    def __init__(self, step: int, handle):
        self.step = step
        self._handle = handle
        self.waited = False  # whether wait() was called (its outcome seen by the caller)

    @property
    def done(self) -> bool:
        return self._handle.done

    @property
    def stats(self) -> dict:
        """{"bytes": this rank's bytes, "stage_seconds": until staged, "durable_seconds": until committed or
        failed}; the times are None until reached. Measured by the engine, not by when wait() was called."""
        return dict(self._handle.stats)

    def wait(self) -> None:
        self.waited = True
        try:
            self._handle.wait()
        except TesseraError as e:
            raise CheckpointError(f"checkpoint step {self.step} was not saved: {e}") from None
        finally:
            fences.wait_all()
        st = self.stats
        log.info("tessera checkpoint: step %d committed: %.1f MB from this rank, staged in %.3f s, durable in %.3f s",
                 self.step, st["bytes"] / 1e6, st["stage_seconds"] or 0.0, st["durable_seconds"] or 0.0)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# The crash point of a load (fault injection, tests only): the process kills itself with SIGKILL once half of the
# checkpoint's tensors are applied to the state, the worst moment for a load to stop.
LOAD_CRASH_POINT = "during_load"


class Checkpointer:
    def __init__(self, root: str | os.PathLike, keep_last: int = 3, *, threads: int = 4,
                 commit_timeout_s: float | None = None, read_only: bool = False,
                 crash_point: knobs.CrashPoint | None = None):
        """read_only=True: a reader in this one process (world 1, no collective, even inside a distributed job),
        for looking at the checkpoints of a job that may still be saving: it creates nothing and never removes
        the .tmp-* directory of a save in progress (a writer removes those as leftovers of crashed saves).
        save() then raises StateError.
        crash_point: fault injection for tests only, overriding knobs' TESSERA_CHECKPOINT_CRASH_AT: a save point of
        csrc/tessera/checkpoint/writer.h, or LOAD_CRASH_POINT ("during_load": half of a load's tensors applied)."""
        if keep_last < 0:
            raise InvalidArgumentError(f"Checkpointer: keep_last must be >= 0 (0 keeps all), got {keep_last}")
        self.root = os.fspath(root)
        self.read_only = read_only
        if read_only:
            self.rank, self.world, self._group_ref, self._writer = 0, 1, None, None
            self._crash_writer, self._crash_step, self._pending, self._saves = None, None, None, 0
            self._crash_load = None
            return
        self.rank, self.world = _rank_world()
        k = knobs.load()
        timeout = commit_timeout_s if commit_timeout_s is not None else k.checkpoint_commit_timeout_s
        # A gloo group of our own for agreement between ranks, so it never interleaves with training collectives.
        # Held weakly: torch.distributed owns its groups, and destroy_process_group() must be able to free this one
        # while Python is alive (see [Note: the adapter does not own the group] in comm/pg/pg_communicator.h).
        group = dist.new_group(backend="gloo") if self.world > 1 else None
        self._group_ref = weakref.ref(group) if group is not None else None
        new_writer = lambda **kw: _C.CheckpointWriter(  # noqa: E731
            self.root, threads=threads, commit_timeout_s=timeout, keep_last=keep_last, **kw)
        if self.rank == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as e:
                raise CheckpointError(f"cannot create checkpoint directory {self.root}: {e.strerror}") from None
            self._writer = new_writer()
            # Leftovers of crashed saves go before the barrier: after it, another rank may already be writing
            # into the next step's .tmp directory (clean_stale after the barrier deleted a rank's data file).
            self._writer.clean_stale()
        if group is not None:
            dist.barrier(group=group)
        del group
        if self.rank != 0:
            self._writer = new_writer()
        # Fault injection (tests): kills this process at a named point of a save (knobs.CrashPoint).
        self._crash_writer, self._crash_step, self._crash_load = None, None, None
        crash = crash_point if crash_point is not None else k.checkpoint_crash_point
        if crash is not None and crash.rank in (None, self.rank):
            if crash.point == LOAD_CRASH_POINT:
                self._crash_load = crash
            else:
                self._crash_step = crash.step
                self._crash_writer = new_writer(crash_point=crash.point)
        self._pending: SaveHandle | None = None
        self._saves = 0  # save() calls so far: the same on every rank (see [Note: save attempts] in writer.h)
        _live.add(self)

    @property
    def _group(self):
        """The checkpointer's own gloo group (None on one rank)."""
        if self._group_ref is None:
            return None
        group = self._group_ref()
        if group is None:
            raise CheckpointError("checkpoint: the process group was destroyed (torch.distributed."
                                  "destroy_process_group); create a new Checkpointer after init_process_group()")
        return group

    # ---- saving ----------------------------------------------------------------------------------------------

    def save(self, step: int, state: dict) -> SaveHandle:
        """Starts saving `state` as checkpoint `step` and returns at once (one save runs at a time: a second
        save first waits for the first). The checkpoint is the state at this call: plain values, module buffers
        and everything else that is not a unit's shard are copied now; unit shards (parameters, optimizer state)
        are staged in the background, and one that is changed in place before its staging ended fails the save
        (wait() raises CheckpointError naming it). See [Note: checkpoint consistency] in tessera/shard/fences.py.
        Raises CheckpointError if the previous save failed and its wait() was never called."""
        if self.read_only:
            raise StateError(f"Checkpointer({self.root!r}, read_only=True) cannot save")
        if not isinstance(step, int) or step < 0:
            raise InvalidArgumentError(f"Checkpointer.save: step must be a non-negative int, got {step!r}")
        attempt = self._saves
        self._saves += 1
        if self._pending is not None and not (self._pending.done and self._pending.waited):
            # Also a finished one nobody waited for: a failed save must be raised here, not dropped unseen (seen in
            # the fault suite: with a full disk every later save failed and only the last one's wait() said so).
            self._pending.wait()
        collected, global_extra, rank_extra = self._collect(state, load=False)
        for s in collected.slots:
            if s.save is not None and s.unit is None:
                # Not protected by a staging fence (a forward updates BatchNorm's running statistics at once):
                # copied now. These are small; unit shards are checked instead ([Note: checkpoint consistency]).
                s.save = s.save.clone()
        order = _stage_order(collected)
        pieces = [(s.name, list(s.shape), s.save_start, s.save) for s in order if s.save is not None]
        if any(t.is_cuda for *_, t in pieces):
            # The engine copies on its own stream: the values queued on ours (the last optimizer step) must be there.
            torch.cuda.current_stream().synchronize()
        unit_last = {}
        for i, s in enumerate(s for s in order if s.save is not None):
            if s.unit is not None:
                unit_last[id(s.unit)] = i
        writer = self._writer
        if self._crash_writer is not None and self._crash_step in (None, step):
            writer = self._crash_writer
        handle = writer.save(step, self.rank, self.world, pieces, jsonio.dumps(rank_extra),
                             jsonio.dumps(global_extra), attempt)
        fences.register(handle, unit_last)
        self._pending = SaveHandle(step, handle)
        return self._pending

    # ---- loading ---------------------------------------------------------------------------------------------

    def load(self, step: int, state: dict) -> None:
        """Loads checkpoint `step` into `state` (any world size or strategy). If any rank cannot read its part
        (damaged, missing, or not matching the model), every rank raises the same CheckpointError, which has
        "rank R: <message naming the file and tensor>" for each rank that failed. Nothing in `state` changes
        unless it all loads."""
        fences.wait_all()
        error = self._try_load(step, state)
        if error is not None:
            raise error

    def load_latest(self, state: dict) -> int | None:
        """Loads the newest checkpoint that every rank can read completely and returns its step. Returns None
        only if there is no committed checkpoint at all (a fresh start). A damaged or mismatching checkpoint is
        skipped with a warning when an older one loads; if none loads, raises CheckpointError naming each step
        and why (a job must not silently start over from step 0)."""
        fences.wait_all()
        steps = self._agree_steps()
        latest = _C.read_latest(self.root) if self.rank == 0 else None
        if self.rank == 0 and latest is not None and steps and latest != steps[0]:
            log.warning("tessera checkpoint: %s/latest names step %s but the newest committed step is %s; using "
                        "the committed steps", self.root, latest, steps[0])
        failures = []
        for step in steps:
            error = self._try_load(step, state)
            if error is None:
                return step
            log.warning("tessera checkpoint: skipping step %d: %s", step, error)
            failures.append(f"step {step}: {error}")
        if not failures:
            return None
        raise CheckpointError(f"none of the {len(steps)} committed checkpoints in {self.root} could be loaded: "
                              + " | ".join(failures))

    def committed_steps(self) -> list[int]:
        return list(_C.list_committed_steps(self.root))

    # ---- internals -------------------------------------------------------------------------------------------

    def _agree_steps(self) -> list[int]:
        """Rank 0's list of committed steps, newest first, the same on every rank (plain tensors, no pickle)."""
        steps = list(_C.list_committed_steps(self.root)) if self.rank == 0 else []
        if self.world > 1:
            count = torch.tensor([len(steps)], dtype=torch.int64)
            dist.broadcast(count, src=0, group=self._group)
            buf = torch.tensor(steps, dtype=torch.int64) if self.rank == 0 else torch.zeros(int(count.item()),
                                                                                            dtype=torch.int64)
            if count.item():
                dist.broadcast(buf, src=0, group=self._group)
            steps = buf.tolist()
        return steps

    def _share_errors(self, error: str | None) -> dict[int, str]:
        """Every rank's error (rank -> message; ranks without one are absent), the same dict on every rank. Sent
        over the checkpointer's gloo group as UTF-8 bytes in uint8 tensors, lengths first (no pickle); each
        message is cut at _MAX_ERROR_BYTES."""
        mine = (error or "").encode("utf-8")[:_MAX_ERROR_BYTES]
        if self.world == 1:
            return {0: error} if error else {}
        group = self._group
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(lengths, torch.tensor([len(mine)], dtype=torch.int64), group=group)
        sizes = [int(n.item()) for n in lengths]
        width = max(sizes)
        if width == 0:
            return {}
        buf = torch.zeros(width, dtype=torch.uint8)
        if mine:
            buf[:len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
        bufs = [torch.empty(width, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(bufs, buf, group=group)
        return {r: bytes(bufs[r][:n].tolist()).decode("utf-8", errors="replace")
                for r, n in enumerate(sizes) if n}

    def _try_load(self, step: int, state: dict) -> CheckpointError | None:
        error = None
        try:
            reader = _C.CheckpointReader(self.root, step)
            staged, finish = self._read_all(reader, state)
        except TesseraError as e:
            error = str(e)
        # Every rank learns every rank's failure, so each raises an error naming the damaged file and tensor
        # even when its own reads succeeded.
        errors = self._share_errors(error)
        if errors:
            if self.world == 1:
                return CheckpointError(f"checkpoint step {step} in {self.root}: {errors[0]}")
            return CheckpointError(f"checkpoint step {step} in {self.root} could not be loaded: "
                                   + "; ".join(f"rank {r}: {m}" for r, m in sorted(errors.items())))
        for i, (slot, tensor) in enumerate(staged):
            if i == len(staged) // 2 and self._crash_load is not None and self._crash_load.step in (None, step):
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: half of the state overwritten
            slot.apply(tensor)
        finish()
        return None

    def _read_all(self, reader, state: dict):
        """Reads (and verifies) everything this rank needs into fresh CPU tensors; returns them and a function
        that applies the JSON parts. Nothing in `state` is modified here."""
        saved = dict(reader.tensors)
        global_extra = jsonio.loads(reader.global_json, "checkpoint global extras")
        rank_json = reader.rank_json
        rank_extra = (jsonio.loads(rank_json[self.rank], "checkpoint rank extras")
                      if self.rank < len(rank_json) else None)
        global_extra = {k: extras.pieces_to_tensors(v, reader, saved) for k, v in global_extra.items()}
        collected, _, _ = self._collect(state, load=True, saved_names=set(saved))
        expected = {s.name: s for s in collected.slots}
        buffers = collected.nonfloat_buffers
        saved_buffers = global_extra.get(extras.BUFFERS_KEY, {})
        missing_buffers, mismatched_buffers = extras.check_buffers(buffers, saved_buffers)
        dtype_names = {s.name: str(s.dtype).removeprefix("torch.") for s in collected.slots}
        missing = sorted(n for n in expected if n not in saved)
        mismatched = sorted(f"{n}: checkpoint {tuple(saved[n][1])} {saved[n][0]}, model {expected[n].shape} "
                            f"{dtype_names[n]}" for n in expected if n in saved and
                            (tuple(saved[n][1]) != expected[n].shape or saved[n][0] != dtype_names[n]))
        keys = {k for k, v in state.items() if isinstance(v, (nn.Module, torch.optim.Optimizer))}
        unexpected = sorted(n for n in saved if n not in expected and n.split("/", 1)[0] in keys
                            and not _is_optimizer_name(n, state))
        missing += missing_buffers
        mismatched += mismatched_buffers
        if missing or mismatched or unexpected:
            raise CheckpointError(
                "checkpoint does not match the state being loaded: "
                + "; ".join(part for part in (
                    f"missing from checkpoint: {missing[:20]}" if missing else "",
                    f"different shape or dtype: {mismatched[:20]}" if mismatched else "",
                    f"not in the model: {unexpected[:20]}" if unexpected else "") if part))
        staged = []
        for slot in collected.slots:
            buf = torch.empty(slot.load_count, dtype=slot.dtype)
            if slot.load_count:
                reader.read(slot.name, slot.load_start, buf)
            staged.append((slot, buf))
        for key, value in state.items():
            if key not in global_extra and not getattr(value, "per_rank", False) and not isinstance(
                    value, (nn.Module, torch.optim.Optimizer)):
                raise CheckpointError(f"checkpoint has no entry '{key}' (it has {sorted(global_extra)})")

        def finish():
            extras.restore_buffers(buffers, saved_buffers)
            for key, value in state.items():
                if isinstance(value, nn.Module):
                    continue
                if isinstance(value, torch.optim.Optimizer):
                    restore_optimizer_json(key, value, global_extra[key], collected.places)
                elif getattr(value, "per_rank", False):
                    if rank_extra is not None and key in rank_extra:
                        value.load_state_dict(rank_extra[key])
                    else:
                        log.warning("tessera checkpoint: no per-rank '%s' saved for rank %d (saved on %d ranks); "
                                    "left as is", key, self.rank, len(rank_json))
                elif isinstance(value, dict):
                    value.clear()
                    value.update(global_extra[key])
                else:
                    value.load_state_dict(global_extra[key])

        return staged, finish

    def _collect(self, state: dict, load: bool, saved_names: set[str] | None = None):
        if not isinstance(state, dict) or not state:
            raise InvalidArgumentError("Checkpointer: state must be a non-empty dict of name -> module, optimizer, "
                                       "stateful object or dict")
        collected = Collected()
        global_extra, rank_extra = {}, {}
        for key, value in state.items():
            if not isinstance(key, str) or "/" in key:
                raise InvalidArgumentError(f"Checkpointer: state key {key!r} must be a str without '/'")
            if isinstance(value, nn.Module):
                collect_module(key, value, self.rank, self.world, collected)
        if collected.nonfloat_buffers and not load:
            global_extra[extras.BUFFERS_KEY] = extras.save_buffers(collected.nonfloat_buffers)
        for key, value in state.items():
            if isinstance(value, nn.Module):
                continue
            if isinstance(value, torch.optim.Optimizer):
                global_extra[key] = collect_optimizer(key, value, collected.places, collected, load, saved_names)
            elif load:
                continue
            elif getattr(value, "per_rank", False):
                rank_extra[key] = value.state_dict()
            elif isinstance(value, dict):
                global_extra[key] = extras.tensors_to_pieces(key, dict(value), self.rank, collected)
            elif hasattr(value, "state_dict") and hasattr(value, "load_state_dict"):
                global_extra[key] = extras.tensors_to_pieces(key, value.state_dict(), self.rank, collected)
            else:
                raise InvalidArgumentError(
                    f"Checkpointer: state['{key}'] is a {type(value).__name__}; expected an nn.Module, an optimizer, "
                    "a dict, or an object with state_dict()/load_state_dict()")
        return collected, global_extra, rank_extra


def _is_optimizer_name(name: str, state: dict) -> bool:
    return isinstance(state.get(name.split("/", 1)[0]), torch.optim.Optimizer)


def _stage_order(collected: Collected):
    """Pieces grouped unit by unit (parameters, then their optimizer state) so a unit's fence clears early."""
    unit_rank = {}
    for s in collected.slots:
        if s.unit is not None and id(s.unit) not in unit_rank:
            unit_rank[id(s.unit)] = len(unit_rank)
    return sorted(collected.slots, key=lambda s: unit_rank.get(id(s.unit), len(unit_rank)) if s.unit else 1 << 30)
