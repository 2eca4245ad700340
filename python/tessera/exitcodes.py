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
                      collective timed out, the rendezvous or store failed, a disk filled up: the job resumes from its
                      last good checkpoint when started again (75 is EX_TEMPFAIL of sysexits.h)
    130 INTERRUPTED   stopped by SIGINT (Ctrl-C); 143 for SIGTERM: every rank and the launcher stop within seconds, the
                      checkpoint in flight is committed or left uncommitted (never half-written); the job resumes from
                      its newest committed checkpoint when started again
A rank killed by a signal has no status of its own; its launcher reports 128 + the signal number (137 for SIGKILL),
which is restartable too.

[Note: the root cause decides the job's status] When one rank fails, the others fail after it (their collectives
lose the peer: CommError, timeouts, status 75), and which of them the launcher sees first is a matter of timing. So a
rank that fails writes its status and error to a cause file (tessera.process.record_cause) *before* it closes its
communicators, i.e. before any peer can fail because of it, and the launcher decides with job_status over every
rank's report (job_status): the rank whose cause was written first is the root cause, unless a rank died by a signal
from outside (it could write nothing: a lost peer). The job has the root cause's status, and the launcher restarts
it (--max-restarts) only if that status is restartable: a deterministic error (1, 2, 3) on one rank is not restarted,
whatever the errors its peers met after it. Causes are files in a directory the launcher makes (one per attempt),
written by the ranks on its node. For launchers that read only the ranks' statuses (srun, torchrun), the ranks also
agree through the group's store: a rank that lost its peer to a deterministic error exits with that error's status
(see [Note: every rank reports the root cause's status] in tessera/recipes/launch.py).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import torch.distributed as dist

from tessera.errors import (CommError, DesyncError, FetchError, InvalidArgumentError, NotSupportedError,
                            ResourceExhaustedError)

OK = 0
FAILED = 1
BAD_CONFIG = 2
NO_CHECKPOINT = 3
RESTARTABLE = 75
INTERRUPTED = 128 + signal.SIGINT  # 130


def for_exception(e: BaseException) -> int:
    """The exit status for an error that ended a rank (see the module docstring). An error raised while handling,
    or because of, a restartable one (a CheckpointError whose save lost its peer, a full disk) is restartable too:
    the chain (__cause__, __context__) is looked through."""
    status = getattr(e, "exit_status", None)
    if isinstance(status, int):
        return status
    if isinstance(e, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(e, (InvalidArgumentError, NotSupportedError)):
        return BAD_CONFIG
    seen: set[int] = set()
    link: BaseException | None = e
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if _restartable_error(link):
            return RESTARTABLE
        link = link.__cause__ or link.__context__
    return FAILED


def _restartable_error(e: BaseException) -> bool:
    if isinstance(e, DesyncError):  # ranks ran different collectives: a program error, it would happen again
        return False
    # A disk or host memory that is full: the environment's state, not the program's; space may be freed
    # (keep_last, other jobs) or the job placed elsewhere.
    if isinstance(e, (CommError, FetchError, ResourceExhaustedError, TimeoutError, ConnectionError)):
        return True
    if isinstance(e, dist.DistError):  # torch.distributed's backend, network and store errors
        return True
    # torch raises gloo's transport failures (a peer gone, a timeout) as a plain RuntimeError, e.g. torch 2.11:
    # "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:538] Read error [127.0.0.1]:11693: Connection reset by
    # peer"; they are known by the source path gloo puts first.
    return isinstance(e, RuntimeError) and "/gloo/transport/" in str(e).split("]", 1)[0]


def restartable(status: int) -> bool:
    """Whether running the job again can help after it ended with `status` (128 + n: killed by signal n)."""
    return status == RESTARTABLE or status > 128


def for_signal(signum: int) -> int:
    """The status of a process ended by signal `signum` (as a shell reports it): 128 + signum."""
    return 128 + int(signum)


@dataclass(frozen=True)
class RankEnd:
    """How one rank of a job ended, as its launcher saw it.

    status: the rank's exit status (128 + n when a signal ended it); reported: the rank wrote a cause file
    (tessera.process.record_cause) before it closed its communicators, so its status is its own finding, not an
    echo of a peer's failure; time: when it wrote it (wall clock, s), None if it did not; by_launcher: the launcher
    (or torch's agent) ended it after another rank had failed, so its status says nothing about the job;
    error: the one-line error it reported ("" if none)."""

    rank: int
    status: int
    reported: bool = False
    time: float | None = None
    by_launcher: bool = False
    error: str = ""


def job_status(ends: list[RankEnd]) -> RankEnd | None:
    """The root cause among the ranks' ends (see [Note: the root cause decides the job's status]); None when every
    rank ended with 0. In order:
      1. a rank that died by a signal nobody in the job sent (SIGKILL from outside, the OOM killer): a lost peer,
         and the others' errors are its consequence (it could write no cause);
      2. the rank whose cause was written first: a rank's peers fail only after it closed its communicators (or
         after their collective timeout), i.e. after it wrote its cause;
      3. a rank that failed without writing a cause (a heartbeat that found a stopped peer, status 75);
      4. a rank the launcher ended."""
    failed = [e for e in ends if e.status != OK]
    if not failed:
        return None
    for wanted in (lambda e: not e.reported and not e.by_launcher and e.status > 128,
                   lambda e: e.reported,
                   lambda e: not e.by_launcher,
                   lambda e: True):
        hits = [e for e in failed if wanted(e)]
        if hits:
            return min(hits, key=lambda e: (e.time is None, e.time or 0.0, e.rank))
    raise AssertionError("unreachable: `failed` is not empty")
