"""The life cycle of a migration: one enum per side, one transition table, one setter.

Modelled on QEMU's ``migrate_set_state(&s->state, old, new)``: the state changes only
through :meth:`StateCell.set`, a compare-and-set in which the caller names the state it
expects to leave; a transition that is not in the table, or a state that is not the
expected one, raises :class:`IllegalTransition` and leaves the state as it was.

Source (:class:`SourceState`; the report's ``outcome`` is :attr:`SourceState.outcome`)::

    SETUP ──> PRECOPY ──> STOP_AND_COPY ──> ENDED ────────────> COMMITTED ──> COMPLETED
      │          │  └─────────> ABORTED                           ^
      │          v                                                │
      └──> POSTCOPY_SWITCH ──> POSTCOPY_ACTIVE ──> POSTCOPY_ENDED ┘
                                 ^        │              │
                                 │        v              v
                      POSTCOPY_RECOVER <── POSTCOPY_PAUSED   (link broke after the switch,
                                 └───────> POSTCOPY_PAUSED    recovery on: outcome "paused")

    every state that is not COMPLETED, ABORTED or POSTCOPY_PAUSED may go to FAILED.

What the states promise (the failure paths of :class:`~vmem.migration.source.SourceMigration`
read them instead of flags):

* ``switched`` (POSTCOPY_ACTIVE .. POSTCOPY_RECOVER): the destination's guest may run; the
  source guest must never be resumed by us again.
* ``stream_ended`` (ENDED, POSTCOPY_ENDED, COMMITTED, COMPLETED): the forward stream is
  complete, so a rollback is a ROLLBACK record rather than a closed connection.
* ``committed`` (COMMITTED, COMPLETED): the destination owns the guest.

Destination (:class:`DestinationState`; its values are the phase names its ERROR records
carry)::

    SETUP ──> RECEIVE ──> RESUME ──> VERIFY ──> COMMIT
                 │          ^          ^
                 v          │          │
              POSTCOPY ─────┴──────────┘   (-> RESUME: BEGIN but no TRANSITION before END,
                                            the guest resumes as after pre-copy)

    The destination has no outcome states: it ends by returning its exit status (0 once
    committed) or raising; whatever fails, it discards the incoming guest.
"""
from __future__ import annotations

import enum
import threading

__all__ = [
    "IllegalTransition",
    "SourceState",
    "SOURCE_TRANSITIONS",
    "DestinationState",
    "DESTINATION_TRANSITIONS",
    "StateCell",
]


class IllegalTransition(RuntimeError):
    """A state change the table forbids, or from a state other than the one expected.

    A programming error, not a migration failure: it is never raised by a peer's behaviour.
    """


class SourceState(enum.Enum):
    """Where the source side of a migration is (see the module docstring's diagram)."""

    SETUP = "setup"                        # preamble sent, waiting for READY
    PRECOPY = "precopy"                    # tracking armed, rounds running
    STOP_AND_COPY = "stop-and-copy"        # pausing the guest, sending the final set
    ENDED = "ended"                        # stream complete: the destination resumes and proves it
    POSTCOPY_SWITCH = "postcopy-switch"    # BEGIN sent, pausing: the destination guest does not run yet
    POSTCOPY_ACTIVE = "postcopy-active"    # TRANSITION sent: the destination guest runs, we push and serve faults
    POSTCOPY_ENDED = "postcopy-ended"      # COMPLETE and END sent: waiting for every page to be placed
    POSTCOPY_PAUSED = "paused"             # the link broke after the switch; resumable
    POSTCOPY_RECOVER = "postcopy-recover"  # resuming a paused post-copy over a new connection
    COMMITTED = "committed"                # COMMIT sent: the destination owns the guest
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def outcome(self) -> str:
        """The report's ``outcome`` in this state (docs/report.md): "completed", "aborted",
        "failed" or "paused"; a migration that has not reached an outcome reads "failed"
        (if it stopped there, it failed)."""
        return _SOURCE_OUTCOMES.get(self, "failed")

    @property
    def switched(self) -> bool:
        """The destination's guest may run: the source guest is never resumed by us again."""
        return self in _SWITCHED

    @property
    def stream_ended(self) -> bool:
        """The forward stream is complete (a rollback needs a ROLLBACK record)."""
        return self in _STREAM_ENDED

    @property
    def committed(self) -> bool:
        return self in (SourceState.COMMITTED, SourceState.COMPLETED)


_S = SourceState
_SOURCE_OUTCOMES = {_S.COMMITTED: "completed", _S.COMPLETED: "completed", _S.ABORTED: "aborted",
                    _S.POSTCOPY_PAUSED: "paused"}
_SWITCHED = frozenset({_S.POSTCOPY_ACTIVE, _S.POSTCOPY_ENDED, _S.POSTCOPY_PAUSED, _S.POSTCOPY_RECOVER})
_STREAM_ENDED = frozenset({_S.ENDED, _S.POSTCOPY_ENDED, _S.COMMITTED, _S.COMPLETED})

#: Source transitions: state -> the states it may go to.
SOURCE_TRANSITIONS: dict[SourceState, frozenset[SourceState]] = {
    _S.SETUP: frozenset({_S.PRECOPY, _S.POSTCOPY_SWITCH, _S.FAILED}),
    _S.PRECOPY: frozenset({_S.STOP_AND_COPY, _S.POSTCOPY_SWITCH, _S.ABORTED, _S.FAILED}),
    _S.STOP_AND_COPY: frozenset({_S.ENDED, _S.FAILED}),
    _S.ENDED: frozenset({_S.COMMITTED, _S.FAILED}),
    _S.POSTCOPY_SWITCH: frozenset({_S.POSTCOPY_ACTIVE, _S.FAILED}),
    _S.POSTCOPY_ACTIVE: frozenset({_S.POSTCOPY_ENDED, _S.POSTCOPY_PAUSED, _S.FAILED}),
    _S.POSTCOPY_ENDED: frozenset({_S.COMMITTED, _S.POSTCOPY_PAUSED, _S.FAILED}),
    _S.POSTCOPY_PAUSED: frozenset({_S.POSTCOPY_RECOVER}),
    _S.POSTCOPY_RECOVER: frozenset({_S.POSTCOPY_ACTIVE, _S.POSTCOPY_PAUSED, _S.FAILED}),
    # A failure after COMMIT (exiting the source guest, asking for the final report)
    # still reads "failed", as it always has.
    _S.COMMITTED: frozenset({_S.COMPLETED, _S.FAILED}),
    _S.COMPLETED: frozenset(),
    _S.ABORTED: frozenset(),
    _S.FAILED: frozenset(),
}


class DestinationState(enum.Enum):
    """Where the destination side is; the values are the phases its ERROR records name."""

    SETUP = "setup"        # preamble read, incoming guest spawned, READY sent
    RECEIVE = "receive"    # placing pre-copied pages
    POSTCOPY = "postcopy"  # BEGIN seen: pending pages marked, guest resumed at TRANSITION
    RESUME = "resume"      # stream ended (pre-copy): resuming the guest
    VERIFY = "verify"      # digests and the guest's ledger check sent
    COMMIT = "commit"      # waiting for COMMIT, then the final report


_D = DestinationState
#: Destination transitions: state -> the states it may go to.
DESTINATION_TRANSITIONS: dict[DestinationState, frozenset[DestinationState]] = {
    _D.SETUP: frozenset({_D.RECEIVE}),
    _D.RECEIVE: frozenset({_D.POSTCOPY, _D.RESUME}),
    _D.POSTCOPY: frozenset({_D.RESUME, _D.VERIFY}),
    _D.RESUME: frozenset({_D.VERIFY}),
    _D.VERIFY: frozenset({_D.COMMIT}),
    _D.COMMIT: frozenset(),
}


class StateCell:
    """One migration's state; changed only by :meth:`set` (compare-and-set).

    Args:
        initial: the starting state.
        table: state -> states it may go to (:data:`SOURCE_TRANSITIONS`, ...).
        on_change: called with the new state after every change (outside the lock).

    Guarantee: the state is always one the table reaches from ``initial``; a refused
    change raises and changes nothing.  Safe to call from several threads.
    """

    def __init__(self, initial: enum.Enum, table: dict, on_change=None):
        self._state = initial
        self._table = table
        self._on_change = on_change
        self._lock = threading.Lock()

    @property
    def state(self):
        return self._state

    def set(self, expected, new) -> None:
        """Move from ``expected`` to ``new``.

        Raises:
            IllegalTransition: the state is not ``expected``, or the table has no
                ``expected -> new`` edge.
        """
        with self._lock:
            if self._state is not expected:
                raise IllegalTransition(f"expected state {expected.name} to go to {new.name}, but it is {self._state.name}")
            if new not in self._table[expected]:
                raise IllegalTransition(f"illegal transition {expected.name} -> {new.name}")
            self._state = new
        if self._on_change is not None:
            self._on_change(new)
