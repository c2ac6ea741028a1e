"""One long-lived thread that starts every guest process of an agent.

Why: a guest asks the kernel to kill it when its parent dies (``PR_SET_PDEATHSIG``), and
for the kernel "the parent" is the *thread* that forked it, not the process.  An agent
serves each connection in its own thread; a guest created (or received by migration) in
such a thread would be killed the moment that connection ends.  So every spawn runs on
this thread, which lives exactly as long as the agent: a guest being created or received
dies with the agent -- even a SIGKILLed one -- and never with a connection.  Once it runs
as the agent's own it is detached (``Agent.own_guest``) and outlives the agent.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

__all__ = ["Spawner"]


class Spawner:
    """Runs callables on one dedicated thread; :meth:`call` blocks for the result.

    Guarantees: every callable submitted before :meth:`stop` runs (or fails with its own
    exception re-raised in the caller); after :meth:`stop`, :meth:`call` raises RuntimeError.
    """

    def __init__(self, name: str = "vmem-spawner"):
        self._queue: "queue.Queue" = queue.Queue()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args, kwargs, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:
                future.set_exception(err)

    def call(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the spawner thread and return its result."""
        if self._stopped:
            raise RuntimeError("the agent is shutting down: no new guest can be started")
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        future: Future = Future()
        self._queue.put((fn, args, kwargs, future))
        return future.result()

    def wrap(self, fn):
        """``fn`` made to run on the spawner thread."""
        def on_spawner(*args, **kwargs):
            return self.call(fn, *args, **kwargs)

        on_spawner.__wrapped__ = fn
        return on_spawner

    def stop(self, timeout_s: float = 10.0) -> None:
        """Let queued spawns finish, then end the thread (guests it started get SIGKILL)."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(None)
        self._thread.join(timeout_s)
