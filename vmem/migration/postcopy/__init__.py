"""Post-copy migration: the guest runs at the destination before all of its RAM arrived.

* :mod:`.records` -- the post-copy record bodies (PFNS, FAULT) and the urgent page channel's
  framing;
* :mod:`.source` -- :class:`PostcopySource`: serves demand faults ahead of a background push
  that starts from the neighbourhood of recent faults;
* :mod:`.destination` -- :class:`PostcopyDestination`: holds the guest's userfaultfd, knows
  which pages are present at every moment, places pages atomically.

See docs/postcopy.md for the protocol and the failure semantics.
"""
import os

from vmem.format.postcopy import MAX_PFNS_PER_RECORD, decode_pfn_list, encode_pfn_list

__all__ = ["MAX_PFNS_PER_RECORD", "encode_pfn_list", "decode_pfn_list", "drop_links", "native_link",
           "FAULT_SCHEDS", "fault_sched_limit", "fault_sched_refusal", "fault_cpu_refusal", "fault_cpu_stat", "cpu_list",
           "is_cpu_number"]

#: How the post-copy fault threads are scheduled (``--fault-sched``), on both hosts:
#: ``default`` -- nice -15 with a 0.1 ms EEVDF slice where the host permits them: the lowest
#: median fault round trip, but a woken fault thread may be passed over for a few ms while
#: the push's threads run (docs/postcopy.md); ``fifo`` -- SCHED_FIFO: never passed over by
#: them, at the cost of a reschedule IPI on most wake-ups (a higher median).
FAULT_SCHEDS = ("default", "fifo")


def fault_sched_limit(sched: str) -> int | None:
    """The ``vmem._native.PC_PRIO_*`` a fault thread asks for under ``sched``, or None for
    the process default."""
    from vmem import _native as nat

    return nat.PC_PRIO_FIFO if sched == "fifo" else None


def fault_sched_refusal(sched: str, side: str) -> str | None:
    """Why this host (``side``: "source" or "destination", for the message) cannot schedule
    its fault threads as ``sched`` asks, or None if it can -- asked of a thread started for
    the purpose, before any page moves, so that a migration asked to run them as SCHED_FIFO
    never runs with less.  ``sched`` is one of :data:`FAULT_SCHEDS` (the callers check)."""
    if sched != "fifo":
        return None
    from vmem import _native as nat
    from vmem.migration import inject

    try:
        got, what = nat.fault_thread_priority(nat.PC_PRIO_FIFO)
    except OSError as err:
        return f"the {side} could not start a thread to try SCHED_FIFO ({err})"
    if inject.fifo_refused(side):
        why = f"refused on purpose: {inject.FIFO_REFUSED_ENV}"
    elif got != nat.PC_PRIO_FIFO:
        why = f"a thread there got {what}"
    else:
        return None
    return (f"the {side} host does not permit SCHED_FIFO for the post-copy fault threads ({why}; it needs "
            f"CAP_SYS_NICE or an RLIMIT_RTPRIO of at least {nat.PC_RT_PRIORITY}): run vmem there as root or raise "
            "that limit (ulimit -r), or migrate without --fault-sched fifo")


def is_cpu_number(value) -> bool:
    """``--fault-cpu``'s value is a CPU number the fault threads can be pinned to: an int
    (not a bool) in 0 .. ``vmem._native.MAX_FAULT_CPU`` - 1.  Checked by the options and by
    the destination's reading of the preamble (the native layer checks its argument itself:
    it cannot import this package)."""
    from vmem import _native as nat

    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < nat.MAX_FAULT_CPU


def fault_cpu_refusal(cpu: int | None, side: str) -> str | None:
    """Why this host (``side``: "source" or "destination", for the message) cannot pin its
    fault thread to ``cpu`` (``--fault-cpu``), or None if it can (None: no pin asked) --
    checked before any page moves, so that a migration asked to pin never runs unpinned:
    the CPU must be one this process may run on (its affinity mask, which a cpuset or
    ``taskset`` narrows)."""
    if cpu is None:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if cpu in allowed:
        return None
    return (f"CPU {cpu} is not one the {side}'s vmem may run on (its CPUs: {cpu_list(allowed)}); "
            "pick one of those, or migrate without --fault-cpu")


def cpu_list(cpus: list[int]) -> str:
    """``0-3,6`` for [0, 1, 2, 3, 6]."""
    out, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def fault_cpu_stat(value: int) -> int | str | None:
    """A fault thread's ``cpu`` statistic for the report: the CPU it ran pinned to, None
    (not pinned), or ``"refused: <reason>"`` (the kernel refused the pin; it ran unpinned)."""
    if value >= 0:
        return int(value)
    if value == -1:
        return None
    return f"refused: {os.strerror(-value)}"


def native_link(channel) -> tuple[int, dict | None]:
    """``(fd, mac)`` for the native fault thread that takes over the urgent ``channel``: its
    socket, and the integrity state of a keyed (MacChannel) link, which the thread then
    speaks itself (``channel`` must not be used for data afterwards); ``mac`` is None for a
    plain socket channel."""
    handoff = getattr(channel, "native_handoff", None)
    return channel.fileno(), (handoff() if handoff is not None else None)


def drop_links(*channels) -> None:
    """Close the connections of a post-copy whose link broke (None entries skipped).

    Recovery keeps both sides' state and drops only the links: each side closes what is
    left of its main and urgent connections, quietly (they are already broken), and waits
    for new ones.
    """
    from transport import TransportError

    for ch in channels:
        if ch is not None:
            try:
                ch.close()
            except (TransportError, OSError):
                pass
