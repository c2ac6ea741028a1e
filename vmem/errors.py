"""The vmem exception hierarchy.

Every error vmem raises on purpose derives from :class:`VmemError`.  Subclasses carry
their context as attributes and survive pickling (they cross process boundaries: a
destination's failure is reported to the source over the back channel).  OS errors are
translated exactly once, at the boundary where they happen, with ``raise ... from err``.
"""
from __future__ import annotations

from transport.errors import PicklesContext

__all__ = [
    "VmemError",
    "FeatureUnavailable",
    "TrackerUnavailable",
    "StreamError",
    "MigrationError",
    "GuestError",
    "GuestCrashed",
    "GuestUnresponsive",
    "PolicyError",
    "ConfigError",
    "drop_tracebacks",
]


class VmemError(PicklesContext, Exception):
    """Root of every error vmem raises deliberately.

    Subclasses keep their keyword context in ``self.__dict__``; :class:`PicklesContext`
    (shared with the transport errors) rebuilds from ``args`` and restores the attributes,
    so a pickled error reads the same on the other side.
    """


class ConfigError(VmemError, ValueError):
    """A parameter given by the user is malformed, contradictory or out of range.

    Attributes:
        parameter: the name of the offending parameter (as the user spelled it).
    """

    def __init__(self, parameter: str, message: str):
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


class FeatureUnavailable(VmemError):
    """The running kernel lacks a feature a mechanism needs.

    Attributes:
        feature: the kernel feature's name (e.g. ``UFFD_FEATURE_WP_ASYNC``).
        alternative: what the user can use instead, or ``""``.
    """

    def __init__(self, feature: str, reason: str, alternative: str = ""):
        msg = f"kernel feature {feature} is unavailable: {reason}"
        if alternative:
            msg += f"; alternative: {alternative}"
        super().__init__(msg)
        self.feature = feature
        self.reason = reason
        self.alternative = alternative


class TrackerUnavailable(FeatureUnavailable):
    """A dirty tracker cannot run here (names the missing feature and the alternative)."""


class StreamError(VmemError):
    """The migration stream is malformed, truncated, of an unsupported version, or corrupt.

    Attributes:
        offset: byte offset in the stream where the problem was found, or -1 if unknown.
    """

    def __init__(self, message: str, offset: int = -1):
        super().__init__(message if offset < 0 else f"{message} (at stream offset {offset})")
        self.offset = offset


class MigrationError(VmemError):
    """A migration failed.

    Attributes:
        phase: where it failed: "setup", "precopy", "stop-and-copy", "resume", "verify", "commit".
    """

    def __init__(self, phase: str, message: str):
        super().__init__(f"{phase}: {message}")
        self.phase = phase
        self.message = message


class GuestError(VmemError):
    """A guest process misbehaved or reported an error."""


class GuestCrashed(GuestError):
    """The guest process exited while it was expected to run.

    Attributes:
        returncode: the process's exit status (negative: killed by that signal).
    """

    def __init__(self, message: str, returncode: int | None = None):
        super().__init__(message)
        self.returncode = returncode


class GuestUnresponsive(GuestError):
    """The guest did not acknowledge a command in time (it may be stuck in a long step)."""


class PolicyError(VmemError):
    """A precopy policy raised or returned something that is not a decision."""


def drop_tracebacks(err: BaseException | None) -> None:
    """Clear the tracebacks of ``err`` and its causes.

    A channel keeps its first error (sticky); that error's traceback holds the frames that
    were sending or receiving -- with memoryviews of guest RAM -- and those frames hold the
    channel: a cycle that keeps the RAM mapping (and its memfd) alive until the garbage
    collector runs.  Reports carry the message, not the traceback.
    """
    seen = 0
    while err is not None and seen < 16:
        err.__traceback__ = None
        err = err.__cause__ or err.__context__
        seen += 1
