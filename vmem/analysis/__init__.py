"""Looking at migrations without running them, and at runs after the fact.

* :mod:`~vmem.analysis.trace` -- recorded dirty pages per interval (.npz), WWS queries.
* :mod:`~vmem.analysis.profile` -- dirty logging without migrating (``vmem profile``).
* :mod:`~vmem.analysis.model` -- the analytical precopy model.
* :mod:`~vmem.analysis.simulate` -- trace-driven simulation of any policy (``vmem predict``).
* :mod:`~vmem.analysis.calibration` -- this host's fixed costs and copy rate (``vmem calibrate``).
* :mod:`~vmem.analysis.compare` -- one workload, several policies (``vmem compare``).
* :mod:`~vmem.analysis.graphs` -- matplotlib PNGs and the HTML report (``vmem graph``).
* :mod:`~vmem.analysis.inspect` -- a migration stream taken apart (``vmem inspect``).

The command lines of these are in :mod:`vmem.cli` (one module per command); nothing here
imports it.
"""
