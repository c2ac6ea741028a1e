"""Regression runs (``vmem bench``, docs/bench.md): a scenario matrix, repeated runs stored
as JSON lines, baselines, noise-aware verdicts, HTML and trend views.

Modules: :mod:`~vmem.bench.matrix` (cells, TOML files, built-in suites),
:mod:`~vmem.bench.runner` (interleaved runs, results files, baselines, A/B against another
checkout), :mod:`~vmem.bench.cell` (one run in its own process),
:mod:`~vmem.bench.calibrate` (the machine's speed before each run),
:mod:`~vmem.bench.metrics` (figures read from a report), :mod:`~vmem.bench.verdict` (the
rule), :mod:`~vmem.bench.html` (the per-run page and the trend view).  The pytest plugin
built on them is :mod:`vmem.testing`.
"""
