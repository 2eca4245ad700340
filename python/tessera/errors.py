"""tessera's exception classes. The C++ core reports an absl::Status; the bindings turn it into one of these,
keeping the message (which names the tensor, file, rank or step and says what was expected)."""

from __future__ import annotations


class TesseraError(Exception):
    """Base class of every error tessera raises."""


class InvalidArgumentError(TesseraError, ValueError):
    """Bad input: a wrong shape, dtype, device, option or module."""


class StateError(TesseraError, RuntimeError):
    """An operation was called in the wrong state (e.g. sharding a module twice)."""


class NotSupportedError(TesseraError, NotImplementedError):
    """A feature that this version of tessera does not support yet."""


class CommError(TesseraError, RuntimeError):
    """A collective failed: a peer was lost or the group is broken."""


class CommTimeoutError(CommError, TimeoutError):
    """A collective did not finish within its timeout."""


class DesyncError(CommError):
    """Ranks are at different collectives (out of step), e.g. a unit that ran on some ranks only. The message
    names every rank's position: "#<seq> <tag> (<kind> of <count> elements (<dtype>))"."""


class CheckpointError(TesseraError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model."""


class ResourceExhaustedError(TesseraError, RuntimeError):
    """Out of memory or disk."""


class FetchError(TesseraError, RuntimeError):
    """A model or data set could not be fetched: the download failed (no network, pip's message kept), or what was
    downloaded does not match its pinned sha256."""


class InternalError(TesseraError, RuntimeError):
    """A bug in tessera; please report it with the message."""


# absl::StatusCode values (absl/status/status.h).
_BY_CODE = {
    3: InvalidArgumentError,  # INVALID_ARGUMENT
    4: CommTimeoutError,  # DEADLINE_EXCEEDED
    5: CheckpointError,  # NOT_FOUND
    8: ResourceExhaustedError,  # RESOURCE_EXHAUSTED
    9: StateError,  # FAILED_PRECONDITION
    11: InvalidArgumentError,  # OUT_OF_RANGE
    12: NotSupportedError,  # UNIMPLEMENTED
    13: InternalError,  # INTERNAL
    14: CommError,  # UNAVAILABLE
    15: CheckpointError,  # DATA_LOSS
}


# Aborted (10) is shared by several layers (a checkpoint attempt rank 0 gave up on, an aborted NCCL communicator);
# the desync diagnosis marks its messages with comm::kDesyncMarker (csrc/tessera/comm/desync.h).
_ABORTED = 10
_DESYNC_MARKER = "collectives out of step"


def from_status(code: int, message: str) -> TesseraError:
    """The exception for an absl::Status code (called by the C++ bindings)."""
    if code == _ABORTED and _DESYNC_MARKER in message:
        return DesyncError(message)
    return _BY_CODE.get(code, TesseraError)(message)
