"""The Xen backend on real Xen: a nested Xen 4.17 host under QEMU TCG (scripts/xenhost.sh).

One boot per test run runs every step (tests/xen_dom0_steps.sh) inside dom0: a PVH domU
with the stamper workload (guests/xen/stamper.c), ``vmem profile --backend xen``, ``vmem
migrate --backend xen`` with the seed's threshold policy and with two-threshold (received
and resumed by Xen's own ``xl restore``), the page comparison made to fire, ``xl migrate``
of the same guest with its stream captured, and ``vmem inspect`` of that stream.  The
tests below read the results.  Under xdist the first worker boots; the others wait on a
lock and read the same results (the run id is shared by all workers).  They are
``serial``: QEMU's TCG threads take both cores, and timing-sensitive tests must not run
beside them (the boot then also runs at full speed).

The host-only tests at the end (xl header, inspect of a vmem stream, the stamper's own
check) need no Xen.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
XENHOST = ROOT / "scripts" / "xenhost.sh"
#: the whole boot: build (first time ~5 min), boot, ~8 steps under TCG, power-off
BOOT_TIMEOUT_S = 2400


def _unavailable() -> str | None:
    cp = subprocess.run(["bash", str(XENHOST), "check"], capture_output=True, text=True, timeout=60)
    return None if cp.returncode == 0 else (cp.stdout + cp.stderr).strip()


@pytest.fixture(scope="session")
def xen_results() -> Path:
    """Results of the one boot of this test run (booting it if no other worker did)."""
    why = _unavailable()
    if why:
        pytest.skip(f"nested Xen test host unavailable: {why}")
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    base = ROOT / ".cache" / "xenhost"
    base.mkdir(parents=True, exist_ok=True)
    results = base / f"results-{run_id}"
    with open(base / f"results-{run_id}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one worker boots; the rest wait here, then read
        done = results / "boot.rc"
        if not done.exists():
            for stale in base.glob("results-*/xl-migrate.stream"):  # left by an interrupted run
                stale.unlink(missing_ok=True)
            shutil.rmtree(results, ignore_errors=True)
            results.mkdir()
            rel = results.relative_to(ROOT)
            try:
                cp = subprocess.run(["bash", str(XENHOST), "run", f"sh tests/xen_dom0_steps.sh /mnt/vmem/{rel}"],
                                    capture_output=True, text=True, timeout=BOOT_TIMEOUT_S + 60,
                                    env=dict(os.environ, XENHOST_TIMEOUT_S=str(BOOT_TIMEOUT_S)))
                rc, out = cp.returncode, cp.stdout + cp.stderr
            except subprocess.TimeoutExpired as err:  # xenhost.sh reaps QEMU on its own timeout first
                rc, out = 124, str(err)
            (results / "boot.out").write_text(out)
            done.write_text(str(rc))
    rc = int(done.read_text())
    if rc != 0:
        pytest.fail(f"the Xen test host run failed (exit {rc}): {(results / 'boot.out').read_text()[-3000:]}")
    return results


def _step(results: Path, name: str) -> tuple[int, str]:
    rc_file = results / f"{name}.rc"
    assert rc_file.exists(), f"step {name} did not run; boot output: {(results / 'boot.out').read_text()[-2000:]}"
    return int(rc_file.read_text()), (results / f"{name}.out").read_text()


def _ok(results: Path, name: str) -> str:
    rc, out = _step(results, name)
    assert rc == 0, f"step {name} failed (exit {rc}):\n{out[-3000:]}"
    return out


def _check_migration(results: Path, name: str, policy: str) -> dict:
    _ok(results, f"migrate-{name}")
    rep = json.loads((results / f"migrate-{name}.json").read_text())
    assert rep["outcome"] == "completed", rep["reason"]
    assert rep["policy"].get("name") == policy or policy in json.dumps(rep["policy"])
    # the destination's RAM equals the source's at the pause, page for page (both paused)
    v = rep["verification"]
    assert rep["verified"] and v["pages_mismatched"] == 0 and v["pages_compared"] >= 32000, v
    kinds = [r["kind"] for r in rep["rounds"]]
    assert kinds[-1] == "stop-and-copy" and kinds.count("precopy") >= 1, kinds
    assert rep["rounds"][0]["pages_sent"] >= 32000  # round 0: every populated frame of 128 MiB
    assert rep["downtime_ms"] is not None and rep["downtime_ms"] > 0
    # ... and the guest keeps running at the destination and passes its own check
    out = _ok(results, f"guest-check-{name}")
    assert "bad=0" in out
    return rep


@pytest.mark.xen
@pytest.mark.serial
@pytest.mark.timeout(BOOT_TIMEOUT_S + 300)
def test_xen_host_boots_pvh_guest(xen_results):
    _ok(xen_results, "create")
    assert "STAMP n=" in (xen_results / "console-boot.log").read_text()


@pytest.mark.xen
@pytest.mark.serial
@pytest.mark.timeout(BOOT_TIMEOUT_S + 300)
def test_xen_a_dead_stamper_is_reported_at_once(xen_results):
    """A domU whose stamper dies after boot (SIGILL, as the nested host's AVX emulation once
    made it: docs/xen.md) fails create_domu at once, with the guest's own report."""
    rc, out = _step(xen_results, "create-dies")
    assert rc == 0, f"create_domu did not report the dead stamper:\n{out[-3000:]}"
    assert "the domU's stamper died after boot" in out and "STAMPER EXITED rc=132" in out, out[-3000:]
    assert float((xen_results / "create-dies.seconds").read_text()) < 90  # not the 90 s wait


@pytest.mark.xen
@pytest.mark.serial
@pytest.mark.timeout(BOOT_TIMEOUT_S + 300)
def test_xen_profile_and_graphs(xen_results, tmp_path):
    _ok(xen_results, "profile")
    # dom0 recorded the log-dirty trace; the same analysis and predictions as for process
    # guests run here, from the trace
    cp = subprocess.run([sys.executable, "-m", "vmem", "profile", "--from-trace", str(xen_results / "profile-trace.npz"),
                         "--json", str(tmp_path / "profile.json")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads((tmp_path / "profile.json").read_text())
    ws = doc["working_set"]
    assert max(ws["wws_pages"]) > 0  # the stamper writes: log-dirty saw it
    assert doc["predictions"] and doc["recommendations"]
    # ... and the same graphs
    cp = subprocess.run([sys.executable, "-m", "vmem", "graph", str(tmp_path / "profile.json"), "--out", str(tmp_path)],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cp.returncode == 0, cp.stderr
    assert (tmp_path / "profile-working-set.png").stat().st_size > 1000
    assert (tmp_path / "profile-dirty-trace.png").stat().st_size > 1000


@pytest.mark.xen
@pytest.mark.serial
@pytest.mark.timeout(BOOT_TIMEOUT_S + 300)
def test_xen_migrate_threshold_policy(xen_results, tmp_path):
    rep = _check_migration(xen_results, "threshold", "threshold")
    cp = subprocess.run([sys.executable, "-m", "vmem", "graph", str(xen_results / "migrate-threshold.json"),
                         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert cp.returncode == 0, cp.stderr
    assert any(p.name.endswith("convergence.png") for p in tmp_path.iterdir())
    assert rep["pagemap"] and Path(xen_results / "pagemap-threshold" / "pagemap.npz").exists()


@pytest.mark.xen
@pytest.mark.serial
@pytest.mark.timeout(BOOT_TIMEOUT_S + 300)
def test_xen_migrate_two_threshold_policy(xen_results):
    _check_migration(xen_results, "two-threshold", "two-threshold")


@pytest.mark.xen
@pytest.mark.serial
@pytest.mark.timeout(BOOT_TIMEOUT_S + 300)
def test_xen_page_comparison_fires(xen_results):
    """A destination frame corrupted before the comparison: the migration fails, the
    incoming copy is destroyed and the source keeps running."""
    rc, out = _step(xen_results, "migrate-inject")
    assert rc == 1 and "pages differ" in out, out[-2000:]
    _ok(xen_results, "after-inject")


@pytest.mark.xen
@pytest.mark.serial
@pytest.mark.timeout(BOOT_TIMEOUT_S + 300)
def test_xen_inspect_xl_migrate_stream(xen_results):
    _ok(xen_results, "xl-migrate")
    _ok(xen_results, "guest-check-xl")
    stream = xen_results / "xl-migrate.stream"
    assert stream.exists(), "dom0 did not capture the xl migrate stream"
    try:  # inspected here, not in dom0: the host runs Python ~20x faster than TCG
        cp = subprocess.run([sys.executable, "-m", "vmem", "inspect", str(stream), "--json",
                             str(xen_results / "inspect.json")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    finally:
        stream.unlink(missing_ok=True)  # 185 MB
    assert cp.returncode == 0, cp.stderr
    doc = json.loads((xen_results / "inspect.json").read_text())
    assert doc["xl"]["config"]["c_info"]["type"] == "pvh"
    assert doc["stream"]["libxc_version"] == 3
    types = [r["type"] for r in doc["records"]]
    assert "HVM_CONTEXT" in types and "X86_CPUID_POLICY" in types
    # a live xl migrate: round 0 covers every pfn, later rounds resend dirty pages
    assert len(doc["rounds"]) >= 2 and doc["rounds"][0]["pages_with_data"] >= 32000


# --- host-only: no Xen needed ---------------------------------------------------------------

def test_xl_header_roundtrip_and_refusals():
    import io

    from vmem.errors import StreamError
    from vmem.format.xl import XL_MAGIC, parse_xl_header, xl_header

    cfg = {"c_info": {"type": "pvh", "name": "vm1"}, "b_info": {"max_memkb": 131072}}
    raw = xl_header(cfg)
    h = parse_xl_header(io.BytesIO(raw + b"LibxlFmt").read)
    assert h.config == cfg and h.nbytes == len(raw)
    with pytest.raises(StreamError, match="not an xl save file"):
        parse_xl_header(io.BytesIO(b"LibxlFmt" + bytes(60)).read)
    bad_flags = bytearray(raw)
    bad_flags[36] |= 0x80
    with pytest.raises(StreamError, match="unknown mandatory"):
        parse_xl_header(io.BytesIO(bytes(bad_flags)).read)
    with pytest.raises(StreamError, match="truncated"):
        parse_xl_header(io.BytesIO(XL_MAGIC).read)


def test_inspect_infers_rounds_of_a_written_stream(tmp_path):
    """A stream written as vmem's Xen backend writes it (xl header, three rounds with the
    last after the pause, Xen's register-record order) reads back with its rounds."""
    from vmem.analysis.inspect import inspect_stream
    from vmem.format.stream import StreamWriter
    from vmem.format.wire import IHDR_VERSION_3
    from vmem.format.xl import xl_header

    path = tmp_path / "s.xl"
    with open(path, "wb") as f:
        f.write(xl_header({"c_info": {"type": "pvh", "name": "t"}}))
        w = StreamWriter(lambda parts: [f.write(bytes(p)) for p in parts])
        w.begin(IHDR_VERSION_3)
        pages = np.zeros((64, 4096), dtype=np.uint8)
        for pfns in (np.arange(64), np.array([3, 9, 40]), np.array([9])):
            w.page_data(pfns, [pages[:len(pfns)]])
        w.x86_tsc_info()
        w.hvm_params({1: 0xfeffc})
        w.hvm_context()
        w.end_libxc()
        w.end_libxl()
    r = inspect_stream(str(path))
    assert [x["pages_with_data"] for x in r["rounds"]] == [64, 3, 1]
    assert r["last_round_is_stop_and_copy"]
    assert r["hvm_params"] == {"STORE_PFN": 0xfeffc}
    assert r["xl"]["config"]["c_info"]["name"] == "t"


@pytest.fixture(scope="module")
def stamper(tmp_path_factory) -> Path:
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed (scripts/setup.sh installs it)")
    exe = tmp_path_factory.mktemp("stamper") / "stamper"
    cp = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(ROOT / "guests" / "xen" / "stamper.c")],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    return exe


def _stamp_lines(exe: Path, *args: str) -> list[str]:
    proc = subprocess.Popen([str(exe), "1", "100", "0.3", *args], stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:
            if line.startswith("STAMP n="):
                lines.append(line)
            if len(lines) == 3:
                break
        return lines
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_stamper_passes_its_check(stamper):
    assert all(" bad=0 " in line for line in _stamp_lines(stamper))


def test_stamper_dies_on_request(stamper):
    """The "die" mode the Xen test of the dead-stamper report uses: SIGILL after STAMP start."""
    cp = subprocess.run([str(stamper), "1", "100", "0.3", "die"], capture_output=True, text=True, timeout=60)
    assert cp.returncode == -signal.SIGILL and "STAMP start" in cp.stdout, (cp.returncode, cp.stdout)


def test_stamper_check_fires_on_a_stale_page(stamper):
    """The in-guest check catches a page that went back a generation (a lost write)."""
    lines = _stamp_lines(stamper, "inject")
    assert " bad=0 " in lines[0] and " bad=1 " in lines[1], lines


class _FakeDomain:
    """Stands in for vmem.xen.domain.XenDomain: RAM in a numpy array, one unmappable pfn."""

    def __init__(self, npages: int, hole: int):
        self.name, self.npages, self.hole = "fake", npages, hole
        self.ram = np.random.default_rng(3).integers(0, 256, (npages, 4096), dtype=np.uint8)

    def read_pages(self, pfns, out):
        out[:len(pfns)] = self.ram[pfns]
        return np.where(np.asarray(pfns) == self.hole, -2, 0).astype(np.int32)

    def alive(self):
        return True


class _FakeTracker:
    """Fake log-dirty: collect ``i`` reports ``dirty_sets[i]``; with ``domain``, the guest
    first writes those pages (so a set that is never sent leaves the RAM different from
    what was sent).  ``collect_final`` is the collect made with the domain stopped."""

    collect_s = 0.0

    def __init__(self, dirty_sets, domain=None):
        self.dirty_sets = list(dirty_sets)
        self.domain = domain

    def collect(self):
        pages = np.asarray(self.dirty_sets.pop(0) if self.dirty_sets else [], dtype=np.int64)
        if self.domain is not None:
            self.domain.ram[pages] ^= 0x5A  # the guest wrote these since the last collect
        return pages

    collect_final = collect


def test_xen_rounds_drive_a_policy_into_a_stream(tmp_path):
    """The Xen round engine without Xen: vmem's threshold policy over fake log-dirty sets;
    the stream reads back with those rounds, the unmappable frame as XTAB, and the per-page
    digests of what was sent match the RAM."""
    from vmem.analysis.inspect import inspect_stream
    from vmem.format.stream import StreamWriter
    from vmem.format.wire import IHDR_VERSION_3
    from vmem.format.xl import xl_header
    from vmem.migration.policy import make_policy
    from vmem.migration.rounds import run_precopy
    from vmem.xen.migrate import _XenRounds, page_digests

    dom = _FakeDomain(3000, hole=2500)
    path = tmp_path / "fake.xl"
    with open(path, "wb") as f:
        f.write(xl_header({"c_info": {"type": "pvh", "name": "fake"}}))
        w = StreamWriter(lambda parts: [f.write(bytes(p)) for p in parts])
        w.begin(IHDR_VERSION_3)
        io = _XenRounds(dom, _FakeTracker([range(0, 900), range(100, 400), range(7, 9)]), w, 0.0, None)
        end = run_precopy(io, make_policy("threshold", precopy_iterations=5, precopy_threshold=50), np.arange(3000),
                          guest_pages=3000, page_size=4096, bandwidth_limit_Bps=None)
        io.stop_and_copy(end.dirty)
        w.x86_tsc_info()
        w.hvm_params({1: 2999})
        w.hvm_context()
        w.end_libxc()
        w.end_libxl()
    assert end.rounds == 3 and list(end.dirty) == [7, 8]  # 900, 300, then 2 <= 50: stop
    r = inspect_stream(str(path))
    assert [x["pfns"] for x in r["rounds"]] == [3000, 900, 300, 2]
    assert r["rounds"][0]["pages_without_data"] == 1 and io.failed_maps == 1
    good = np.setdiff1d(np.arange(3000), [2500])
    assert (io.sent_digest[good] == page_digests(dom.ram[good])).all()


def test_xen_stop_and_copy_sends_the_last_rounds_dirty_set():
    """The stop-and-copy sends the last precopy round's dirty set (the pages the policy did
    not send live) and the final collect: after it, every page's last sent data is the RAM.
    Fires on the defect found on the nested host, where only the final collect was sent and
    the last round's writes were lost."""
    from vmem.migration.policy import make_policy
    from vmem.migration.rounds import run_precopy
    from vmem.xen.migrate import _XenRounds, page_digests

    from vmem.format.stream import StreamWriter
    from vmem.format.wire import IHDR_VERSION_3

    writer = StreamWriter(lambda parts: None)
    writer.begin(IHDR_VERSION_3)
    dom = _FakeDomain(3000, hole=2500)
    # rounds 0..2 dirty 900, 300, 2 pages (the guest writes them); the final collect, with the
    # domain stopped, finds 2 more
    tracker = _FakeTracker([range(0, 900), range(100, 400), [7, 8], [20, 21]], domain=dom)
    io = _XenRounds(dom, tracker, writer, 0.0, None)
    end = run_precopy(io, make_policy("threshold", precopy_iterations=5, precopy_threshold=50), np.arange(3000),
                      guest_pages=3000, page_size=4096, bandwidth_limit_Bps=None)
    assert list(end.dirty) == [7, 8]
    final, sent, _ = io.stop_and_copy(end.dirty)
    assert list(final) == [7, 8, 20, 21] and sent == 4
    good = np.setdiff1d(np.arange(3000), [2500])
    stale = good[io.sent_digest[good] != page_digests(dom.ram[good])]
    assert len(stale) == 0, f"pages whose last send is older than the RAM: {stale[:10]}"


class _Reader:
    """A paused domain's RAM for _compare_paused; ``misread`` pfns read another frame's
    data the first time only (the nested host's foreign-map misreads)."""

    def __init__(self, ram, misread=()):
        self.ram, self.misread = ram, set(misread)

    def read_pages(self, pfns, out):
        out[:len(pfns)] = self.ram[pfns]
        for k, p in enumerate(pfns):
            if int(p) in self.misread:
                self.misread.discard(int(p))
                out[k] = self.ram[(int(p) + 1) % len(self.ram)]
        return np.zeros(len(pfns), dtype=np.int32)


def test_xen_page_comparison_rereads_but_keeps_real_differences():
    """A first read a second read contradicts is a misread (counted, not a failure); a page
    the source changed after its last send stays a failure, its bytes shown; a destination
    page unlike what was sent stays a mismatch."""
    from vmem.xen.migrate import _compare_paused, page_digests

    ram = np.random.default_rng(5).integers(0, 256, (3000, 4096), dtype=np.uint8)
    pfns = np.arange(3000)
    sent = page_digests(ram)
    v = _compare_paused(_Reader(ram, misread=[5, 1500]), _Reader(ram.copy(), misread=[2047]), pfns, {}, sent)
    assert v["source_changed_after_send"] == 0 and v["pages_mismatched"] == 0, v
    assert v["foreign_misreads"] == 3 and {m["pfn"] for m in v["misread_examples"]} == {5, 1500, 2047}
    src = ram.copy()
    src[1234, 100:104] ^= 0xFF  # written after its last send, never reported dirty
    dst = ram.copy()
    dst[2999, 0] ^= 1  # the destination holds something vmem never sent
    v = _compare_paused(_Reader(src), _Reader(dst), pfns, {}, sent)
    assert v["source_changed_pfns"] == [1234] and v["differing_bytes"][1234][0][:2] == [100, 4], v
    assert v["mismatched_pfns"] == [2999] and v["foreign_misreads"] == 0
    assert v["differing_bytes"][2999] == [[0, 1, ram[2999, :1].tobytes().hex(), dst[2999, :1].tobytes().hex()]]
