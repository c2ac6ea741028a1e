"""Shared fixtures: every test is checked for leaked child processes, fds and memfds."""
from __future__ import annotations

import os
import time

import psutil
import pytest


def _vmem_fds() -> set[str]:
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if "memfd:vmem" in target or "userfaultfd" in target:
            out.add(f"{name}->{target}")
    return out


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}


@pytest.fixture(autouse=True)
def no_host_calibration(monkeypatch, tmp_path_factory):
    """Predictions in tests never pick up this host's cached calibration (vmem calibrate):
    a test passes a calibration explicitly or gets the simulator's constants."""
    monkeypatch.setenv("VMEM_CALIBRATION", str(tmp_path_factory.getbasetemp() / "no-calibration.json"))


@pytest.fixture(autouse=True)
def no_leaks():
    """Fail a test that leaves a child process, a vmem memfd or a userfaultfd behind."""
    fds_before = _vmem_fds()
    kids_before = _children()
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked_kids = _children() - kids_before
        leaked_fds = _vmem_fds() - fds_before
        if not leaked_kids and not leaked_fds:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in leaked_kids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    assert not leaked_kids, f"test leaked child processes {sorted(leaked_kids)}"
    assert not leaked_fds, f"test leaked fds {sorted(leaked_fds)}"


@pytest.fixture
def boot_guest():
    """Factory: boot a ProcessGuest (``backend="kvm"``: a KvmGuest) that is reaped after the
    test whatever happens."""
    from guests.launch import GuestSpec, ProcessGuest

    guests = []

    def boot(workload="idle", size=8 << 20, seed=1, backend="process", **params):
        if backend == "kvm":
            from guests.kvm import KvmGuest as cls
        else:
            cls = ProcessGuest
        g = cls.boot(GuestSpec(workload, params, seed), size)
        guests.append(g)
        return g

    yield boot
    for g in guests:
        g.close()


def uffd_wp_missing() -> str:
    """Why the uffd-wp tracker cannot run on this kernel, or "" if it can (names the feature)."""
    from vmem.features import probe_features

    features = probe_features()
    for name in ("userfaultfd", "UFFD_FEATURE_WP_ASYNC", "UFFD_FEATURE_WP_HUGETLBFS_SHMEM", "PAGEMAP_SCAN"):
        f = features.get(name)
        if f is None or not f.available:
            return f"kernel lacks {name}: {f.detail if f else 'not probed'}"
    return ""


def kvm_missing() -> str:
    """Why a KVM guest cannot run here, or "" (names /dev/kvm or the capability)."""
    from guests.kvm import kvm_unavailable_reason

    return kvm_unavailable_reason() or ""


def needs_kvm() -> None:
    """Skip (with the reason) a test that runs a KVM guest where KVM is unavailable."""
    why = kvm_missing()
    if why:
        pytest.skip(f"KVM unavailable: {why}")


def needs_uffd_wp(kind: str) -> None:
    """Skip (with the reason) a test of the uffd-wp tracker on a kernel without it."""
    if kind == "uffd-wp":
        why = uffd_wp_missing()
        if why:
            pytest.skip(why)
