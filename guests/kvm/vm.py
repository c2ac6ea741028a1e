"""One KVM virtual machine with one vCPU: memslots, the vCPU, its state as bytes.

Every KVM ioctl on a VM or vCPU fd must come from the process that created the VM (KVM
refuses another mm with EIO), so this object lives in the guest process
(guests/kvm/runtime.py) and the migrator reaches it through commands.

The vCPU state (:meth:`KvmVm.save_state` / :meth:`KvmVm.load_state`) is what a migration
carries besides RAM: REGS, SREGS, XSAVE (x87/SSE/AVX), the MSRs KVM lists, the LAPIC and
the pending events.  Structures cross as the bytes the KVM ABI fixes; the few fields the
boot sets are packed here with their offsets.
"""
from __future__ import annotations

import mmap
import os
import struct

import numpy as np

from vmem import _native as nat
from vmem.pages import PAGE_SIZE

from guests.kvm.layout import RAM_SLOT, STATUS_GPA, STATUS_SLOT

KVM_DEV = "/dev/kvm"
REGS_BYTES, SREGS_BYTES, XSAVE_BYTES, LAPIC_BYTES, EVENTS_BYTES = 144, 312, 4096, 1024, 64
#: MSR_KVM_... that KVM lists but refuses to restore on this host (issue 16)
SKIP_MSRS = {0x4B564D06}
MSR_IA32_TSC = 0x10
DIRTY_RING_ENTRIES = 65536
DIRTY_GFN_BYTES = 16
#: kvm_run: exit_reason u32 at 8; io: direction u8 @32, size u8 @33, port u16 @34, count u32 @36, data_offset u64 @40
RUN_IMMEDIATE_EXIT, RUN_EXIT_REASON, RUN_IO = 1, 8, 32
RUN_INTERNAL = 32  # internal.suberror u32, ndata u32, data[16] u64


class KvmUnavailable(OSError):
    """/dev/kvm or a KVM capability this backend needs is missing (the message names it)."""


def _enable_cap(vm_fd: int, cap: str, *args: int) -> None:
    buf = bytearray(struct.pack("<II4Q", nat.KVM[cap], 0, *(list(args) + [0] * (4 - len(args)))) + bytes(64))
    nat.kvm_ioctl(vm_fd, "KVM_ENABLE_CAP", buf=buf)


def _region(slot: int, flags: int, gpa: int, size: int, hva: int) -> bytearray:
    return bytearray(struct.pack("<IIQQQ", slot, flags, gpa, size, hva))


def probe() -> dict:
    """What this host's KVM offers (``vmem doctor``): never raises."""
    out = {"available": False}
    try:
        fd = os.open(KVM_DEV, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        out["reason"] = f"{KVM_DEV}: {err.strerror}"
        return out
    try:
        out["api_version"] = nat.kvm_ioctl(fd, "KVM_GET_API_VERSION")
        caps = {}
        for cap in ("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", "KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_DIRTY_LOG_RING_ACQ_REL",
                    "KVM_CAP_SPLIT_IRQCHIP", "KVM_CAP_XSAVE", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_NR_MEMSLOTS"):
            caps[cap[len("KVM_CAP_"):].lower()] = nat.kvm_ioctl(fd, "KVM_CHECK_EXTENSION", nat.KVM[cap])
        out["caps"] = caps
        out["dirty_ring_max_entries"] = caps["dirty_log_ring"] // DIRTY_GFN_BYTES
        cpuid = _supported_cpuid(fd)
        feats = []
        for leaf, reg, bit, name in ((1, 2, 0, "sse3"), (1, 3, 26, "sse2"), (1, 2, 26, "xsave"), (1, 2, 28, "avx"),
                                     (0x80000001, 3, 29, "long-mode"), (0x80000001, 3, 26, "1g-pages"),
                                     (7, 1, 5, "avx2"), (1, 2, 21, "x2apic"), (1, 2, 24, "tsc-deadline")):
            e = cpuid.get((leaf, 0))
            if e is not None and e[reg] >> bit & 1:
                feats.append(name)
        out["vcpu_features"] = feats
        out["available"] = out["api_version"] == 12 and caps["manual_dirty_log_protect2"] > 0
        if not out["available"]:
            out["reason"] = "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 missing"
    except OSError as err:
        out["reason"] = str(err)
    finally:
        os.close(fd)
    return out


def _supported_cpuid(kvm_fd: int, nent: int = 256) -> dict:
    buf = bytearray(struct.pack("<II", nent, 0) + bytes(40 * nent))
    nat.kvm_ioctl(kvm_fd, "KVM_GET_SUPPORTED_CPUID", buf=buf)
    n = struct.unpack_from("<I", buf)[0]
    out = {}
    for i in range(n):
        fn, idx, _flags, a, b, c, d = struct.unpack_from("<7I", buf, 8 + 40 * i)
        out[(fn, idx)] = (a, b, c, d)
    out["_raw"] = bytes(buf[:8 + 40 * n])
    return out


class KvmVm:
    """A VM on ``ram`` (a GuestRam mapped in this process) with the status page at
    ``status_address`` (one page of this process's memory), and one vCPU.

    Args:
        dirty_ring: enable the dirty ring (must happen before the vCPU exists; KVM then
            refuses KVM_GET_DIRTY_LOG); else the dirty log with manual protect.

    Raises:
        KvmUnavailable: no /dev/kvm, or a capability is missing (named).
    """

    def __init__(self, ram, status_address: int, *, dirty_ring: bool = False):
        self.ram = ram
        self.npages = ram.npages
        self.dirty_ring = dirty_ring
        self.kvm_fd = self.vm_fd = self.vcpu_fd = -1
        self.run_map = self.ring_map = None
        self.ring_address = 0
        self.log_dirty = False
        try:
            self.kvm_fd = os.open(KVM_DEV, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise KvmUnavailable(err.errno, f"{KVM_DEV}: {err.strerror}") from None
        try:
            self._build(status_address)
        except BaseException:
            self.close()
            raise

    def _build(self, status_address: int) -> None:
        k = self.kvm_fd
        self.vm_fd = nat.kvm_ioctl(k, "KVM_CREATE_VM", 0)
        if self.dirty_ring:
            cap = nat.kvm_ioctl(k, "KVM_CHECK_EXTENSION", nat.KVM["KVM_CAP_DIRTY_LOG_RING_ACQ_REL"])
            name = "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"
            if cap <= 0:
                cap = nat.kvm_ioctl(k, "KVM_CHECK_EXTENSION", nat.KVM["KVM_CAP_DIRTY_LOG_RING"])
                name = "KVM_CAP_DIRTY_LOG_RING"
            if cap < DIRTY_RING_ENTRIES * DIRTY_GFN_BYTES:
                raise KvmUnavailable(95, f"kernel feature KVM_CAP_DIRTY_LOG_RING is unavailable (max {cap} bytes); "
                                         "alternative: --tracker kvm-log")
            _enable_cap(self.vm_fd, name, DIRTY_RING_ENTRIES * DIRTY_GFN_BYTES)
        else:
            if nat.kvm_ioctl(k, "KVM_CHECK_EXTENSION", nat.KVM["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"]) <= 0:
                raise KvmUnavailable(95, "kernel feature KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is unavailable")
            _enable_cap(self.vm_fd, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", nat.KVM["KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE"])
        nat.kvm_ioctl(self.vm_fd, "KVM_SET_TSS_ADDR", 0xFFFBD000)
        _enable_cap(self.vm_fd, "KVM_CAP_SPLIT_IRQCHIP", 24)  # LAPIC in the kernel, no PIC/IOAPIC
        self._set_ram_slot(0)
        nat.kvm_ioctl(self.vm_fd, "KVM_SET_USER_MEMORY_REGION",
                      buf=_region(STATUS_SLOT, 0, STATUS_GPA, PAGE_SIZE, status_address))
        self.vcpu_fd = nat.kvm_ioctl(self.vm_fd, "KVM_CREATE_VCPU", 0)
        size = nat.kvm_ioctl(k, "KVM_GET_VCPU_MMAP_SIZE")
        self.run_map = mmap.mmap(self.vcpu_fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        if self.dirty_ring:
            self.ring_map = mmap.mmap(self.vcpu_fd, DIRTY_RING_ENTRIES * DIRTY_GFN_BYTES, flags=mmap.MAP_SHARED,
                                      prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                      offset=nat.KVM["KVM_DIRTY_LOG_PAGE_OFFSET"] * PAGE_SIZE)
            self.ring_address = np.frombuffer(self.ring_map, np.uint8).ctypes.data
            self.ring_fetch = np.zeros(1, np.uint32)
        cpuid = _supported_cpuid(k)["_raw"]
        nat.kvm_ioctl(self.vcpu_fd, "KVM_SET_CPUID2", buf=bytearray(cpuid))
        self.tsc_khz = nat.kvm_ioctl(self.vcpu_fd, "KVM_GET_TSC_KHZ")
        self.msr_indices = self._msr_list()

    def _set_ram_slot(self, flags: int) -> None:
        nat.kvm_ioctl(self.vm_fd, "KVM_SET_USER_MEMORY_REGION",
                      buf=_region(RAM_SLOT, flags, 0, self.npages * PAGE_SIZE, self.ram.address))

    def _msr_list(self) -> list[int]:
        buf = bytearray(struct.pack("<I", 1024) + bytes(4 * 1024))
        nat.kvm_ioctl(self.kvm_fd, "KVM_GET_MSR_INDEX_LIST", buf=buf)
        n = struct.unpack_from("<I", buf)[0]
        wanted = [i for i in struct.unpack_from(f"<{n}I", buf, 4) if i not in SKIP_MSRS]
        # Keep the MSRs this vCPU can read (KVM lists some a given CPU model lacks).
        return [i for i in wanted if self._get_msrs([i]) is not None]

    def _get_msrs(self, indices: list[int]) -> list[tuple[int, int]] | None:
        buf = bytearray(struct.pack("<II", len(indices), 0) + b"".join(struct.pack("<IIQ", i, 0, 0) for i in indices))
        n = nat.kvm_ioctl(self.vcpu_fd, "KVM_GET_MSRS", buf=buf)
        if n != len(indices):
            return None
        return [struct.unpack_from("<IIQ", buf, 8 + 16 * j)[::2] for j in range(n)]

    def _set_msrs(self, pairs: list[tuple[int, int]]) -> None:
        buf = bytearray(struct.pack("<II", len(pairs), 0) + b"".join(struct.pack("<IIQ", i, 0, v) for i, v in pairs))
        n = nat.kvm_ioctl(self.vcpu_fd, "KVM_SET_MSRS", buf=buf)
        if n != len(pairs):
            raise ValueError(f"KVM refused MSR {pairs[n][0]:#x} = {pairs[n][1]:#x}")

    # --- the vCPU ------------------------------------------------------------------------
    @property
    def exit_reason(self) -> int:
        return struct.unpack_from("<I", self.run_map, RUN_EXIT_REASON)[0]

    def io_exit(self) -> tuple[int, int, int]:
        """(direction, size, port) of a KVM_EXIT_IO."""
        direction, size, port = struct.unpack_from("<BBH", self.run_map, RUN_IO)
        return direction, size, port

    def internal_error(self) -> str:
        sub, ndata = struct.unpack_from("<II", self.run_map, RUN_INTERNAL)
        return f"suberror {sub}, data {[hex(x) for x in struct.unpack_from(f'<{min(ndata, 4)}Q', self.run_map, RUN_INTERNAL + 8)]}"

    def set_immediate_exit(self, on: bool) -> None:
        self.run_map[RUN_IMMEDIATE_EXIT] = 1 if on else 0

    def guest_tsc(self) -> int:
        return self._get_msrs([MSR_IA32_TSC])[0][1]

    def get(self, request: str, size: int) -> bytes:
        buf = bytearray(size)
        nat.kvm_ioctl(self.vcpu_fd, request, buf=buf)
        return bytes(buf)

    def put(self, request: str, data: bytes) -> None:
        nat.kvm_ioctl(self.vcpu_fd, request, buf=bytearray(data))

    def save_state(self) -> dict[str, bytes]:
        """The vCPU's complete state, section by section (the vCPU must be out of KVM_RUN)."""
        msrs = self._get_msrs(self.msr_indices) or []
        return {
            "regs": self.get("KVM_GET_REGS", REGS_BYTES),
            "sregs": self.get("KVM_GET_SREGS", SREGS_BYTES),
            "xsave": self.get("KVM_GET_XSAVE", XSAVE_BYTES),
            "lapic": self.get("KVM_GET_LAPIC", LAPIC_BYTES),
            "events": self.get("KVM_GET_VCPU_EVENTS", EVENTS_BYTES),
            "msrs": b"".join(struct.pack("<IQ", i, v) for i, v in msrs),
        }

    def load_state(self, state: dict[str, bytes]) -> None:
        """Restore :meth:`save_state`'s sections (SREGS before the MSRs: EFER and the TSC
        follow the mode).

        Raises:
            ValueError: a section has the wrong size; OSError: KVM refused it (named).
        """
        sizes = {"regs": REGS_BYTES, "sregs": SREGS_BYTES, "xsave": XSAVE_BYTES, "lapic": LAPIC_BYTES,
                 "events": EVENTS_BYTES}
        for name, size in sizes.items():
            if len(state[name]) != size:
                raise ValueError(f"vCPU state section {name} is {len(state[name])} bytes, expected {size}")
        if len(state["msrs"]) % 12:
            raise ValueError("vCPU state section msrs is not a list of (u32, u64)")
        self.put("KVM_SET_SREGS", state["sregs"])
        self.put("KVM_SET_LAPIC", state["lapic"])
        msrs = [struct.unpack_from("<IQ", state["msrs"], o) for o in range(0, len(state["msrs"]), 12)]
        self._set_msrs([(i, v) for i, v in msrs if i not in SKIP_MSRS])
        self.put("KVM_SET_XSAVE", state["xsave"])
        self.put("KVM_SET_REGS", state["regs"])
        self.put("KVM_SET_VCPU_EVENTS", state["events"])

    def boot_state(self, rip: int, rsp: int, cr3: int, gprs: dict[str, int]) -> None:
        """Long mode, flat 64-bit segments, paging on ``cr3``, SSE enabled; RIP/RSP and the
        named general registers set (the rest zero)."""
        sregs = bytearray(self.get("KVM_GET_SREGS", SREGS_BYTES))

        def seg(i: int, selector: int, type_: int, long: int, db: int) -> None:
            struct.pack_into("<QIHBBBBBBBBBx", sregs, 24 * i, 0, 0xFFFFFFFF, selector, type_, 1, 0, db, 1, long, 1, 0, 0)

        seg(0, 8, 11, 1, 0)                  # cs: execute/read, 64-bit
        for i in (1, 2, 3, 4, 5):            # ds, es, fs, gs, ss: read/write
            seg(i, 16, 3, 0, 1)
        cr0 = 0x80000000 | 0x10000 | 0x20 | 0x10 | 0x2 | 0x1   # PG WP NE ET MP PE
        cr4 = 0x20 | 0x200 | 0x400                             # PAE OSFXSR OSXMMEXCPT
        efer = 0x500                                           # LME LMA
        struct.pack_into("<QQQQQQ", sregs, 224, cr0, 0, cr3, cr4, 0, efer)
        self.put("KVM_SET_SREGS", bytes(sregs))
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"] + [f"r{i}" for i in range(8, 16)] + ["rip", "rflags"]
        values = dict.fromkeys(names, 0) | gprs | {"rip": rip, "rsp": rsp, "rflags": 0x2}
        self.put("KVM_SET_REGS", struct.pack("<18Q", *(values[n] for n in names)))

    @staticmethod
    def regs_rip(regs: bytes) -> int:
        return struct.unpack_from("<Q", regs, 16 * 8)[0]

    # --- dirty tracking --------------------------------------------------------------------
    def log_dirty_pages(self, on: bool) -> None:
        """Set or clear KVM_MEM_LOG_DIRTY_PAGES on the RAM slot (setting it write-protects
        all of RAM: every page counts as clean from now on)."""
        self._set_ram_slot(nat.KVM["KVM_MEM_LOG_DIRTY_PAGES"] if on else 0)
        self.log_dirty = on

    def collect_log(self, bitmap: np.ndarray) -> int:
        return nat.kvm_dirty_log(self.vm_fd, RAM_SLOT, bitmap, self.npages)

    def harvest_ring(self, bitmap: np.ndarray) -> int:
        """Move the ring's published entries into ``bitmap`` and re-arm their pages."""
        n = nat.kvm_ring_harvest(self.ring_address, DIRTY_RING_ENTRIES, self.ring_fetch, RAM_SLOT, bitmap, self.npages)
        nat.kvm_ioctl(self.vm_fd, "KVM_RESET_DIRTY_RINGS")
        return n

    def close(self) -> None:
        for m in ("ring_map", "run_map"):
            mm = getattr(self, m)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
                setattr(self, m, None)
        for name in ("vcpu_fd", "vm_fd", "kvm_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
