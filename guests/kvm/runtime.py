"""The KVM guest process: one VM, its vCPU thread, and the control-block command loop.

Run by :class:`guests.kvm.launch.KvmGuest` as ``python -m guests.kvm.runtime ...``.  It is
the process guest's runtime (guests/runtime.py: control block, socket, owner take-over,
userfaultfd for post-copy) with the workload replaced by a real vCPU running
guests/kvm/program.S:

* the vCPU runs in its own thread (KVM_RUN without the GIL); it serves the program's
  hypercalls (sleep, fatal) and KVM_EXIT_DIRTY_RING_FULL;
* PAUSE kicks it out of KVM_RUN (``immediate_exit`` + SIGUSR1) wherever it is, parks the
  thread and saves the vCPU state as the context (guests/kvm/context.py);
* RESUME of an incoming guest validates and loads that context; the guest's clock
  conversion (its TSC to this host's CLOCK_MONOTONIC) is refreshed at every resume, so its
  own step stamps are comparable with the source's;
* KVM_DIRTY_START/COLLECT/STOP drive the dirty log or the dirty ring: KVM ioctls on a VM
  must come from the process that created it, so tracking is a command, like mprotect's.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np

from guests.control import Command, Field, GuestState
from guests.kvm import context as kctx
from guests.kvm import layout as L
from guests.kvm.vm import KvmVm
from guests.runtime import GuestRuntime
from vmem import _native as nat

KICK_SIGNAL = signal.SIGUSR1
#: how often a thread harvests the dirty ring while tracking (see _harvest_ring_early)
RING_HARVEST_S = 0.02


class KvmRuntime(GuestRuntime):
    def __init__(self, args):
        super().__init__(args)
        self.spec_params = json.loads(args.params)
        self.dirty_mode = self.spec_params.pop("dirty", "log")
        if self.dirty_mode not in ("log", "ring"):
            raise ValueError(f"dirty mode must be log or ring, not {self.dirty_mode!r}")
        # The guest's status device: a page of the control block the host never reads as a
        # command field (L.STATUS_OFFSET), so the guest cannot forge an acknowledgement.
        self.status = np.frombuffer(self.ctl._mmap, np.int64, count=512, offset=L.STATUS_OFFSET)
        self.status_address = self.status.ctypes.data
        self.vm = KvmVm(self.ram, self.status_address, dirty_ring=self.dirty_mode == "ring")
        self.layout = L.layout_pages(self.ram.npages)
        self.cv = threading.Condition()
        self.park_req = True
        self.parked = False
        self.quit = False
        self.last_exit_ns = 0
        self.vcpu_error: str | None = None
        self.sleep_wake = threading.Event()
        self.ring_lock = threading.Lock()
        self.bitmap_map = None
        self.pending = self.harvest = None
        self.tracking = False
        self.ring_overflows = 0
        signal.signal(KICK_SIGNAL, lambda *_: None)  # its only job: make KVM_RUN return EINTR
        self.vcpu_thread = threading.Thread(target=self._vcpu_loop, name="vcpu0", daemon=True)
        self.vcpu_thread.start()

    # --- boot and context ------------------------------------------------------------------
    def boot(self) -> None:
        from guests.memory import GuestMemory, _FILL_K

        n = self.ram.npages
        words = self.ram.pages.view(np.uint64)
        params = {k: v for k, v in self.spec_params.items()}
        fill = bool(params.get("fill", True))
        page = L.params_page(n, self.args.workload, params, self.args.seed, self.vm.tsc_khz * 1000)
        mem = GuestMemory(self.ram.pages[:self.layout]).format()
        if fill:
            mem.fill_all()
        fw = self.layout
        code = L.program_bytes()
        self.ram.pages[fw + L.FW_CODE:fw + L.FW_CODE + 2].reshape(-1)[:len(code)] = np.frombuffer(code, np.uint8)
        words[fw + L.FW_K] = _FILL_K
        words[fw + L.FW_PML4:fw + L.FW_PD + 4] = L.page_tables(n)
        page[L.P.VSTART] = self.vm.guest_tsc()
        words[fw + L.FW_PARAMS] = page
        self.vm.boot_state(L.firmware_gpa(n, L.FW_CODE), L.firmware_gpa(n, L.FW_STACK) + 4096,
                           L.firmware_gpa(n, L.FW_PML4),
                           {"r15": L.firmware_gpa(n, L.FW_PARAMS), "r14": L.STATUS_GPA, "r13": L.firmware_gpa(n, L.FW_K)})
        self._start_vcpu()

    def _start_vcpu(self) -> None:
        """Refresh the guest's clock conversion, reset the gap bookkeeping, run the vCPU."""
        f, st = self.ctl.fields, self.status
        tsc, now = self.vm.guest_tsc(), time.monotonic_ns()
        st[L.S_CLK_TSC_BASE] = tsc
        st[L.S_CLK_NS_BASE] = now
        st[L.S_CLK_MULT] = (10**6 << 32) // self.vm.tsc_khz
        st[L.S_GAP_FROM_NS] = 0
        st[Field.MAX_GAP_NS] = 0
        st[Field.MAX_GAP_END_NS] = 0
        st[Field.RESUMED_AT_NS] = now
        f[Field.RESUMED_AT_NS] = now
        f[Field.STATE] = GuestState.RUNNING
        self.running = True
        with self.cv:
            self.park_req = False
            self.cv.notify_all()

    def _park_vcpu(self, timeout_s: float = 5.0) -> int:
        """Kick the vCPU out of KVM_RUN and wait until its thread is parked; returns when
        it last left KVM_RUN (CLOCK_MONOTONIC ns)."""
        with self.cv:
            self.park_req = True
        self.vm.set_immediate_exit(True)
        self.sleep_wake.set()
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while not self.parked:
                if self.vcpu_thread.ident is not None and self.vcpu_thread.is_alive():
                    signal.pthread_kill(self.vcpu_thread.ident, KICK_SIGNAL)
                if time.monotonic() > deadline:
                    raise TimeoutError("the vCPU did not leave KVM_RUN")
                self.cv.wait(0.001)
        self.vm.set_immediate_exit(False)
        self.sleep_wake.clear()
        self.running = False
        return self.last_exit_ns

    def context_blob(self) -> bytes:
        st = self.status
        meta = {"steps": int(st[Field.STEPS]), "pages_written": int(st[Field.PAGES_WRITTEN]),
                "throttled_ns": int(st[Field.THROTTLED_NS]), "tsc_khz": self.vm.tsc_khz,
                "npages": self.ram.npages, "dirty": self.dirty_mode}
        return kctx.pack(self.vm.save_state(), meta)

    def restore(self, blob: bytes) -> None:
        state, meta = kctx.unpack(blob, self.ram.npages)
        self.vm.load_state(state)
        st = self.status
        st[Field.STEPS] = int(meta["steps"])
        st[Field.PAGES_WRITTEN] = int(meta["pages_written"])
        st[Field.THROTTLED_NS] = int(meta["throttled_ns"])

    # --- the vCPU thread ---------------------------------------------------------------------
    def _vcpu_loop(self) -> None:
        vm, f = self.vm, self.status
        io, ring_full, intr = nat.KVM["KVM_EXIT_IO"], nat.KVM["KVM_EXIT_DIRTY_RING_FULL"], nat.KVM["KVM_EXIT_INTR"]
        while True:
            with self.cv:
                while self.park_req and not self.quit:
                    self.parked = True
                    self.cv.notify_all()
                    self.cv.wait()
                self.parked = False
                if self.quit:
                    return
            rc = nat.kvm_run(vm.vcpu_fd)
            self.last_exit_ns = time.monotonic_ns()
            if rc == -errno.EINTR:
                continue
            reason = vm.exit_reason
            if rc == 0 and reason == io:
                _dir, _size, port = vm.io_exit()
                if port == L.PORT_SLEEP:
                    wait_ns = f[L.S_SLEEP_UNTIL_NS] - time.monotonic_ns()
                    if wait_ns > 0:
                        self.sleep_wake.wait(wait_ns / 1e9)
                    if f[L.S_GAP_FROM_NS]:
                        f[L.S_GAP_FROM_NS] = time.monotonic_ns()  # a chosen sleep is not a gap suffered
                    continue
                self._vcpu_failed(f"the guest program reported fatal error {f[L.S_ERROR]} (port {port:#x})")
            elif rc == 0 and reason == ring_full:
                if self._harvest_ring_early() == 0:
                    self._vcpu_failed("KVM reported its dirty ring full but published no entry (the ring overflowed; "
                                      "use the dirty log: --tracker kvm-log)")
                    return
                continue
            elif rc == 0 and reason == intr:
                continue
            elif rc < 0:
                self._vcpu_failed(f"KVM_RUN failed: {os.strerror(-rc)}")
            else:
                detail = vm.internal_error() if reason == nat.KVM["KVM_EXIT_INTERNAL_ERROR"] else ""
                rip = vm.regs_rip(vm.get("KVM_GET_REGS", 144))
                self._vcpu_failed(f"vCPU exit reason {reason} at rip {rip:#x} {detail}".strip())
            return

    def _harvest_ring_early(self) -> int:
        """Move the ring's entries into the pending half (before the next collect).

        This KVM publishes an entry per emulated store, not per page, and does not stop the
        vCPU at the ring's soft limit in time: a ring left alone overflows within a second or
        two.  So while tracking, a thread harvests it every RING_HARVEST_S; an overflow (the
        whole ring found full) may have lost entries, and then every page counts as dirty
        (a page sent twice is harmless, a lost write is not)."""
        from guests.kvm.vm import DIRTY_RING_ENTRIES

        with self.ring_lock:
            pending = self.pending if self.pending is not None else np.zeros(-(-self.ram.npages // 64), np.uint64)
            n = self.vm.harvest_ring(pending)
            if n >= DIRTY_RING_ENTRIES and self.pending is not None:
                self.pending[:] = np.uint64((1 << 64) - 1)
                self.ring_overflows += 1
        return n

    def _ring_harvester(self) -> None:
        while self.tracking and not self.quit:
            time.sleep(RING_HARVEST_S)
            if self.tracking:
                self._harvest_ring_early()

    def _vcpu_failed(self, why: str) -> None:
        self.vcpu_error = why
        with self.cv:
            self.parked = True
            self.cv.notify_all()

    # --- commands ------------------------------------------------------------------------------
    def handle(self, seq: int) -> None:
        ctl = self.ctl
        cmd, arg = ctl[Field.CMD], ctl[Field.ARG]
        handlers = {Command.PAUSE: self._pause, Command.RESUME: self._resume, Command.THROTTLE: self._throttle,
                    Command.VERIFY: lambda _arg: -errno.EOPNOTSUPP,  # checked from outside (KvmGuest.verify)
                    Command.MPROT_START: lambda _arg: -errno.EOPNOTSUPP,
                    Command.KVM_DIRTY_START: self._dirty_start, Command.KVM_DIRTY_COLLECT: self._dirty_collect,
                    Command.KVM_DIRTY_STOP: self._dirty_stop,
                    Command.PREPARE: lambda _arg: 0}  # nothing to rehearse: the context is the vCPU's registers
        fn = handlers.get(cmd)
        if fn is None:
            return super().handle(seq)
        try:
            result = fn(arg)
        except OSError as err:
            result = -(err.errno or 1)
            ctl.write_message({"error": f"{Command(cmd).name}: {err}"})
        except Exception as err:
            result = -errno.EINVAL
            ctl.write_message({"error": f"{Command(cmd).name}: {err}", "traceback": traceback.format_exc()[-1500:]})
        ctl[Field.RESULT] = result
        ctl[Field.ACK_SEQ] = seq
        self._notify_parent()

    def _pause(self, _arg: int) -> int:
        if self.running:
            self.ctl[Field.PAUSED_AT_NS] = self._park_vcpu()
            blob = self.context_blob()
            if len(blob) > L.STATUS_OFFSET - 4096:
                raise ValueError(f"vCPU context of {len(blob)} bytes would overlap the status page")
            self.ctl.write_context(blob)
            self.ctl[Field.STATE] = GuestState.PAUSED
        return 0

    def _resume(self, _arg: int) -> int:
        state = self.ctl.state
        if state == GuestState.INCOMING:
            self.restore(self.ctl.read_context())
        elif state != GuestState.PAUSED:
            return 0
        self._start_vcpu()
        return 0

    def _throttle(self, arg: int) -> int:
        if not 0 <= arg <= 990_000:
            return -errno.EINVAL
        self.ctl[Field.THROTTLE_PPM] = arg
        self.status[Field.THROTTLE_PPM] = arg  # the guest program reads it after every step
        return 0

    def _dirty_start(self, arg: int) -> int:
        want = "ring" if arg == 1 else "log"
        if want != self.dirty_mode:
            self.ctl.write_message({"error": f"this KVM guest was created with the dirty {self.dirty_mode} "
                                             f"(the ring must be enabled before the vCPU exists); "
                                             f"use --tracker kvm-{self.dirty_mode} or boot it with dirty={want}"})
            return -errno.EOPNOTSUPP
        if not self.pending_fds:
            self._drain_socket()
        if not self.pending_fds:
            return -errno.EBADF
        fd = self.pending_fds.pop(0)
        nwords = -(-self.ram.npages // 64)
        self.bitmap_map = mmap.mmap(fd, 2 * nwords * 8, flags=mmap.MAP_SHARED)
        os.close(fd)
        words = np.frombuffer(self.bitmap_map, np.uint64)
        self.pending, self.harvest = words[:nwords], words[nwords:]
        if self.dirty_mode == "ring":
            with self.ring_lock:
                self.vm.harvest_ring(self.pending)  # entries from before the start do not count
                self.pending[:] = 0
        self.vm.log_dirty_pages(True)
        self.tracking = True
        if self.dirty_mode == "ring":
            threading.Thread(target=self._ring_harvester, name="ring-harvester", daemon=True).start()
        return 0

    def _dirty_collect(self, _arg: int) -> int:
        if not self.tracking:
            return -errno.EINVAL
        if self.dirty_mode == "log":
            return self.vm.collect_log(self.harvest)
        with self.ring_lock:
            self.harvest[:] = self.pending
            self.pending[:] = 0
            self.vm.harvest_ring(self.harvest)
        # The count of harvested pages (the tracker sizes its decode by it); in C -- numpy's
        # unpackbits of a 1 GiB guest's bitmap costs ~0.5 ms.
        return nat.bitmap_count(self.harvest, self.harvest.size * 64)

    def _dirty_stop(self, _arg: int) -> int:
        if self.tracking:
            self.vm.log_dirty_pages(False)
            self.tracking = False
        if self.dirty_mode == "ring":
            with self.ring_lock:
                self.vm.harvest_ring(np.zeros(-(-self.ram.npages // 64), np.uint64))
        self.pending = self.harvest = None
        if self.bitmap_map is not None:
            try:
                self.bitmap_map.close()
            except BufferError:
                pass
            self.bitmap_map = None
        return 0

    # --- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        fields = self.ctl.fields
        while True:
            seq = fields[Field.CMD_SEQ]
            if seq != self.last_seq:
                self.last_seq = seq
                self.handle(seq)
                continue
            if self.vcpu_error is not None:
                raise RuntimeError(self.vcpu_error)
            self._wait(0.02)

    def shutdown(self) -> None:
        with self.cv:
            self.quit = True
            self.park_req = True
            self.cv.notify_all()
        self.vm.set_immediate_exit(True)
        self.sleep_wake.set()
        if self.vcpu_thread.is_alive():
            signal.pthread_kill(self.vcpu_thread.ident, KICK_SIGNAL)
            self.vcpu_thread.join(2)


def main(argv=None) -> int:
    from guests.runtime import runtime_argument_parser

    args = runtime_argument_parser("python -m guests.kvm.runtime", __doc__.split("\n\n")[0]).parse_args(argv)
    nat.set_pdeathsig(signal.SIGKILL)
    if os.getppid() == 1:
        return 1
    from guests.control import ControlBlock

    rt = None
    try:
        rt = KvmRuntime(args)
        if args.mode == "boot":
            rt.ctl[Field.STATE] = GuestState.BOOTING
            rt.boot()
        else:
            rt.ctl[Field.STATE] = GuestState.INCOMING
        rt.run()
    except SystemExit:
        raise
    except BaseException as err:
        ctl = rt.ctl if rt is not None else ControlBlock(args.ctl_fd)
        ctl.write_message({"error": f"KVM guest failed: {type(err).__name__}: {err}",
                           "traceback": traceback.format_exc()[-2000:]})
        ctl[Field.STATE] = GuestState.FAILED
        return 1
    finally:
        if rt is not None:
            rt.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
