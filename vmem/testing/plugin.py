"""vmem's pytest plugin (entry point ``pytest11``: loaded by every pytest once vmem is
installed; ``-p vmem.testing.plugin`` from a checkout).

Fixtures (all reap every process they start, whatever the test does):

* ``vmem_guest`` -- factory ``vmem_guest(workload="hotcold", size="32M", seed=1, **params)``
  boots a source guest (a built-in workload or ``module:Class``) and returns it running.
* ``vmem_migrate`` -- ``vmem_migrate(guest, *, mode="precopy", policy="xen",
  policy_options=None, tracker="auto", bandwidth=None, observe_s=0.2, warmup_s=0.0)``
  migrates it on this host and returns the report dict (docs/report.md).  ``mode``:
  precopy, postcopy or hybrid; ``bandwidth``: ``"100M"``-style or bytes/s.

Markers:

* ``@pytest.mark.vmem_kernel("WP_ASYNC", "PAGEMAP_SCAN", ...)`` -- skip, naming the feature
  and why, where the kernel lacks one (names as ``vmem doctor`` prints them).
* ``@pytest.mark.vmem_alone`` -- a timing measurement: under pytest-xdist it runs with no
  other vmem test running on this host (an exclusive lock; every other test that boots a
  vmem guest through these fixtures holds it shared).

Bench cells as pytest items (spread with ``-n N``)::

    pytest -p vmem.testing.plugin --pyargs vmem.testing.bench_cells --vmem-bench standard \\
           --vmem-bench-out runs.jsonl -n 2
    vmem bench --results runs.jsonl --baseline b.json

Each (cell, repeat) is one item, marked ``vmem_alone`` unless ``--vmem-bench-shared``.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

import pytest

__all__ = ["pytest_addoption", "pytest_configure", "pytest_generate_tests", "vmem_guest", "vmem_migrate"]

_ALONE_LOCK = "vmem-alone.lock"


def pytest_addoption(parser) -> None:
    g = parser.getgroup("vmem", "vmem regression runs")
    g.addoption("--vmem-bench", metavar="SUITE|FILE.toml", default=None,
                help="make one test item per bench cell and repeat (vmem.testing.bench_cells)")
    g.addoption("--vmem-bench-out", metavar="FILE", default="vmem-bench.jsonl",
                help="results file the bench items append to (default vmem-bench.jsonl)")
    g.addoption("--vmem-bench-repeats", type=int, default=None, metavar="N", help="override the matrix's repeats")
    g.addoption("--vmem-bench-shared", action="store_true",
                help="do not pin bench items to run alone (faster; timing figures then share the CPUs)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "vmem_kernel(*features): skip unless the kernel offers these features "
                                       "(names as vmem doctor prints them)")
    config.addinivalue_line("markers", "vmem_alone: a timing measurement; under xdist no other vmem test runs meanwhile")


def _lock_path(config, tmp_path_factory) -> str:
    """One lock file per test run, in pytest's own temporary directory (shared by the
    xdist workers: theirs are sub-directories of the controller's)."""
    base = tmp_path_factory.getbasetemp()
    if hasattr(config, "workerinput"):
        base = base.parent
    return os.path.join(str(base), _ALONE_LOCK)


@contextlib.contextmanager
def _hold(path: str, exclusive: bool):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


@pytest.fixture
def _vmem_lock(request, tmp_path_factory):
    """Hold the run's lock: exclusively for ``vmem_alone`` items, shared otherwise."""
    with _hold(_lock_path(request.config, tmp_path_factory), request.node.get_closest_marker("vmem_alone") is not None):
        yield


@pytest.fixture(autouse=True)
def _vmem_markers(request):
    """``vmem_kernel``: skip where a feature is missing; ``vmem_alone``: hold the lock
    exclusively even in a test that boots nothing through the vmem fixtures."""
    if request.node.get_closest_marker("vmem_alone") is not None:
        request.getfixturevalue("_vmem_lock")
    marker = request.node.get_closest_marker("vmem_kernel")
    if marker is not None:
        from vmem.testing import feature_missing

        try:
            why = feature_missing(*marker.args)
        except ValueError as err:
            pytest.fail(f"vmem_kernel marker: {err}", pytrace=False)
        if why:
            pytest.skip(why)


@pytest.fixture
def vmem_guest(_vmem_lock):
    """Factory: boot a source guest; every guest is closed (reaped) after the test."""
    from vmem.bench.matrix import typed_params
    from vmem.migration.backend import GuestSpec, boot_guest
    from vmem.ram import parse_size

    guests = []

    def boot(workload: str = "hotcold", size="32M", seed: int = 1, **params):
        g = boot_guest(GuestSpec(workload, typed_params(workload, params), seed), parse_size(size))
        guests.append(g)
        return g

    yield boot
    for g in guests:
        g.close()


@pytest.fixture
def vmem_migrate(_vmem_lock):
    """``vmem_migrate(guest, **how) -> report dict``: a one-host live migration."""
    def migrate(guest, *, mode: str = "precopy", policy: str = "xen", policy_options: dict | None = None,
                tracker: str = "auto", bandwidth=None, observe_s: float = 0.2, warmup_s: float = 0.0) -> dict:
        import time

        from vmem.bench.matrix import MODES
        from vmem.analysis.compare import build_policies
        from vmem.errors import ConfigError
        from vmem.migration.local import run_local_migration
        from vmem.migration.source import MigrationOptions
        from vmem.units import bandwidth_from_arg

        if mode not in MODES:
            raise ConfigError("mode", f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        [(_, pol, _)], _ = build_policies([policy], policy_options or {})
        bw = bandwidth if isinstance(bandwidth, (int, float)) or bandwidth is None else bandwidth_from_arg(bandwidth)
        if warmup_s:
            time.sleep(warmup_s)
        options = MigrationOptions(tracker=tracker, policy=pol, observe_s=observe_s, bandwidth_Bps=bw,
                                   postcopy=MODES[mode])
        return run_local_migration(guest, options).to_dict()

    return migrate


# --- bench cells as items -----------------------------------------------------------------
def _bench_matrix(config):
    from vmem.bench.matrix import load_matrix, suite_matrix

    spec = config.getoption("--vmem-bench")
    m = load_matrix(spec) if spec.endswith(".toml") else suite_matrix(spec)
    repeats = config.getoption("--vmem-bench-repeats")
    if repeats:
        m.repeats = repeats
    return m


def pytest_generate_tests(metafunc) -> None:
    if "vmem_bench_case" not in metafunc.fixturenames:
        return
    if not metafunc.config.getoption("--vmem-bench"):
        metafunc.parametrize("vmem_bench_case", [pytest.param(None, marks=pytest.mark.skip(
            reason="no --vmem-bench SUITE|FILE.toml given"))])
        return
    m = _bench_matrix(metafunc.config)
    alone = () if metafunc.config.getoption("--vmem-bench-shared") else (pytest.mark.vmem_alone,)
    params = []
    for repeat in range(m.repeats):  # interleaved: every cell once per repeat
        for cell in (m.cells if repeat % 2 == 0 else m.cells[::-1]):
            params.append(pytest.param((m, cell, repeat), id=f"r{repeat}-{cell.cell_id}", marks=alone))
    metafunc.parametrize("vmem_bench_case", params)


def _session(config) -> str:
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and workerinput.get("testrunuid"):
        return str(workerinput["testrunuid"])[:12]
    if not hasattr(config, "_vmem_session"):
        import uuid

        config._vmem_session = uuid.uuid4().hex[:12]
    return config._vmem_session


@pytest.fixture
def vmem_bench_run(request, vmem_bench_case, _vmem_lock):
    """Run one bench cell once; append its record to ``--vmem-bench-out``; return it."""
    from vmem.bench.runner import append_record, run_cell, run_record

    m, cell, repeat = vmem_bench_case
    report, calibration = run_cell(cell, seed=m.seed, warmup_s=m.warmup_s, observe_s=m.observe_s)
    rec = run_record(cell, report, repeat=repeat, order=-1, session=_session(request.config), suite=m.name,
                     calibration_ms=calibration)
    append_record(request.config.getoption("--vmem-bench-out"), rec)
    return rec
