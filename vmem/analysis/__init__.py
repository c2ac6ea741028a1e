"""Looking at migrations without running them, and at runs after the fact.

* :mod:`~vmem.analysis.trace` -- recorded dirty pages per interval (.npz), WWS queries.
* :mod:`~vmem.analysis.profile` -- ``vmem profile``: dirty logging without migrating.
* :mod:`~vmem.analysis.model` -- the analytical precopy model.
* :mod:`~vmem.analysis.simulate` -- trace-driven simulation of any policy; ``vmem predict``.
* :mod:`~vmem.analysis.compare` -- ``vmem compare``: one workload, several policies.
* :mod:`~vmem.analysis.graphs` -- matplotlib PNGs and the HTML report.
"""
