"""What the migrator needs from a guest: the backend interface, and the one place that
names the backends.

The rounds, the stream, the policies and verification never look at *how* a guest runs.
A backend supplies RAM (a memfd the migrator maps or writes), dirty tracking, pause/resume
at a safe point, a context blob and, for post-copy, a userfaultfd on the destination's RAM.
Today's backend is the process guest (:class:`guests.launch.ProcessGuest`); a hypervisor
backend (KVM: guest memory is a memslot memfd, dirty tracking through KVM's dirty log or
ring, pause/resume through the vCPU threads, the context from KVM_GET_REGS & co; Xen: a
foreign mapping, log-dirty, the HVM context) implements the same protocols and registers
its factories below.

Who calls what (``tests/test_layout.py`` checks that ProcessGuest has every member):

* :class:`SourceGuest` -- :mod:`vmem.migration.source`, :mod:`vmem.migration.savefile`
  (save), the agent and the analysis tools;
* :class:`IncomingGuest` -- :mod:`vmem.migration.destination`,
  :mod:`vmem.migration.savefile` (restore);
* :class:`PostcopyGuest` -- :mod:`vmem.migration.postcopy.destination` (an incoming guest
  that can run before its RAM arrived);
* dirty tracking -- :func:`vmem.tracking.make_tracker` builds a tracker from what the guest
  offers: :class:`vmem.tracking.UffdWpGuest` (its uffd, the uffd's features, the RAM base,
  its pid) or :class:`vmem.tracking.MprotectGuest` (bitmap commands to the guest).
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from guests.launch import GuestSpec, ProcessGuest
from vmem.ram import GuestRam

__all__ = ["SourceGuest", "IncomingGuest", "PostcopyGuest", "PauseResult", "GuestSpec",
           "boot_guest", "BACKENDS", "INCOMING_FACTORIES", "incoming_factory"]


@runtime_checkable
class PauseResult(Protocol):
    """What :meth:`SourceGuest.pause` returns."""

    paused_at_ns: int
    """CLOCK_MONOTONIC when the guest stopped (its last moment of running)."""
    latency_ns: int
    """From asking for the pause to the guest's acknowledgement."""
    context: bytes
    """The context blob saved at the pause: all the destination needs besides RAM."""


@runtime_checkable
class SourceGuest(Protocol):
    """A running guest that can be migrated away (or saved).

    Guarantees the source relies on: after ``pause()`` returns, RAM stays exactly as the
    guest left it until ``resume()``; ``resume(None)`` continues it where it stopped (a
    rolled-back migration); ``exit()`` and ``close()`` free everything the backend built.
    """

    backend_name: str
    """Sent in the preamble and the save file: which :data:`INCOMING_FACTORIES` entry
    builds the destination's guest."""
    spec: GuestSpec
    """``spec.to_json()``: what the destination needs to start an identical guest."""
    npages: int
    ram: GuestRam
    """Mapped in the migrator: the source reads ``ram.pages`` / ``ram.data_runs()``."""
    pid: int
    """The process holding the guest (reports, /proc); -1 if none."""

    def alive(self) -> bool: ...
    def pause(self, timeout_s: float = 10.0) -> PauseResult: ...
    def resume(self, context: bytes | None = None, timeout_s: float = 30.0) -> None: ...
    def counters(self) -> dict: ...
    def set_throttle(self, fraction: float) -> None: ...  # auto-converge; 0.0 = none
    def verify(self, timeout_s: float = 600.0) -> dict: ...
    def verify_running(self) -> dict: ...                  # the same check, the guest not stopped
    def crash_error(self, what: str) -> Exception: ...     # a vmem.errors.GuestCrashed
    def exit(self, timeout_s: float = 5.0) -> int | None: ...
    def close(self) -> int | None: ...


@runtime_checkable
class IncomingGuest(Protocol):
    """A destination guest created before its RAM arrives.

    Guarantees the destination relies on: creating it reads no RAM; ``ram.fd`` accepts
    ``pwrite`` of page data; ``resume(context)`` starts it from the context once RAM is
    complete; ``close()`` removes everything it built.
    """

    npages: int
    ram: GuestRam
    pid: int

    def alive(self) -> bool: ...
    def resume(self, context: bytes | None = None, timeout_s: float = 30.0) -> None: ...
    def wait_first_step(self, timeout_s: float = 10.0) -> int: ...
    def verify(self, timeout_s: float = 600.0) -> dict: ...
    def verify_running(self) -> dict: ...
    def counters(self) -> dict: ...
    def crash_error(self, what: str) -> Exception: ...
    def exit(self, timeout_s: float = 5.0) -> int | None: ...
    def close(self) -> int | None: ...


@runtime_checkable
class PostcopyGuest(IncomingGuest, Protocol):
    """An incoming guest that can run before all of its RAM arrived: the migrator holds a
    userfaultfd registered over the guest's RAM and places pages into ``ram.fd``."""

    uffd_features: int
    """Features UFFDIO_API granted on the guest's uffd, or -errno if it has none."""
    ram_base: int
    """Address of RAM in the address space the uffd belongs to."""

    def uffd(self) -> int: ...  # the guest's userfaultfd, owned by the guest object


#: the backends ``boot_guest`` can start (``--backend``)
BACKENDS = ("process", "kvm")


def boot_guest(spec: GuestSpec, size_bytes: int, backend: str = "process") -> ProcessGuest:
    """Start a new source guest running ``spec`` with ``size_bytes`` of RAM on ``backend``
    (``process``: a process guest; ``kvm``: a KVM VM running guests/kvm/program.S).

    Raises:
        GuestCrashed, GuestUnresponsive: it did not come up (the message says why).
        ValueError: an unknown backend, or a size/workload the backend cannot run (named).
    """
    if backend == "kvm":
        from guests.kvm import KvmGuest

        return KvmGuest.boot(spec, size_bytes)
    if backend != "process":
        raise ValueError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
    return ProcessGuest.boot(spec, size_bytes)


def _process_incoming(spec_json: dict, npages: int) -> IncomingGuest:
    return ProcessGuest.incoming(GuestSpec.from_json(spec_json), npages)


def _kvm_incoming(spec_json: dict, npages: int) -> IncomingGuest:
    from guests.kvm import KvmGuest

    return KvmGuest.incoming(GuestSpec.from_json(spec_json), npages)


#: Backend name (sent in the preamble as ``backend``) -> factory(spec_json, npages).
INCOMING_FACTORIES: dict[str, Callable[[dict, int], IncomingGuest]] = {"process": _process_incoming,
                                                                       "kvm": _kvm_incoming}


def incoming_factory(name: str) -> Callable[[dict, int], IncomingGuest]:
    """The factory for backend ``name``.

    Raises:
        KeyError: no such backend on this host (the caller reports it to the source).
    """
    return INCOMING_FACTORIES[name]
