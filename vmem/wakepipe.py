"""A self-pipe that wakes a thread blocked in select/poll.

Used by the agent's accept loop and by the post-copy fault thread: :meth:`WakePipe.wake`
is safe from any thread and from a signal handler (one non-blocking write; a full pipe
already means "wake up"), and :meth:`WakePipe.fileno` is what the waiting thread watches.
"""
from __future__ import annotations

import os

__all__ = ["WakePipe"]


class WakePipe:
    """A non-blocking, close-on-exec pipe; readable once :meth:`wake` was called.

    Guarantees: :meth:`wake` never raises and never blocks (a full pipe or a closed one is
    ignored: the waiter is already woken, or gone); :meth:`close` closes both ends and is
    idempotent.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def fileno(self) -> int:
        """The read end (for select/poll/selectors); -1 once closed."""
        return self._r

    def wake(self) -> None:
        try:
            os.write(self._w, b"x")
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._r = self._w = -1
