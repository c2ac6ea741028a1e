"""The agent's guests: names, states and the memory they hold.

Every guest of an agent has one :class:`GuestEntry` under a unique name.  Its ``state``
changes only through :meth:`GuestRegistry.transition` (compare-and-set under one lock, as
QEMU's ``migrate_set_state``), so two requests can never both win a guest: a ``destroy``
racing a ``migrate`` finds the guest ``migrating`` and is refused.

States::

    creating  --boot ok-->  running  --migrate-->  migrating  --completed--> (removed)
    incoming  --commit-->   running                migrating  --failed-----> running
    restoring --ok------->  running  --save------> saving     --done-------> running | (removed)
    running   --destroy-->  (removed)
    (taken over at start) -> running | paused | lost  --destroy--> (removed)

``lost``: a guest recorded by an earlier agent on this state directory that died while no
agent ran, or that could not be taken over (``reason`` says which); listed until destroyed.

``creating``, ``incoming`` and ``restoring`` entries *reserve* their RAM: free memory for a
new guest is MemAvailable minus what reservations will still allocate, so two concurrent
creates cannot both pass the check and then exhaust the host.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from vmem.ram import format_bytes, mem_available_bytes
from vmem.agent.protocol import AgentError, ErrorCode

__all__ = ["GuestEntry", "GuestRegistry", "RESERVING_STATES", "validate_name"]

#: States whose RAM is not allocated yet (counted against free memory).
RESERVING_STATES = frozenset({"creating", "incoming", "restoring"})
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_NAME_CHARS = 64


def validate_name(name) -> str:
    """A guest name: 1..64 of ``[A-Za-z0-9._-]``, not starting with ``-`` or ``.``.

    Raises:
        AgentError(bad-request): anything else.
    """
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or not set(name) <= _NAME_CHARS \
            or name[0] in "-.":
        raise AgentError(ErrorCode.BAD_REQUEST, f"invalid guest name {name!r}: use 1-{MAX_NAME_CHARS} letters, digits, "
                                                "'.', '_' or '-', not starting with '-' or '.'")
    return name


@dataclass
class GuestEntry:
    """One guest of the agent.

    Attributes:
        name: unique on this agent (and kept across migrations).
        state: see the module docstring.
        size_bytes: guest RAM.
        spec: the guest's description (``GuestSpec.to_json()``): workload, params, seed.
        guest: the :class:`guests.launch.ProcessGuest`, or None while not running here yet.
        origin: how it got here: ``created``, ``migrated from HOST:PORT``, ``restored from FILE``.
        since_s: CLOCK_MONOTONIC seconds of the last state change.
    """

    name: str
    state: str
    size_bytes: int
    spec: dict
    guest: object = None
    origin: str = "created"
    since_s: float = field(default_factory=time.monotonic)
    #: state "paused": a post-copy whose link broke after the switch, resumable with
    #: ``vmem migrate --resume NAME`` (the SourceMigration and how to reach the destination)
    postcopy_resume: object = None
    #: state "lost": why (one line)
    reason: str = ""

    def describe(self) -> dict:
        """A JSON row for ``vmem list``."""
        row = {"name": self.name, "state": self.state, "size_bytes": self.size_bytes,
               "workload": self.spec.get("workload"), "params": self.spec.get("params") or {},
               "seed": self.spec.get("seed"), "origin": self.origin, "pid": None,
               "steps": None, "guest_time_s": None, "alive": None}
        if self.reason:
            row["reason"] = self.reason
        g = self.guest
        if g is not None:
            row["pid"] = g.pid
            row["alive"] = g.alive()
            try:
                c = g.counters()
                row["steps"] = c["steps"]
                row["guest_time_s"] = round(c["vclock_s"], 1)
            except Exception:  # a guest torn down under us: the row still lists it
                pass
        return row


class GuestRegistry:
    """Thread-safe name -> :class:`GuestEntry` table with compare-and-set state changes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, GuestEntry] = {}
        #: ``on_change(entry, removed)``, called under the lock after every change (the
        #: agent keeps its guest records with it); its exceptions are its own to handle.
        self.on_change = None

    def _changed(self, entry: GuestEntry, removed: bool) -> None:
        if self.on_change is not None:
            self.on_change(entry, removed)

    def adopt(self, entry: GuestEntry) -> GuestEntry:
        """Add an entry found at start (a guest taken over, or a lost one); the name must be free.

        Raises:
            AgentError(exists | bad-request): the name is taken or invalid.
        """
        validate_name(entry.name)
        with self._lock:
            if entry.name in self._entries:
                raise AgentError(ErrorCode.EXISTS, f"a guest named {entry.name!r} already exists here")
            self._entries[entry.name] = entry
            return entry

    def reserve(self, name: str, state: str, size_bytes: int, spec: dict, origin: str) -> GuestEntry:
        """Add a new entry in a reserving state after checking the name and free memory.

        Raises:
            AgentError(exists): the name is taken (in any state).
            AgentError(too-big): MemAvailable minus pending reservations is below ``size_bytes``.
        """
        validate_name(name)
        with self._lock:
            if name in self._entries:
                other = self._entries[name]
                raise AgentError(ErrorCode.EXISTS, f"a guest named {name!r} already exists here ({other.state}): "
                                                   "choose another name or destroy it first")
            free = self._free_bytes_locked()
            if size_bytes > free:
                raise AgentError(ErrorCode.TOO_BIG, f"guest {name!r} needs {format_bytes(size_bytes)} but this host has "
                                                    f"only {format_bytes(free)} of memory free: choose a smaller --size "
                                                    "or free memory (destroy a guest)")
            entry = GuestEntry(name, state, size_bytes, dict(spec), origin=origin)
            self._entries[name] = entry
            return entry

    def free_bytes(self) -> int:
        """Memory a new guest may take: MemAvailable minus RAM still to be allocated by reservations."""
        with self._lock:
            return self._free_bytes_locked()

    def _free_bytes_locked(self) -> int:
        pending = sum(e.size_bytes for e in self._entries.values() if e.state in RESERVING_STATES)
        return max(mem_available_bytes() - pending, 0)

    def get(self, name: str) -> GuestEntry:
        """Raises AgentError(no-such-guest)."""
        with self._lock:
            try:
                return self._entries[name]
            except KeyError:
                raise AgentError(ErrorCode.NO_SUCH_GUEST, f"no guest named {name!r} on this agent "
                                                          "(vmem list shows its guests)") from None

    def transition(self, name: str, old: str | frozenset, new: str, *, guest=None) -> GuestEntry:
        """Move ``name`` from state ``old`` (or any of a set) to ``new``; optionally attach ``guest``.

        Raises:
            AgentError(no-such-guest): no such entry.
            AgentError(busy): the entry is in another state (the message names it).
        """
        olds = {old} if isinstance(old, str) else set(old)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                raise AgentError(ErrorCode.NO_SUCH_GUEST, f"no guest named {name!r} on this agent (vmem list shows its guests)")
            if entry.state not in olds:
                raise AgentError(ErrorCode.BUSY, f"guest {name!r} is {entry.state}, not {' or '.join(sorted(olds))}: "
                                                 "wait until it is running and try again")
            entry.state = new
            entry.since_s = time.monotonic()
            if guest is not None:
                entry.guest = guest
            self._changed(entry, False)
            return entry

    def remove(self, name: str, state: str | frozenset | None = None) -> GuestEntry | None:
        """Remove ``name`` (only if in ``state`` when given); returns the entry or None."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            if state is not None and entry.state not in ({state} if isinstance(state, str) else state):
                return None
            self._entries.pop(name)
            self._changed(entry, True)
            return entry

    def entries(self) -> list[GuestEntry]:
        """A snapshot, sorted by name."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name)
