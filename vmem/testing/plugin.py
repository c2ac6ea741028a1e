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
  other vmem test running on this machine (an exclusive lock; every other test that boots a
  vmem guest through these fixtures holds it shared).  ini ``vmem_alone_markers = serial``
  makes your own markers mean the same; ini ``vmem_lock_all = true`` makes every test, not
  only those with vmem fixtures, hold the lock shared -- then a ``vmem_alone`` test runs
  with no other test at all running (vmem's own suite does both).

Bench cells as pytest items (spread with ``-n N``)::

    pytest -p vmem.testing.plugin --pyargs vmem.testing.bench_cells --vmem-bench standard \\
           --vmem-bench-out runs.jsonl -n 2
    vmem bench --results runs.jsonl --baseline b.json

Each (cell, repeat) is one item, marked ``vmem_alone`` unless ``--vmem-bench-shared``.
Workers send their records back with their test reports (``user_properties``) and only the
controlling pytest writes ``--vmem-bench-out``, so workers may run anywhere an execnet
gateway reaches (``--tx``: other hosts, network namespaces); every record names the worker
and the host it ran on (``worker``: xdist id, hostname, network namespace, IPv4 addresses).
An item that ran no cell (its worker crashed, a fixture failed) is written as a failed run,
so the results are complete.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

import pytest

__all__ = ["pytest_addoption", "pytest_configure", "pytest_generate_tests", "vmem_guest", "vmem_migrate"]

_ALONE_LOCK = "vmem-alone.lock"
#: user_properties key under which a worker sends a bench record to the controller.
_RECORD_PROPERTY = "vmem_bench_record"


def pytest_addoption(parser) -> None:
    g = parser.getgroup("vmem", "vmem regression runs")
    g.addoption("--vmem-bench", metavar="SUITE|FILE.toml", default=None,
                help="make one test item per bench cell and repeat (vmem.testing.bench_cells)")
    g.addoption("--vmem-bench-out", metavar="FILE", default="vmem-bench.jsonl",
                help="results file the bench items append to (default vmem-bench.jsonl)")
    g.addoption("--vmem-bench-repeats", type=int, default=None, metavar="N", help="override the matrix's repeats")
    g.addoption("--vmem-bench-shared", action="store_true",
                help="do not pin bench items to run alone (faster; timing figures then share the CPUs)")
    g.addoption("--vmem-bench-session", metavar="ID", default=None,
                help="session id of the records (default: a new one per pytest run, shared by its workers)")
    parser.addini("vmem_alone_markers", type="args", default=[],
                  help="markers that mean vmem_alone (e.g. a project's own 'serial')")
    parser.addini("vmem_lock_all", type="bool", default=False,
                  help="every test holds the vmem_alone lock shared, not only tests using vmem fixtures")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "vmem_kernel(*features): skip unless the kernel offers these features "
                                       "(names as vmem doctor prints them)")
    config.addinivalue_line("markers", "vmem_alone: a timing measurement; under xdist no other vmem test runs meanwhile")
    if config.getoption("--vmem-bench") and not hasattr(config, "workerinput"):  # the controlling pytest
        if not config.getoption("--vmem-bench-session"):
            import uuid  # decided once, here; _BenchRecordWriter hands it to every xdist worker

            config.option.vmem_bench_session = uuid.uuid4().hex[:12]
        config.pluginmanager.register(_BenchRecordWriter(config), "vmem-bench-writer")


def _lock_path(config, tmp_path_factory=None) -> str:
    """One lock file per test run, in pytest's own temporary directory (shared by the
    xdist workers on this machine: theirs are sub-directories of the controller's)."""
    base = (tmp_path_factory or config._tmp_path_factory).getbasetemp()
    if hasattr(config, "workerinput"):
        base = base.parent
    return os.path.join(str(base), _ALONE_LOCK)


@contextlib.contextmanager
def _hold(path: str, exclusive: bool):
    """Hold the lock at ``path`` shared or exclusively until the block ends.

    Fair to an exclusive waiter: everyone first passes a gate (``path + ".gate"``, held
    exclusively and only while waiting), and an exclusive waiter keeps the gate until the
    shared holders have drained -- without it, ``flock`` lets new shared holders in ahead
    of a waiting exclusive one, and two workers running tests back to back could starve a
    ``vmem_alone`` test for as long as they have tests.
    """
    gate = os.open(path + ".gate", os.O_RDWR | os.O_CREAT, 0o600)
    fd = -1
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock
        os.close(gate)


def is_alone(node) -> bool:
    """Whether ``node`` must run with no other test holding the lock: marked ``vmem_alone``
    or with one of the ini ``vmem_alone_markers``."""
    names = ("vmem_alone", *node.config.getini("vmem_alone_markers"))
    return any(node.get_closest_marker(name) is not None for name in names)


#: Fixtures whose tests hold the lock (shared) even without ini ``vmem_lock_all``.
_LOCKING_FIXTURES = ("vmem_guest", "vmem_migrate", "vmem_bench_run")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    """Hold the run's lock around the whole item (setup, call, teardown): exclusively for
    an alone item, shared for one that uses a vmem fixture (or any, with ``vmem_lock_all``).
    The outermost wrapper: the wait happens before pytest-timeout starts the item's clock,
    so a test that waits for a long ``vmem_alone`` test is not timed out for it."""
    alone = is_alone(item)
    if not (alone or item.config.getini("vmem_lock_all")
            or any(f in getattr(item, "fixturenames", ()) for f in _LOCKING_FIXTURES)) \
            or not hasattr(item.config, "_tmp_path_factory"):  # -p no:tmpdir: no run directory to lock in
        return (yield)
    with _hold(_lock_path(item.config), alone):
        return (yield)


@pytest.fixture(autouse=True)
def _vmem_markers(request):
    """``vmem_kernel``: skip, naming the feature, where the kernel lacks one."""
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
def vmem_guest():
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
def vmem_migrate():
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


def _bench_case_ids(config) -> dict:
    """``{parametrize id: (matrix, cell, repeat)}`` of the bench items (the controller
    collects no items under xdist, so it rebuilds them from the same options)."""
    if not hasattr(config, "_vmem_bench_cases"):
        m = _bench_matrix(config)
        config._vmem_bench_cases = {f"r{repeat}-{cell.cell_id}": (m, cell, repeat)
                                    for repeat in range(m.repeats) for cell in m.cells}
    return config._vmem_bench_cases


def _worker_identity() -> dict:
    """Where this pytest process runs: xdist worker id (None outside xdist) and the host
    as the network sees it (hostname, network namespace, IPv4 addresses)."""
    from vmem.provenance import network_identity

    return {"xdist_worker": os.environ.get("PYTEST_XDIST_WORKER")} | network_identity()


@pytest.fixture
def vmem_bench_run(request, vmem_bench_case):
    """Run one bench cell once and return its record; the record travels to the
    controlling pytest with the test report, which appends it to ``--vmem-bench-out``."""
    import json

    from vmem.bench.runner import run_cell, run_record
    from vmem.jsonout import json_default

    m, cell, repeat = vmem_bench_case
    report, calibration = run_cell(cell, seed=m.seed, warmup_s=m.warmup_s, observe_s=m.observe_s)
    session = request.config.getoption("--vmem-bench-session") \
        or getattr(request.config, "workerinput", {}).get("vmem_bench_session")
    rec = run_record(cell, report, repeat=repeat, order=-1, session=session, suite=m.name, calibration_ms=calibration)
    rec["worker"] = _worker_identity()
    request.node.user_properties.append((_RECORD_PROPERTY, json.dumps(rec, default=json_default)))
    return rec


class _BenchRecordWriter:
    """In the controlling pytest (no xdist, or xdist's controller): appends each bench
    item's record to ``--vmem-bench-out`` once, when the item's teardown report (or xdist's
    report of a crashed worker) arrives -- and a failed-run record for an item that sent
    none, so a worker that died leaves no hole in the results."""

    def __init__(self, config):
        self.config = config
        self.written: set[str] = set()
        self.pending: dict[str, str] = {}  # nodeid -> the record a phase's report carried

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node) -> None:
        """pytest-xdist, before a worker starts: give it the session id (workers parse
        the command line afresh, so an option set here would not reach them)."""
        node.workerinput["vmem_bench_session"] = self.config.getoption("--vmem-bench-session")

    def pytest_runtest_logreport(self, report) -> None:
        import json

        if report.nodeid in self.written:
            return
        case = _bench_case_ids(self.config).get(report.nodeid.rpartition("[")[2].rstrip("]"))
        if case is None:
            return
        for key, text in report.user_properties:
            if key == _RECORD_PROPERTY:
                self.pending[report.nodeid] = text
        if report.when in ("teardown", "???"):  # the item's last report (a crash sends only "???")
            text = self.pending.pop(report.nodeid, None)
            self.write(report, case, json.loads(text) if text else None)

    def write(self, report, case, record: dict | None) -> None:
        from vmem.bench.runner import append_record, run_record

        m, cell, repeat = case
        if record is None:
            gateway = getattr(getattr(report, "node", None), "gateway", None)
            why = (f"pytest worker {gateway.id} crashed while running it" if report.when == "???" and gateway
                   else f"its pytest item ended {report.outcome} in {report.when} before a run record was made")
            record = run_record(cell, {"outcome": "failed", "verified": False, "reason": why}, repeat=repeat,
                                order=-1, session=self.config.getoption("--vmem-bench-session"), suite=m.name)
            record["worker"] = {"xdist_worker": gateway.id if gateway else None}
        record["order"] = len(self.written)  # the order runs finished in, as the controller saw them
        append_record(self.config.getoption("--vmem-bench-out"), record)
        self.written.add(report.nodeid)
