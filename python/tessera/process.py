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

[Note: ending a rank on Ctrl-C] SIGINT becomes a KeyboardInterrupt only when the main thread runs Python bytecode;
a rank blocked in a collective wait (C++, GIL released) would see it at the collective timeout (minutes), and its
peers, whose own waits fail when it is gone, would report "failed". exit_on_interrupt makes the kernel-level
handler also write to a wakeup socket (signal.set_wakeup_fd) that a helper thread reads at once: the rank is marked
interrupted (so whatever error ends it is reported as status 130, not as the lost peers it sees), the main thread gets
`grace_s` to raise KeyboardInterrupt and leave through end_failed_rank(130), and otherwise the thread ends the
process with os._exit(130). The save in flight is then not committed: the commit protocol (rank 0 renames the
step's .tmp directory once every rank's files are durable, docs/checkpoint_format.md) never shows a partial one, and
the next start removes the leftovers. A second SIGINT (a terminal sends one to every process, the launcher forwards
its own) does not interrupt the way out.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

# How long a rank's main thread has after SIGINT to leave by itself before exit_on_interrupt's thread ends the
# process (it is usually blocked in a collective wait that would return only at its timeout).
INTERRUPT_GRACE_S = 2.0
_INTERRUPTED = 128 + signal.SIGINT  # tessera.exitcodes.INTERRUPTED (exitcodes imports torch; this module does not)


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


# ---- why a rank ended: the cause file -------------------------------------------------------------------------

_cause = {"path": None, "rank": None, "written": False}


def set_cause_file(path: str | os.PathLike | None, rank: int) -> None:
    """Where record_cause writes this rank's cause (None: nowhere). Set by `tessera run` for the ranks it starts;
    see [Note: the root cause decides the job's status] in tessera/exitcodes.py."""
    _cause.update(path=os.fspath(path) if path is not None else None, rank=rank, written=False)


def record_cause(status: int, error: BaseException | str) -> None:
    """Writes {"rank", "status", "error", "time"} to this rank's cause file, once (the first cause is the rank's
    own; what follows is its consequence), atomically (a temporary file renamed), before the rank closes its
    communicators. Does nothing without a cause file. Never raises: the rank is failing already."""
    if _cause["path"] is None or _cause["written"]:
        return
    _cause["written"] = True
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    record = {"rank": _cause["rank"], "status": int(status), "error": text.splitlines()[0][:2000] if text else "",
              "time": time.time()}
    path = Path(_cause["path"])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError as e:
        print(f"tessera: rank {_cause['rank']}: could not write its cause file {path}: {e}", file=sys.stderr)


def read_causes(directory: str | os.PathLike) -> dict[int, dict]:
    """The cause records (rank -> record) in `directory` (rank-<r>.json files written by record_cause); a missing
    directory or an unreadable record counts as no record."""
    found = {}
    for f in sorted(Path(directory).glob("rank-*.json")) if Path(directory).is_dir() else []:
        try:
            record = json.loads(f.read_text())
            found[int(record["rank"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


# ---- Ctrl-C ----------------------------------------------------------------------------------------------------

_interrupt = {"installed": False, "raised": False, "event": threading.Event()}


def interrupted() -> bool:
    """Whether this process received SIGINT since exit_on_interrupt() (then whatever error ends it is reported
    as status 130: its peers going away is the interrupt's consequence)."""
    return _interrupt["event"].is_set()


def exit_on_interrupt(grace_s: float = INTERRUPT_GRACE_S) -> bool:
    """Makes SIGINT end this rank process within `grace_s` seconds with status 130, even while its main thread is
    blocked in a collective (see [Note: ending a rank on Ctrl-C]). `tessera run` calls it in every rank; a training
    script under torchrun may call it after init_process_group (torchrun forwards Ctrl-C to its ranks as SIGINT and
    kills them only 30 s later). The main thread still gets KeyboardInterrupt, as before, when it runs Python.
    Returns False (and changes nothing) off the main thread, or where SIGINT has a handler other than Python's
    default (ignored in a background job, or the program's own)."""
    if _interrupt["installed"]:
        return True
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGINT, _on_sigint)
    _interrupt.update(installed=True, sockets=(reader, writer))  # kept alive with the process
    threading.Thread(target=_watch_interrupts, args=(reader, previous, grace_s), name="tessera-sigint",
                     daemon=True).start()
    return True


def _on_sigint(signum, frame) -> None:
    """The Python-level SIGINT handler: KeyboardInterrupt once; later SIGINTs are ignored (the rank is leaving)."""
    _interrupt["event"].set()
    if not _interrupt["raised"]:
        _interrupt["raised"] = True
        raise KeyboardInterrupt


def _watch_interrupts(reader: socket.socket, previous_fd: int, grace_s: float) -> None:
    while True:
        try:
            data = reader.recv(64)
        except OSError:
            return
        if not data:
            return
        if previous_fd >= 0:  # whoever used the wakeup fd before (an event loop) still hears of its signals
            try:
                os.write(previous_fd, data)
            except OSError:
                pass
        if int(signal.SIGINT) in data and _interrupt.get("timer") is None:
            _interrupt["event"].set()
            timer = threading.Timer(grace_s, _end_interrupted, args=(grace_s,))
            timer.daemon = True
            _interrupt["timer"] = timer
            timer.start()


def _end_interrupted(grace_s: float) -> None:
    rank = f"rank {_cause['rank']} " if _cause["rank"] is not None else ""
    message = (f"interrupted (SIGINT); the main thread did not stop within {grace_s:g} s (blocked in a collective): "
               f"ending now with status {_INTERRUPTED}")
    record_cause(_INTERRUPTED, "KeyboardInterrupt: " + message)
    print(f"tessera: {rank}{message}", file=sys.stderr)
    end_failed_rank(_INTERRUPTED)
