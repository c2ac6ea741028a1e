"""Regression runs (``vmem bench``, docs/bench.md): a scenario matrix, repeated runs stored
as JSON lines, baselines, noise-aware verdicts, HTML and trend views.

Modules: :mod:`~vmem.bench.matrix` (cells, TOML files, built-in suites),
:mod:`~vmem.bench.runner` (runs, results files, baselines), :mod:`~vmem.bench.metrics`
(figures read from a report), :mod:`~vmem.bench.verdict` (the rule),
:mod:`~vmem.bench.html` (the per-run report and the trend view).
"""
