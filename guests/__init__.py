"""Guests: real processes whose RAM is a memfd, running a workload in short steps.

* :mod:`guests.workload` — the ``Workload`` API (for your own workloads) and the built-ins.
* :mod:`guests.memory` — ``GuestMemory``: page stamps, the ledger, verification.
* :mod:`guests.launch` — ``ProcessGuest``: spawn, command, pause/resume and reap a guest.
* :mod:`guests.control` — the shared control block protocol.
"""
