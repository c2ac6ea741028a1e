"""The KVM guest backend: a real VM (guests/kvm) under the unchanged migrator.

Migrations in pre-copy, post-copy and hybrid with both KVM dirty trackers, verified by the
digests of placed RAM and by the guest's own ledger (the guest program keeps the process
guest's ledger, checked from outside while the VM runs); the vCPU context round trip; and
the refusals: a corrupted, foreign or impossible vCPU context, a tracker the VM was not
created for, a RAM size KVM guests cannot have.  Skips with the reason without /dev/kvm.

This host's KVM emulates the guest's instructions (~100 pages written per second), so the
guests are small and slow: the assertions are about correctness, never about speed.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import struct
import time

import pytest

from conftest import kvm_missing
from guests.kvm import KvmGuest
from guests.kvm import context as kctx
from guests.kvm import layout as L
from guests.launch import GuestSpec
from vmem.errors import GuestError, TrackerUnavailable
from vmem.migration.local import run_local_migration
from vmem.migration.source import MigrationOptions
from vmem.tracking import make_tracker

pytestmark = pytest.mark.skipif(bool(kvm_missing()), reason=f"KVM unavailable: {kvm_missing()}")

SIZE = 16 << 20


def _ram_digest(g) -> str:
    return hashlib.sha256(g.ram.pages).hexdigest()


@pytest.mark.parametrize("tracker", ["kvm-log", "kvm-ring"])
@pytest.mark.parametrize("postcopy,mode", [("off", "precopy"), ("pure", "postcopy"), ("after-precopy", "hybrid")],
                         ids=["precopy", "postcopy", "hybrid"])
def test_kvm_guest_migrates_verified(boot_guest, tracker, postcopy, mode):
    g = boot_guest("hotcold", size=SIZE, backend="kvm", rate=200, dirty=tracker[len("kvm-"):])
    time.sleep(0.3)
    report = run_local_migration(g, MigrationOptions(tracker=tracker, postcopy=postcopy, observe_s=0.5))
    d = report.to_dict()
    assert d["outcome"] == "completed", d["reason"]
    assert d["mode"] == mode
    v = d["verification"]
    assert v["digests"]["mismatched"] == 0 and v["digests"]["pages_compared"] == g.npages
    assert v["guest_check"]["ok"] and v["guest_check"]["pages_checked"] > 0, v["guest_check"]
    dest = d["guest"]["destination"]
    assert dest["alive"] and dest["steps_since_resume"] > 0, dest  # the VM runs on at the destination
    if mode != "postcopy":
        assert d["tracker"] == tracker
    if mode != "precopy":
        assert d["postcopy"]["missing"] == 0
        # pure: every data page is to come; hybrid: the last dirty set, which a guest writing
        # 200 pages/s can leave empty when the last round is short (seen once in CI)
        assert d["postcopy"]["pages_pending"] > 0 if mode == "postcopy" else d["postcopy"]["pages_pending"] >= 0
    assert not g.alive()  # the source VM exits only after commit


def test_pause_resume_and_the_vcpu_context(boot_guest):
    g = boot_guest("uniform", size=SIZE, backend="kvm", rate=0)
    time.sleep(0.5)
    pause = g.pause()
    state, meta = kctx.unpack(pause.context, g.npages)
    assert set(state) == set(kctx.SECTIONS)
    rip = struct.unpack_from("<Q", state["regs"], 16 * 8)[0]
    assert L.firmware_gpa(g.npages, L.FW_CODE) <= rip < L.firmware_gpa(g.npages, L.FW_CODE) + L.CODE_MAX_BYTES
    assert len(state["msrs"]) // 12 > 10 and 0x4B564D06 not in {struct.unpack_from("<I", state["msrs"], o)[0]
                                                                for o in range(0, len(state["msrs"]), 12)}
    steps, digest = g.counters()["steps"], _ram_digest(g)
    assert meta["steps"] == steps > 0
    time.sleep(0.3)
    assert g.counters()["steps"] == steps and _ram_digest(g) == digest, "a paused VM changes nothing"
    assert g.verify()["ok"]
    g.resume()
    deadline = time.monotonic() + 10
    while g.counters()["steps"] <= steps and time.monotonic() < deadline:
        time.sleep(0.05)
    assert g.counters()["steps"] > steps, "the resumed vCPU runs on"
    assert g.verify_running()["ok"]


def _incoming_copy_of(source, boot_guest_list):
    """An incoming KVM guest holding a copy of ``source``'s (paused) RAM."""
    dest = KvmGuest.incoming(source.spec, source.npages)
    boot_guest_list.append(dest)
    dest.ram.pages[:] = source.ram.pages
    return dest


def test_a_bad_vcpu_context_is_refused_and_the_good_one_runs(boot_guest):
    g = boot_guest("hotcold", size=SIZE, backend="kvm", rate=0)
    time.sleep(0.3)
    ctx = g.pause().context
    made = []
    try:
        dest = _incoming_copy_of(g, made)
        corrupt = bytearray(ctx)
        corrupt[200] ^= 0x40
        with pytest.raises(GuestError, match="checksum"):
            dest.resume(bytes(corrupt))
        state, meta = kctx.unpack(ctx, g.npages)
        regs = bytearray(state["regs"])
        struct.pack_into("<Q", regs, 16 * 8, 0x1000)  # RIP into the guest's data pages
        with pytest.raises(GuestError, match="RIP"):
            dest.resume(kctx.pack(state | {"regs": bytes(regs)}, meta))
        with pytest.raises(GuestError, match="pages"):
            dest.resume(kctx.pack(state, meta | {"npages": g.npages * 2}))
        with pytest.raises(GuestError, match="magic"):
            dest.resume(b"not a context")
        assert dest.alive() and dest.state.name == "INCOMING", "a refused context starts nothing"
        dest.resume(ctx)  # the real one
        steps = dest.counters()["steps"]
        dest.wait_first_step(timeout_s=20)
        assert dest.counters()["steps"] > steps - 1 and dest.verify_running()["ok"]
        g.resume()  # and the source runs on
        assert g.verify_running()["ok"]
    finally:
        for d in made:
            d.close()


def test_tracker_of_the_other_kind_is_refused(boot_guest):
    g = boot_guest("idle", size=SIZE, backend="kvm")
    with pytest.raises(TrackerUnavailable, match="kvm-log"):
        make_tracker(g, "kvm-ring")
    t = make_tracker(g, "auto")
    try:
        assert t.name == "kvm-log"
    finally:
        t.stop()


def test_sizes_and_workloads_a_kvm_guest_cannot_have_are_refused():
    with pytest.raises(ValueError, match="3072 MiB"):
        KvmGuest.boot(GuestSpec("idle", {}, 1), 4 << 30)
    with pytest.raises(ValueError, match="zipf"):
        KvmGuest.boot(GuestSpec("zipf", {}, 1), SIZE)
    with pytest.raises(ValueError, match="unknown KVM workload parameter"):
        KvmGuest.boot(GuestSpec("uniform", {"s": 2}, 1), SIZE)


def test_shipped_program_is_its_source_assembled():
    if shutil.which("as") is None:
        pytest.skip("binutils' as is not installed")
    from guests.kvm.assemble import assemble

    assert assemble() == L.program_bytes(), "run python -m guests.kvm.assemble after editing program.S"


def test_program_and_host_agree_on_the_layout():
    src = open(L.PROGRAM_SRC).read()
    sets = {m[1]: m[2] for m in re.finditer(r"\.set (\w+), (.+)", src)}
    for p in L.P:
        if p.name != "MAGIC":
            assert eval(sets[f"P_{p.name}"]) == 8 * p.value, p.name
    from guests.control import Field

    for name in ("STEPS", "LAST_STEP_NS", "FIRST_STEP_NS", "PAGES_WRITTEN", "RESUMED_AT_NS", "THROTTLE_PPM",
                 "THROTTLED_NS", "MAX_GAP_NS", "MAX_GAP_END_NS"):
        assert int(sets[f"S_{name}"], 16) == 8 * Field[name], name
    for name in ("CLK_TSC_BASE", "CLK_NS_BASE", "CLK_MULT", "GAP_FROM_NS", "SLEEP_UNTIL_NS", "ERROR"):
        assert int(sets[f"S_{name}"], 16) == 8 * getattr(L, f"S_{name}"), name
    from guests.control import HEADER_BYTES

    assert L.STATUS_OFFSET >= HEADER_BYTES, "the guest must not reach the control block's command fields"
    assert int(sets["PORT_SLEEP"], 16) == L.PORT_SLEEP and int(sets["PORT_FATAL"], 16) == L.PORT_FATAL


def test_throttle_slows_the_guest(boot_guest):
    g = boot_guest("uniform", size=SIZE, backend="kvm", rate=0, batch=1)
    time.sleep(0.3)
    g.set_throttle(0.9)
    deadline = time.monotonic() + 10
    while g.counters()["throttled_s"] < 0.1 and time.monotonic() < deadline:
        time.sleep(0.05)
    c = g.counters()
    assert c["throttled_s"] >= 0.1, c  # the guest program slept on the throttle, by its own account
    g.set_throttle(0.0)
    assert g.verify_running()["ok"]


def _vmem(*args, timeout_s: float = 180):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([sys.executable, "-m", "vmem", *args], capture_output=True, text=True, timeout=timeout_s,
                          env=env, cwd=root)


def test_cli_migrates_a_kvm_guest_and_doctor_reports_kvm(tmp_path):
    import json

    out = tmp_path / "r.json"
    proc = _vmem("migrate", "--quiet", "--backend", "kvm", "--workload", "sweep", "-W", "rate=100", "--size", "8M",
                 "--tracker", "kvm-ring", "--postcopy-after-precopy", "--observe", "0.3", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["verified"] and report["tracker"] == "kvm-ring" and report["mode"] == "hybrid"
    doctor = _vmem("doctor")
    assert "backend kvm:      available" in doctor.stdout and "tracker kvm-ring: available" in doctor.stdout


def test_cli_refuses_what_a_kvm_guest_cannot_run():
    proc = _vmem("migrate", "--quiet", "--backend", "kvm", "--workload", "zipf", "--size", "8M")
    assert proc.returncode == 2 and "zipf" in proc.stderr
    proc = _vmem("migrate", "--quiet", "--workload", "uniform", "--size", "8M", "--tracker", "kvm-log")
    assert proc.returncode == 2 and "--backend kvm" in proc.stderr


def test_kvm_guest_between_agents(tmp_path):
    """``vmem create --backend kvm`` on agent a, ``vmem migrate NAME HOST:PORT`` to agent b
    (post-copy after pre-copy, the dirty ring), verified; the VM runs on at b."""
    import json
    import os

    from test_agent import AgentProc

    workdir = str(tmp_path)
    os.chmod(workdir, 0o700)
    started = []
    try:
        a = AgentProc(workdir, "a")
        started.append(a)
        b = AgentProc(workdir, "b")
        started.append(b)
        made = a.cli("create", "vm1", "--backend", "kvm", "--workload", "hotcold", "-W", "rate=100", "--size", "8M")
        assert made.returncode == 0, made.stderr + a.log()
        report_path = os.path.join(workdir, "r.json")
        run = a.cli("migrate", "vm1", b.address, "--quiet", "--observe", "0.3", "--postcopy-after-precopy",
                    "--json", report_path)
        assert run.returncode == 0, run.stderr + a.log() + b.log()
        report = json.load(open(report_path))
        assert report["verified"] and report["verification"]["guest_check"]["ok"] and report["tracker"] == "kvm-log"
        moved = b.guests()["vm1"]
        steps = moved["steps"]
        deadline = time.monotonic() + 20
        while b.guests()["vm1"]["steps"] == steps and time.monotonic() < deadline:
            time.sleep(0.1)
        assert b.guests()["vm1"]["steps"] > steps, "the VM runs on under agent b"
        assert b.cli("destroy", "vm1").returncode == 0
    finally:
        for agent in started:
            agent.stop()


def test_save_and_restore_a_kvm_guest(boot_guest, tmp_path):
    """``xl save -c`` / ``xl restore`` of a VM: the file carries the vCPU context, the
    restored VM runs on and passes its own check."""
    from vmem.migration.savefile import restore_guest, save_guest

    g = boot_guest("hotcold", size=8 << 20, backend="kvm", rate=100)
    time.sleep(0.3)
    path = str(tmp_path / "vm.save")
    save_guest(g, path, keep_running=True)
    restored, stats = restore_guest(path)
    try:
        assert isinstance(restored, KvmGuest)
        steps = restored.counters()["steps"]
        deadline = time.monotonic() + 20
        while restored.counters()["steps"] <= steps and time.monotonic() < deadline:
            time.sleep(0.05)
        assert restored.counters()["steps"] > steps and restored.verify_running()["ok"]
        assert g.alive() and g.verify_running()["ok"]  # -c: the saved VM runs on too
    finally:
        restored.close()
