"""Ending a rank process that torch.multiprocessing spawned.

[Note: ending spawned rank processes] A spawned rank ends with sys.exit, so the interpreter tears itself down
(Py_FinalizeEx). If a gloo ProcessGroup is still alive then, its worker thread may yet release the last collective's
work, and with it a tensor whose Python object it now owns (the Python side dropped the tensor first): the decref
needs the GIL, CPython's take_gil ends such a thread with pthread_exit during finalization, and the forced unwind
through a noexcept frame aborts the process ("terminate called without an active exception", SIGABRT; seen in CI
and in core dumps here, e.g. after `dist.all_reduce(loss)` at the end of training). tessera frees its own references
to the group, but torch keeps the default group alive past destroy_process_group() once torch._dynamo is imported,
which the first torch.optim optimizer does (measured: its refcount goes from 9 to 19 and it survives destroy and
gc.collect()). So a rank that finished its work runs the exit hooks (tessera's in-flight checkpoint saves finish
there, multiprocessing cleans up), flushes its output and leaves with os._exit, skipping the teardown.

[Note: a failed rank leaves at once] A rank that failed (a lost or stopped peer, a collective timeout) must not wait
for anything on its way out: an in-flight checkpoint save would wait for the dead peer's files for the whole commit
timeout (10 minutes, seen in the fault suite: a rank stuck joining its commit thread after reporting a timeout), and
the launcher restarts nobody until every rank is gone. So it flushes its output and leaves with os._exit, without
the exit hooks: the save in flight is abandoned (its .tmp directory is removed by the next start, the previous
checkpoint stands).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def end_spawned_rank(code: int = 0) -> NoReturn:
    """Ends this spawned rank process after its work succeeded: exit hooks, flushed output, os._exit(code)."""
    try:
        atexit._run_exitfuncs()
    finally:
        end_failed_rank(code)


def end_failed_rank(code: int) -> NoReturn:
    """Ends this rank process at once: flushed output, os._exit(code), no exit hooks (see [Note: a failed rank
    leaves at once]; end_spawned_rank runs the hooks first)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
