"""Exit statuses of `tessera run` (and each of its ranks), saying whether running the job again can help. The
launcher restarts a failed group (torch elastic, `--max-restarts`); a scheduler (Slurm `--requeue`) can requeue on
RESTARTABLE and give up on the others.

    0   OK            the job finished (or had nothing left to do)
    1   FAILED        an unexpected error (a bug, an exception tessera does not classify): look at the traceback
    2   BAD_CONFIG    invalid recipe, overrides, arguments, model directory or data: fix the input; a restart fails
                      the same way
    3   NO_CHECKPOINT checkpoints exist but none of them loads (each is named in the message): a restart cannot help
                      (an error carries this status as its `exit_status` attribute, set where it is known)
    75  RESTARTABLE   a peer was lost or hung (also: its heartbeat stopped, tessera.resilience.heartbeat), a
                      collective timed out, the rendezvous or store failed: the job resumes from its last good
                      checkpoint when started again (75 is EX_TEMPFAIL of sysexits.h)
A rank killed by a signal has no status of its own; its launcher reports 128 + the signal number (137 for SIGKILL),
which is restartable too.
"""

from __future__ import annotations

import torch.distributed as dist

from tessera.errors import CommError, DesyncError, FetchError, InvalidArgumentError, NotSupportedError

OK = 0
FAILED = 1
BAD_CONFIG = 2
NO_CHECKPOINT = 3
RESTARTABLE = 75


def for_exception(e: BaseException) -> int:
    """The exit status for an error that ended a rank (see the module docstring)."""
    status = getattr(e, "exit_status", None)
    if isinstance(status, int):
        return status
    if isinstance(e, (InvalidArgumentError, NotSupportedError)):
        return BAD_CONFIG
    if isinstance(e, DesyncError):  # ranks ran different collectives: a program error, it would happen again
        return FAILED
    if isinstance(e, (CommError, FetchError, TimeoutError, ConnectionError)):
        return RESTARTABLE
    if isinstance(e, dist.DistError):  # torch.distributed's backend, network and store errors
        return RESTARTABLE
    return FAILED


def restartable(status: int) -> bool:
    """Whether running the job again can help after it ended with `status` (128 + n: killed by signal n)."""
    return status == RESTARTABLE or status > 128
