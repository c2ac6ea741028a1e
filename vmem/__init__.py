"""vmem: a live-migration laboratory for stock Linux.

A *guest* is a real process whose RAM is a memfd viewed through numpy; a *migrator*
moves that RAM to a new process while the guest keeps running, as Xen and QEMU move
virtual machines.

Public API (everything else is internal and may change):

* :mod:`vmem.errors` — the exception hierarchy (``VmemError`` and subclasses), re-exported here.
* :class:`vmem.ram.GuestRam` — memfd-backed RAM with a numpy page view.
* :func:`vmem.tracking.make_tracker` and the tracker classes — dirty tracking.
* :mod:`vmem.migration.policy` — ``Decision``, ``PrecopyStats``, built-in policies.
* :class:`vmem.migration.source.MigrationOptions`, :func:`vmem.migration.source.migrate`.
* :func:`vmem.migration.local.run_local_migration` — one-host migration (what ``vmem migrate`` runs).
* :class:`vmem.migration.report.MigrationReport` — the report (docs/report.md).

docs/architecture.md maps the packages and follows a page through them.
"""
from vmem import errors as _errors
from vmem.errors import *  # noqa: F401,F403  (the hierarchy is public; vmem.errors.__all__ lists it)

__version__ = "0.1.0"

__all__ = [*_errors.__all__, "__version__"]
