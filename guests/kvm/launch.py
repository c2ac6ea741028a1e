"""The migrator's handle on a KVM guest: :class:`KvmGuest`.

It is a :class:`guests.launch.ProcessGuest` whose process is guests/kvm/runtime.py (same
control block, socket and commands), so pause/resume, the context, counters, throttling,
the userfaultfd for post-copy and detaching are the process guest's.  What differs:

* RAM is the VM's memslot: the ledger layout of guests/memory.py occupies all but the top
  FIRMWARE_PAGES pages (the guest program, its page tables and state), and the check runs
  from here on that view (:meth:`verify`, :meth:`verify_running`);
* dirty tracking is KVM's (:class:`vmem.tracking.KvmDirtyGuest`): the dirty log or the
  dirty ring, chosen when the VM is created (``params["dirty"]``, default ``log``).
"""
from __future__ import annotations

import os

from guests.kvm import layout as L
from guests.launch import GuestSpec, ProcessGuest
from vmem.ram import PAGE_SIZE, GuestRam

__all__ = ["KvmGuest", "kvm_unavailable_reason"]


def kvm_unavailable_reason() -> str | None:
    """Why a KVM guest cannot run here, or None."""
    from guests.kvm.vm import probe

    info = probe()
    return None if info["available"] else info.get("reason", "KVM unavailable")


class KvmGuest(ProcessGuest):
    """A KVM VM in its own process.  Use :meth:`boot` or :meth:`incoming`."""

    backend_name = "kvm"
    runtime_module = "guests.kvm.runtime"

    @classmethod
    def boot(cls, spec: GuestSpec, size_bytes: int, *, timeout_s: float = 120.0) -> "KvmGuest":
        """Create the VM with ``size_bytes`` of RAM, load the program and run it.

        Raises:
            ValueError: a size or workload the KVM guest cannot run (named).
            GuestCrashed: KVM refused (the message names the ioctl or capability).
        """
        L.check_size(size_bytes)
        L.params_page(size_bytes // PAGE_SIZE, spec.workload,
                      {k: v for k, v in (spec.params or {}).items() if k != "dirty"}, spec.seed, 10**9)
        return super().boot(spec, size_bytes, timeout_s=timeout_s)

    @classmethod
    def incoming(cls, spec: GuestSpec, npages: int, *, timeout_s: float = 60.0) -> "KvmGuest":
        L.check_size(npages * PAGE_SIZE)
        return super().incoming(spec, npages, timeout_s=timeout_s)

    # --- the guest's own counters, from its status page --------------------------------------
    def _status(self):
        import numpy as np

        return np.frombuffer(self.ctl._mmap, np.int64, count=512, offset=L.STATUS_OFFSET)

    def counters(self) -> dict:
        """Steps, pages written and timestamps as the guest program last stamped them in its
        status page (the control block's header carries no guest-written field)."""
        from guests.control import Field

        st, c = self._status(), self.ctl
        return {
            "steps": int(st[Field.STEPS]),
            "pages_written": int(st[Field.PAGES_WRITTEN]),
            "last_step_ns": int(st[Field.LAST_STEP_NS]),
            "first_step_ns": int(st[Field.FIRST_STEP_NS]),
            "resumed_at_ns": c[Field.RESUMED_AT_NS],
            "vclock_s": c[Field.VCLOCK_NS] / 1e9,
            "throttled_s": int(st[Field.THROTTLED_NS]) / 1e9,
            "max_gap_ns": int(st[Field.MAX_GAP_NS]),
            "max_gap_end_ns": int(st[Field.MAX_GAP_END_NS]),
        }

    def wait_first_step(self, timeout_s: float = 10.0) -> int:
        import time

        from guests.control import Field
        from vmem.errors import GuestUnresponsive

        st = self._status()
        deadline = time.monotonic() + timeout_s
        resumed = self.ctl[Field.RESUMED_AT_NS]
        while st[Field.FIRST_STEP_NS] < resumed:
            if not self.alive():
                raise self._crashed("first step")
            if time.monotonic() > deadline:
                raise GuestUnresponsive(f"KVM guest {self.pid} ran no step within {timeout_s:.0f} s of resuming")
            time.sleep(0.0002)
        return int(st[Field.FIRST_STEP_NS])

    @property
    def kvm_dirty_mode(self) -> str:
        """``log`` or ``ring``: the mechanism the VM was created with."""
        return (self.spec.params or {}).get("dirty", "log")

    @property
    def layout_npages(self) -> int:
        return L.layout_pages(self.npages)

    def guest_memory(self):
        """The ledger view of this guest's RAM (guests/memory.py), attached."""
        from guests.memory import GuestMemory

        return GuestMemory(self.ram.pages[:self.layout_npages]).attach()

    # --- checks, from outside the VM ------------------------------------------------------------
    def verify(self, timeout_s: float = 600.0) -> dict:
        """The ledger check of the whole RAM.  Paused, it is exact except for the one page
        the vCPU may have been writing when it was kicked: that page passes only if every
        byte is its stamp at the ledger's version or the one before (a write in flight, as
        the vCPU left it; it completes when the guest resumes) and is named in ``detail``.
        Running, it is :meth:`verify_running`."""
        from vmem.errors import GuestError as _GE

        if self.state.name != "PAUSED":
            return self.verify_running()
        try:
            mem = self.guest_memory()
        except _GE as err:
            return {"ok": False, "pages_checked": 0, "bad_pages": 1, "first_bad": [0], "detail": str(err)}
        res = mem.verify()
        out = {k: getattr(res, k) for k in ("ok", "pages_checked", "bad_pages", "first_bad", "detail")}
        if not res.ok and res.bad_pages == 1 and res.first_bad[0] >= mem.first_data_page \
                and mem.check_pages([res.first_bad[0]], concurrent=True)[0]:
            out.update(ok=True, bad_pages=0, first_bad=[],
                       detail=f"all {mem.data_pages} data pages match their ledger versions; page "
                              f"{res.first_bad[0]} was being written when the vCPU stopped (between versions)")
        return out

    def _ledger_memory(self):
        return self.guest_memory()  # verify_running checks the ledger layout, not the firmware pages

    # --- KVM dirty tracking (vmem.tracking.KvmDirtyGuest) ----------------------------------------
    def kvm_dirty_start(self, bitmap_fd: int, ring: bool) -> int:
        """Arm the dirty log (or ring) with ``bitmap_fd`` (pending half, harvest half)."""
        return self.command(self._cmd("KVM_DIRTY_START"), 1 if ring else 0, fds=[bitmap_fd])

    def kvm_dirty_collect(self) -> int:
        """Harvest dirty pages into the bitmap's harvest half, re-armed; their count."""
        return self.command(self._cmd("KVM_DIRTY_COLLECT"))

    def kvm_dirty_stop(self, timeout_s: float = 10.0) -> int:
        return self.command(self._cmd("KVM_DIRTY_STOP"), timeout_s=timeout_s)

    def kvm_message(self) -> str:
        msg = self.ctl.read_message()
        return msg.get("error", "") if isinstance(msg, dict) else ""

    @staticmethod
    def _cmd(name: str):
        from guests.control import Command

        return Command[name]
