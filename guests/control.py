"""The guest control block: a small shared memfd through which a guest and its parent talk.

Layout (all fields little-endian int64, 8-byte aligned; aligned 8-byte stores are atomic
on x86 and TSO keeps them in program order, which is all this protocol relies on)::

    offset  field            written by   meaning
    0x000   MAGIC            parent       CONTROL_MAGIC
    0x008   VERSION          parent       CONTROL_VERSION
    0x010   CMD_SEQ          parent       incremented after CMD/ARG are written
    0x018   CMD              parent       a Command
    0x020   ARG              parent       command argument
    0x028   ACK_SEQ          guest        = CMD_SEQ once the command is done
    0x030   RESULT           guest        command result (>= 0) or -errno / -1
    0x038   STATE            guest        a GuestState
    0x040   PID              guest        the guest's pid
    0x048   STEPS            guest        workload steps run (survives migration)
    0x050   LAST_STEP_NS     guest        CLOCK_MONOTONIC at the end of the latest step
    0x058   FIRST_STEP_NS    guest        CLOCK_MONOTONIC at the end of the first step after a resume
    0x060   PAGES_WRITTEN    guest        pages written by the workload (survives migration)
    0x068   RAM_BASE         guest        address of the RAM mapping inside the guest
    0x070   CTX_LEN          both         bytes of context in the context area
    0x078   UFFD_FEATURES    guest        features granted by UFFDIO_API, or -errno if no uffd
    0x080   VCLOCK_NS        guest        guest virtual time (stops while paused)
    0x088   PAUSED_AT_NS     guest        CLOCK_MONOTONIC when the guest acknowledged PAUSE
    0x090   MSG_LEN          guest        bytes of JSON in the message area
    0x098   RESUMED_AT_NS    guest        CLOCK_MONOTONIC when the guest left PAUSED/INCOMING
    0x0a0   THROTTLE_PPM     guest        CPU throttle in force, parts per million (0 = none)
    0x0a8   THROTTLED_NS     guest        total time stolen by the throttle
    0x0b0   MAX_GAP_NS       guest        longest gap between two consecutive steps since the latest resume
    0x0b8   MAX_GAP_END_NS   guest        CLOCK_MONOTONIC at the end of that gap (0: no gap yet)
    0x400   message area     guest        JSON (verify results, errors), up to 3 KiB
    0x1000  context area     both         the context blob, up to CONTEXT_MAX_BYTES

A command: the parent writes CMD and ARG, then increments CMD_SEQ, then writes a byte to
the guest's socket (which wakes a guest that is idle-waiting).  The guest checks CMD_SEQ
between workload steps (a plain memory read), runs the command at that safe point, writes
RESULT, then ACK_SEQ = CMD_SEQ.  One command is in flight at a time.
"""
from __future__ import annotations

import enum
import json
import mmap
import os


__all__ = ["ControlBlock", "Command", "GuestState", "Field", "CONTEXT_MAX_BYTES"]

CONTROL_MAGIC = 0x564D454D43544C31  # "VMEMCTL1"
CONTROL_VERSION = 1
HEADER_BYTES = 4096
MSG_OFFSET = 0x400
MSG_MAX_BYTES = HEADER_BYTES - MSG_OFFSET
CONTEXT_MAX_BYTES = 1 << 20
CONTROL_BYTES = HEADER_BYTES + CONTEXT_MAX_BYTES


class Field(enum.IntEnum):
    """Index of each int64 field in the control block (see the module docstring)."""

    MAGIC = 0
    VERSION = 1
    CMD_SEQ = 2
    CMD = 3
    ARG = 4
    ACK_SEQ = 5
    RESULT = 6
    STATE = 7
    PID = 8
    STEPS = 9
    LAST_STEP_NS = 10
    FIRST_STEP_NS = 11
    PAGES_WRITTEN = 12
    RAM_BASE = 13
    CTX_LEN = 14
    UFFD_FEATURES = 15
    VCLOCK_NS = 16
    PAUSED_AT_NS = 17
    MSG_LEN = 18
    RESUMED_AT_NS = 19
    THROTTLE_PPM = 20
    THROTTLED_NS = 21
    MAX_GAP_NS = 22
    MAX_GAP_END_NS = 23


class Command(enum.IntEnum):
    """Commands a parent can post.  Explicit numbers; 0 is invalid."""

    INVALID = 0
    PAUSE = 1          # stop at the next safe point, save context, acknowledge
    RESUME = 2         # from PAUSED or INCOMING: (restore context if INCOMING) and run
    EXIT = 3           # exit cleanly with status 0
    VERIFY = 4         # check all RAM against the ledger; JSON result in the message area
    MPROT_START = 5    # install the mprotect tracker (bitmap memfd arrives on the socket)
    MPROT_COLLECT = 6  # move dirty bits to the harvest bitmap and re-protect; RESULT = pages
    MPROT_STOP = 7     # remove the mprotect tracker
    SEND_UFFD = 8      # send the guest's userfaultfd over the socket (SCM_RIGHTS)
    THROTTLE = 9       # ARG = fraction of guest time to steal, in ppm (auto-converge)
    DETACH = 10        # outlive the parent and serve an owner socket; its path and the owner
                       # token (hex) in the message area; see guests/owner.py
    KVM_DIRTY_START = 11   # KVM guest: arm the dirty log (ARG 0) or ring (ARG 1); bitmap memfd on the socket
    KVM_DIRTY_COLLECT = 12 # KVM guest: harvest dirty pages into the bitmap and re-arm them; RESULT = pages
    KVM_DIRTY_STOP = 13    # KVM guest: disarm dirty tracking
    PREPARE = 14           # a pause (running) or a resume (incoming) follows soon: rehearse its
                           # path once, results discarded (RESULT 0; -22 from older runtimes)


class GuestState(enum.IntEnum):
    """The guest's own view of itself."""

    INVALID = 0
    BOOTING = 1
    RUNNING = 2
    PAUSED = 3
    INCOMING = 4   # destination guest: RAM not yet valid, waiting for RESUME with context
    EXITED = 5
    FAILED = 6


class ControlBlock:
    """The mapped control block.  Both sides construct one over the same memfd."""

    def __init__(self, fd: int):
        self.fd = fd
        self._mmap = mmap.mmap(fd, CONTROL_BYTES, flags=mmap.MAP_SHARED)
        # A memoryview cast to int64 indexes in ~30 ns: cheap enough to poll every step.
        self._mv = memoryview(self._mmap)
        self.fields = self._mv[:HEADER_BYTES].cast("q")

    @classmethod
    def create(cls) -> "ControlBlock":
        """Create a fresh block (parent side)."""
        fd = os.memfd_create("vmem-ctl", os.MFD_CLOEXEC)
        os.ftruncate(fd, CONTROL_BYTES)
        block = cls(fd)
        block.fields[Field.MAGIC] = CONTROL_MAGIC
        block.fields[Field.VERSION] = CONTROL_VERSION
        return block

    def check(self) -> None:
        if self.fields[Field.MAGIC] != CONTROL_MAGIC or self.fields[Field.VERSION] != CONTROL_VERSION:
            raise ValueError("not a vmem control block of a supported version")

    def __getitem__(self, field: Field) -> int:
        return self.fields[field]

    def __setitem__(self, field: Field, value: int) -> None:
        self.fields[field] = value

    @property
    def state(self) -> GuestState:
        try:
            return GuestState(self.fields[Field.STATE])
        except ValueError:
            return GuestState.INVALID

    # --- context area -------------------------------------------------------------
    def write_context(self, blob: bytes) -> None:
        if len(blob) > CONTEXT_MAX_BYTES:
            raise ValueError(f"context of {len(blob)} bytes exceeds {CONTEXT_MAX_BYTES}")
        self._mv[HEADER_BYTES : HEADER_BYTES + len(blob)] = blob
        self.fields[Field.CTX_LEN] = len(blob)

    def read_context(self) -> bytes:
        n = self.fields[Field.CTX_LEN]
        if not 0 <= n <= CONTEXT_MAX_BYTES:
            raise ValueError(f"corrupt context length {n}")
        return bytes(self._mv[HEADER_BYTES : HEADER_BYTES + n])

    # --- message area -------------------------------------------------------------
    def write_message(self, obj) -> None:
        data = json.dumps(obj, default=str).encode()
        if len(data) > MSG_MAX_BYTES:
            data = json.dumps({"truncated": data[: MSG_MAX_BYTES - 64].decode(errors="replace")}).encode()
        self._mv[MSG_OFFSET : MSG_OFFSET + len(data)] = data
        self.fields[Field.MSG_LEN] = len(data)

    def read_message(self):
        n = self.fields[Field.MSG_LEN]
        if not 0 < n <= MSG_MAX_BYTES:
            return None
        return json.loads(bytes(self._mv[MSG_OFFSET : MSG_OFFSET + n]))

    def close(self) -> None:
        if self._mmap is None:
            return
        from vmem.ram import close_mapping

        self.fields.release()
        self._mv.release()
        close_mapping(self._mmap)
        self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
