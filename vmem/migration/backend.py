"""What the migrator needs from a guest: the backend interface.

The rounds, the stream, the policies and verification never look at *how* a guest runs.
A backend supplies RAM, dirty tracking, pause/resume and the context blob.  Today's
backend is the process guest (:class:`guests.launch.ProcessGuest`); a hypervisor backend
(KVM: guest memory is a memfd the VMM maps, dirty tracking through KVM's dirty log,
pause/resume through the vCPU threads, the context from KVM_GET_REGS & co) implements
the same two protocols and registers an incoming factory here.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

__all__ = ["SourceGuest", "IncomingGuest", "INCOMING_FACTORIES", "incoming_factory"]


@runtime_checkable
class SourceGuest(Protocol):
    """A running guest that can be migrated away.

    Attributes:
        spec: has ``to_json()``: what the destination needs to start an identical guest.
        npages: pages of RAM.
        ram: a :class:`vmem.ram.GuestRam` (or compatible: ``pages`` view, ``address``,
            ``npages``, ``data_runs()``, ``data_pages()``) mapped in the migrator.
        pid: the process holding the guest (for figures); -1 if none.
    """

    spec: object
    npages: int
    ram: object
    pid: int

    def alive(self) -> bool: ...
    def make_tracker(self, kind: str = "auto"): ...       # a vmem.tracking.DirtyTracker
    def pause(self, timeout_s: float = 10.0): ...          # -> guests.launch.PauseInfo
    def resume(self, context: bytes | None = None, timeout_s: float = 30.0) -> None: ...
    def counters(self) -> dict: ...
    def set_throttle(self, fraction: float) -> None: ...  # auto-converge; 0.0 = none
    def verify(self, timeout_s: float = 600.0) -> dict: ...
    def crash_error(self, what: str): ...                  # -> vmem.errors.GuestCrashed
    def exit(self, timeout_s: float = 5.0): ...


@runtime_checkable
class IncomingGuest(Protocol):
    """A destination guest created before its RAM arrives.

    Guarantees the destination relies on: creating it reads no RAM; ``ram.fd`` accepts
    ``pwrite`` of page data; ``resume(context)`` starts it from the context once RAM is
    complete; ``close()`` removes everything it built.
    """

    ram: object
    pid: int

    def alive(self) -> bool: ...
    def resume(self, context: bytes | None = None, timeout_s: float = 30.0) -> None: ...
    def wait_first_step(self, timeout_s: float = 10.0) -> int: ...
    def verify(self, timeout_s: float = 600.0) -> dict: ...
    def counters(self) -> dict: ...
    def exit(self, timeout_s: float = 5.0): ...
    def close(self): ...


def _process_incoming(spec_json: dict, npages: int) -> IncomingGuest:
    from guests.launch import GuestSpec, ProcessGuest

    return ProcessGuest.incoming(GuestSpec.from_json(spec_json), npages)


#: Backend name (sent in the preamble as ``backend``) -> factory(spec_json, npages).
INCOMING_FACTORIES: dict[str, Callable[[dict, int], IncomingGuest]] = {"process": _process_incoming}


def incoming_factory(name: str) -> Callable[[dict, int], IncomingGuest]:
    """The factory for backend ``name``.

    Raises:
        KeyError: no such backend on this host (the caller reports it to the source).
    """
    return INCOMING_FACTORIES[name]
