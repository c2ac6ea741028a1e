"""Kernel features: the probe names them; a missing one is an error naming it and the way out."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import uffd_wp_missing
from vmem.migration.backend import IncomingGuest, SourceGuest
from vmem.errors import TrackerUnavailable
from vmem.tracking import MprotectTracker, make_tracker


def test_doctor_names_features_and_the_tracker_choice():
    out = subprocess.run([sys.executable, "-m", "vmem", "doctor"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("userfaultfd", "UFFD_FEATURE_WP_ASYNC", "PAGEMAP_SCAN", "mprotect_tracker", "vm.max_map_count",
                 "MADV_POPULATE_WRITE"):
        assert name in out.stdout
    expected = "mprotect" if uffd_wp_missing() else "uffd-wp"
    assert f"--tracker auto selects: {expected}" in out.stdout
    from vmem import _native as nat

    assert f"post-copy fault threads: {nat.fault_thread_priority()[1]}" in out.stdout
    from vmem.migration.postcopy import cpu_list

    # where --fault-cpu may pin them: this process's CPUs
    assert f"--fault-cpu may pin them to one of CPUs {cpu_list(sorted(os.sched_getaffinity(0)))} here" in out.stdout
    assert cpu_list([0, 1, 2, 3, 6, 8, 9]) == "0-3,6,8-9" and cpu_list([5]) == "5"
    assert ("page digests: AVX-512" if nat.digest_impl() == "avx512" else "page digests: scalar") in out.stdout


def test_the_populate_probe_says_when_the_kernel_does_not_know_the_advice(monkeypatch):
    """This kernel knows MADV_POPULATE_WRITE; an advice it does not know (what a kernel before
    5.14 answers for this one: EINVAL) makes the probe say --prealloc will not map ahead."""
    from vmem import features, ram

    ok, detail = features._probe_populate_write()
    assert ok, detail
    monkeypatch.setattr(ram, "MADV_POPULATE_WRITE", 12345)  # no such advice: EINVAL
    ok, detail = features._probe_populate_write()
    assert not ok and "not known to this kernel" in detail and "--prealloc" in detail, detail


def test_doctor_says_when_the_fault_threads_cannot_be_raised():
    """Without CAP_SYS_NICE (a child that drops it; RLIMIT_RTPRIO and RLIMIT_NICE are 0 by
    default), doctor says the fault threads run at the default priority, and why."""
    import os
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    code = "from vmem.cli.main import post_copy_priority_line as f; print(f())"
    out = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-sys_nice", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert "a negative nice value was not allowed" in out.stdout, out.stdout
    assert "SCHED_FIFO is not permitted" in out.stdout, out.stdout



def test_doctor_says_when_the_kernel_did_not_take_the_short_slice():
    """A fault thread whose slice the kernel does not hold as asked reports plain nice -15,
    and doctor says what that costs (made to happen: a 50 us slice, which Linux clamps)."""
    from vmem import _native as nat
    from vmem.cli.main import post_copy_priority_line

    if nat.fault_thread_priority()[0] != nat.PC_PRIO_SLICE:
        pytest.skip(f"the fault threads get {nat.fault_thread_priority()[1]!r} here, not the slice")
    nat.set_fault_thread_slice_ns(50_000)
    try:
        line = post_copy_priority_line()
    finally:
        nat.set_fault_thread_slice_ns(0)
    assert line.startswith("post-copy fault threads: nice -15 (raised"), line
    assert "did not take the short EEVDF slice" in line, line
    assert "slice 0.1 ms" in post_copy_priority_line()

class _GuestWithoutWpAsync:
    """Looks like a guest whose kernel granted userfaultfd but not WP_ASYNC."""

    def __init__(self, real):
        self._real = real
        self.npages = real.npages
        self.pid = real.pid

    @property
    def uffd_features(self):
        from vmem import _native as nat

        return self._real.uffd_features & ~nat.UFFD_FEATURE_WP_ASYNC

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_missing_wp_async_names_feature_and_alternative(boot_guest):
    if uffd_wp_missing():
        pytest.skip(uffd_wp_missing())
    g = _GuestWithoutWpAsync(boot_guest("idle"))
    with pytest.raises(TrackerUnavailable) as info:
        make_tracker(g, "uffd-wp")
    assert info.value.feature == "UFFD_FEATURE_WP_ASYNC"
    assert "--tracker mprotect" in str(info.value)
    t = make_tracker(g, "auto")  # auto falls back to what works
    try:
        assert isinstance(t, MprotectTracker)
    finally:
        t.stop()


def test_guest_without_uffd_is_reported(boot_guest):
    class NoUffd(_GuestWithoutWpAsync):
        uffd_features = -38  # ENOSYS

    with pytest.raises(TrackerUnavailable, match="userfaultfd.*alternative: --tracker mprotect"):
        make_tracker(NoUffd(boot_guest("idle")), "uffd-wp")


def test_process_guest_implements_the_backend_protocols(boot_guest):
    g = boot_guest("idle")
    assert isinstance(g, SourceGuest) and isinstance(g, IncomingGuest)


def test_doctor_finds_free_page_reporting_in_a_balloon_device(tmp_path):
    """A virtio-balloon (device id 5) whose negotiated features have bit 5 (REPORTING) set is
    reported, with the reporting order's block size; the bit clear, another device, or no
    virtio bus: nothing."""
    from vmem.features import free_page_reporting

    def device(name, dev_id, bits):
        d = tmp_path / "bus" / "virtio" / "devices" / name
        d.mkdir(parents=True)
        (d / "device").write_text(f"0x{dev_id:04x}\n")
        (d / "features").write_text(bits + "0" * (64 - len(bits)) + "\n")

    assert free_page_reporting(str(tmp_path)) is None  # no virtio bus at all
    device("virtio0", 2, "011001")  # a block device: bit 5 means something else there
    device("virtio1", 5, "011000")  # a balloon without REPORTING
    assert free_page_reporting(str(tmp_path)) is None
    device("virtio2", 5, "011001")
    params = tmp_path / "module" / "page_reporting" / "parameters"
    params.mkdir(parents=True)
    (params / "page_reporting_order").write_text("9\n")
    said = free_page_reporting(str(tmp_path))
    assert said is not None and "free page reporting is on (virtio2" in said and "2048 KiB" in said
    assert "--prealloc" in said


def test_doctor_names_the_kernel_preemption_model(tmp_path):
    """debugfs's sched/preempt wins, then preempt= on the command line, then /proc/config.gz
    (PREEMPT_RT counts as full); none/voluntary come with the consequence for post-copy;
    nothing readable: unknown, saying what was missing."""
    import gzip

    from vmem.features import kernel_preemption

    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    sys_.mkdir()
    said = kernel_preemption(str(proc), str(sys_))
    assert said.startswith("kernel preemption: unknown (no /proc/config.gz")

    def config(*lines):
        with gzip.open(proc / "config.gz", "wt") as f:
            f.write("\n".join(["# CONFIG_PREEMPT is not set", *lines]) + "\n")

    config("CONFIG_PREEMPT_NONE=y", "CONFIG_PREEMPT_DYNAMIC=y")
    (proc / "cmdline").write_text("console=ttyS0 quiet\n")
    said = kernel_preemption(str(proc), str(sys_))
    assert said.startswith("kernel preemption: none (CONFIG_PREEMPT_NONE, PREEMPT_DYNAMIC")
    assert "fault tail" in said and "preempt=full" in said
    config("CONFIG_PREEMPT=y", "CONFIG_PREEMPT_RT=y")
    assert kernel_preemption(str(proc), str(sys_)).startswith("kernel preemption: full (CONFIG_PREEMPT_RT")
    config("CONFIG_PREEMPT_VOLUNTARY=y")
    assert kernel_preemption(str(proc), str(sys_)).startswith("kernel preemption: voluntary")
    (proc / "cmdline").write_text("console=ttyS0 preempt=full quiet\n")
    said = kernel_preemption(str(proc), str(sys_))
    assert said.startswith("kernel preemption: full (preempt=full on the kernel command line)")
    assert "fault tail" not in said
    debug = sys_ / "kernel" / "debug" / "sched"
    debug.mkdir(parents=True)
    (debug / "preempt").write_text("none voluntary full (lazy)\n")
    assert kernel_preemption(str(proc), str(sys_)).startswith("kernel preemption: lazy (sched/preempt in debugfs)")


def test_doctor_says_how_tls_agents_demand_pages_are_protected(tmp_path):
    """The sealed urgent connection is named whatever the kernel has; kernel TLS is reported
    as available, absent (naming what the kernel offers) or unknown."""
    from vmem.features import tls_urgent_link

    proc = tmp_path / "proc"
    assert tls_urgent_link(str(proc)).endswith("kernel TLS: unknown (no tcp_available_ulp)")
    ulp = proc / "sys" / "net" / "ipv4" / "tcp_available_ulp"
    ulp.parent.mkdir(parents=True)
    ulp.write_text("mptcp\n")
    said = tls_urgent_link(str(proc))
    assert "sealed urgent connection (AES-256-GCM" in said and said.endswith("not in this kernel (tcp_available_ulp: mptcp)")
    ulp.write_text("espintcp mptcp tls\n")
    assert tls_urgent_link(str(proc)).endswith("kernel TLS: available (not used)")
    out = subprocess.run([sys.executable, "-m", "vmem", "doctor"], capture_output=True, text=True, timeout=120).stdout
    assert tls_urgent_link() in out.splitlines()


def test_doctor_prints_the_kernel_preemption_line():
    """`vmem doctor` on this machine names a model (or says why it cannot)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vmem", "doctor"], capture_output=True, text=True, timeout=120).stdout
    line = next(x for x in out.splitlines() if x.startswith("kernel preemption: "))
    assert line.split()[2] in ("none", "voluntary", "full", "lazy", "unknown"), line
