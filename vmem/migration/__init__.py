"""The migrator: what moves a guest's RAM and context from a source to a destination.

* :mod:`~vmem.migration.source` -- the source side: precopy rounds, stop-and-copy, commit/rollback.
* :mod:`~vmem.migration.destination` -- the destination side: receive, place, resume, confirm.
* :mod:`~vmem.migration.postcopy` -- demand paging and the background push after the switch.
* :mod:`~vmem.migration.policy`, :mod:`~vmem.migration.convergence` -- when to stop precopy.
* :mod:`~vmem.migration.backend` -- the guest backend protocols the migrator drives.
* :mod:`~vmem.migration.report` -- the run report (docs/report.md).
* :mod:`~vmem.migration.savefile` -- the stream in an xl save file.
* :mod:`~vmem.migration.local` -- one-host orchestration (source + destination process).

Dependencies point one way: this package uses :mod:`vmem.format`, :mod:`vmem.tracking`,
:mod:`transport` and the guests behind :mod:`~vmem.migration.backend`; it knows nothing
of the CLI, the agent or the analysis tools.
"""
