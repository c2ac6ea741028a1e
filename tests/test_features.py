"""Kernel features: the probe names them; a missing one is an error naming it and the way out."""
from __future__ import annotations

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
    for name in ("userfaultfd", "UFFD_FEATURE_WP_ASYNC", "PAGEMAP_SCAN", "mprotect_tracker", "vm.max_map_count"):
        assert name in out.stdout
    expected = "mprotect" if uffd_wp_missing() else "uffd-wp"
    assert f"--tracker auto selects: {expected}" in out.stdout
    from vmem import _native as nat

    assert f"post-copy fault threads: {nat.fault_thread_priority()[1]}" in out.stdout


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
