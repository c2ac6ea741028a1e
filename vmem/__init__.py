"""vmem: a live-migration laboratory for stock Linux.

A *guest* is a real process whose RAM is a memfd viewed through numpy; a *migrator*
moves that RAM to a new process while the guest keeps running, as Xen and QEMU move
virtual machines.

Public API (everything else is internal and may change):

* :mod:`vmem.errors` — the exception hierarchy (``VmemError`` and subclasses).
* :class:`vmem.ram.GuestRam` — memfd-backed RAM with a numpy page view.
* :func:`vmem.tracking.make_tracker` and the tracker classes — dirty tracking.
* :mod:`vmem.migration.policy` — ``Decision``, ``PrecopyStats``, built-in policies.
* :class:`vmem.migration.source.MigrationOptions`, :func:`vmem.migration.source.migrate`.
* :func:`vmem.migration.local.run_local_migration` — one-host migration (what ``vmem migrate`` runs).
* :class:`vmem.migration.report.MigrationReport` — the report (docs/report.md).
"""
from vmem.errors import (
    ConfigError,
    FeatureUnavailable,
    GuestCrashed,
    GuestError,
    MigrationError,
    PolicyError,
    StreamError,
    TrackerUnavailable,
    VmemError,
)

__version__ = "0.1.0"

__all__ = [
    "VmemError",
    "ConfigError",
    "FeatureUnavailable",
    "TrackerUnavailable",
    "StreamError",
    "MigrationError",
    "GuestError",
    "GuestCrashed",
    "PolicyError",
    "__version__",
]
