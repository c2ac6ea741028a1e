"""Tests of vmem._native (the cffi layer) and vmem.features, against the real kernel.

Anything that installs signal handlers, blocks on userfaultfd faults or fills the VMA
table runs in a child process (``python -c``) driven over a line protocol on its
stdin/stdout; every child is registered with the ``children`` fixture and killed+reaped at
teardown even when the test fails.  Nothing is written to the file system (memfds only;
children disable core dumps).
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from vmem import _native as nat
from vmem import features as vfeatures
from vmem.errors import FeatureUnavailable

PAGE = nat.PAGE_SIZE
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPLY_TIMEOUT_S = 60.0

# Prelude of every child script: imports, no core files, a reply helper.
CHILD_PRELUDE = """
import json, mmap, os, resource, signal, socket, sys
import numpy as np
from vmem import _native as nat
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
PAGE = nat.PAGE_SIZE
def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\\n")
    sys.stdout.flush()
def pages_of(bitmap):
    return np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little")).tolist()
def map_ram(npages, fd=-1, name="vmem-test"):
    # (fd, mmap, (npages, PAGE) uint8 view) of a shared memfd mapping; fd < 0: a new memfd.
    if fd < 0:
        fd = nat.memfd_create(name)
        os.ftruncate(fd, npages * PAGE)
    m = mmap.mmap(fd, npages * PAGE, flags=mmap.MAP_SHARED)
    return fd, m, np.frombuffer(m, dtype=np.uint8).reshape(npages, PAGE)
"""


# --- helpers ---------------------------------------------------------------------------
def _probe():
    return vfeatures.probe_features()


def _skip_unless(*names: str) -> None:
    feats = _probe()
    for name in names:
        f = feats[name]
        if not f.available:
            pytest.skip(f"{name} unavailable here: {f.detail}")


class Child:
    """A ``python -c`` child speaking one JSON line per command on stdin/stdout."""

    def __init__(self, script: str, args=(), pass_fds=()):
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("PYTHONFAULTHANDLER", None)  # its SIGSEGV handler must not sit above ours
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(script), *map(str, args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            pass_fds=pass_fds,
            env=env,
        )
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")

    def recv(self, timeout: float = REPLY_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child {self.pid} did not answer in {timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    err = self.stderr_text()
                    raise EOFError(f"child {self.pid} exited (status {self.proc.poll()}): {err[-2000:]}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, line: str, timeout: float = REPLY_TIMEOUT_S):
        self.send(line)
        return self.recv(timeout)

    def stderr_text(self) -> str:
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")

    def reap(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


@pytest.fixture
def children():
    """Spawn children with ``children(script, args, pass_fds)``; all are killed and reaped at teardown."""
    spawned: list[Child] = []

    def spawn(script: str, args=(), pass_fds=()) -> Child:
        child = Child(script, args, pass_fds)
        spawned.append(child)
        return child

    try:
        yield spawn
    finally:
        for child in spawned:
            child.reap()


def regions_to_pages(regions: np.ndarray, base: int) -> list[int]:
    out: list[int] = []
    for start, end, _cat in regions.tolist():
        out.extend(range((start - base) // PAGE, (end - base) // PAGE))
    return out


def scan_written(pagemap_fd: int, base: int, npages: int, *, rearm: bool = True) -> np.ndarray:
    flags = nat.PM_SCAN_CHECK_WPASYNC | (nat.PM_SCAN_WP_MATCHING if rearm else 0)
    return nat.pagemap_scan(
        pagemap_fd, base, base + npages * PAGE, flags=flags,
        category_mask=nat.PAGE_IS_WRITTEN, return_mask=nat.PAGE_IS_WRITTEN,
    )


@pytest.fixture
def page_buffer():
    """A page-aligned anonymous buffer factory (UFFDIO_COPY needs an aligned source)."""
    maps: list[mmap.mmap] = []

    def make(npages: int) -> tuple[np.ndarray, int]:
        m = mmap.mmap(-1, npages * PAGE)
        maps.append(m)
        arr = np.frombuffer(m, dtype=np.uint8).reshape(npages, PAGE)
        return arr, arr.ctypes.data

    yield make
    for m in maps:
        try:
            m.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process


# --- memfd -----------------------------------------------------------------------------
def test_memfd_round_trip():
    fd = nat.memfd_create(f"vmem-test-{os.getpid()}")
    try:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:vmem-test-{os.getpid()}")
        assert os.fstat(fd).st_size == 0
        os.ftruncate(fd, 3 * PAGE)
        a = mmap.mmap(fd, 3 * PAGE, flags=mmap.MAP_SHARED)
        b = mmap.mmap(fd, 3 * PAGE, flags=mmap.MAP_SHARED)
        try:
            payload = os.urandom(PAGE)
            a[PAGE : 2 * PAGE] = payload
            assert b[PAGE : 2 * PAGE] == payload  # same shmem pages through both mappings
            assert os.pread(fd, PAGE, PAGE) == payload
            os.pwrite(fd, b"xyz", 2 * PAGE + 5)
            assert a[2 * PAGE + 5 : 2 * PAGE + 8] == b"xyz"
        finally:
            a.close()
            b.close()
    finally:
        os.close(fd)


def test_memfd_errors_carry_errno_and_context():
    with pytest.raises(OSError) as exc:
        nat.memfd_create("bad-flags", 0x7FFF0000)
    assert exc.value.errno == 22
    assert "memfd_create" in str(exc.value)


# --- userfaultfd API --------------------------------------------------------------------
def test_uffd_api_probe():
    _skip_unless("userfaultfd")
    fd, how = nat.uffd_open_ex()
    try:
        assert how in ("syscall", "syscall+UFFD_USER_MODE_ONLY", "/dev/userfaultfd")
        mask = nat.uffd_api(fd, 0)
        assert mask != 0
        assert nat.uffd_feature_names(mask)
        # The handshake is once per fd.
        with pytest.raises(OSError) as exc:
            nat.uffd_api(fd, 0)
        assert exc.value.errno == 22 and "UFFDIO_API" in str(exc.value)
    finally:
        os.close(fd)
    # The feature table agrees with the kernel's mask.
    feats = _probe()
    for name, bit in nat.UFFD_FEATURE_NAMES.items():
        assert feats[f"UFFD_FEATURE_{name}"].available == bool(mask & bit), name


def test_uffd_api_enables_wp_async_and_rejects_unknown_bits():
    _skip_unless("UFFD_FEATURE_WP_ASYNC", "UFFD_FEATURE_WP_UNPOPULATED")
    fd = nat.uffd_open()
    try:
        want = nat.UFFD_FEATURE_WP_ASYNC | nat.UFFD_FEATURE_WP_UNPOPULATED
        assert nat.uffd_api(fd, want) & want == want
    finally:
        os.close(fd)
    fd = nat.uffd_open()
    try:
        with pytest.raises(OSError) as exc:
            nat.uffd_api(fd, 1 << 62)
        assert exc.value.errno == 22
    finally:
        os.close(fd)


# --- async WP + PAGEMAP_SCAN, cross-process ----------------------------------------------
WP_CHILD = """
npages = int(sys.argv[1])
self_protect = sys.argv[2] == "1"
sock_fd = int(sys.argv[3])
fd, m, ram = map_ram(npages, name="vmem-test-wp")
base = ram.ctypes.data
uffd = nat.uffd_open()
nat.uffd_api(uffd, nat.UFFD_FEATURE_WP_ASYNC | nat.UFFD_FEATURE_WP_UNPOPULATED)
nat.uffd_register(uffd, base, npages * PAGE, nat.UFFDIO_REGISTER_MODE_WP)
if self_protect:
    nat.uffd_writeprotect(uffd, base, npages * PAGE, True)
if sock_fd >= 0:
    with socket.socket(fileno=sock_fd) as s:
        socket.send_fds(s, [b"u"], [uffd])
reply({"base": base})
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "write":
        idx = np.array(json.loads(arg), dtype=np.int64)
        ram[idx, 17] += 1
    reply({"ok": True})
"""


def test_uffd_wp_async_pagemap_scan_from_another_process(children):
    _skip_unless("PAGEMAP_SCAN")
    npages = 4096
    child = children(WP_CHILD, [npages, 1, -1])
    base = child.recv()["base"]
    pm = nat.open_pagemap(child.pid)
    try:
        assert len(scan_written(pm, base, npages)) == 0  # write-protected, nothing written yet

        first = [0, 3, 4, 5, 6, 700, 2048, 4095]
        child.ask(f"write {json.dumps(first)}")
        regions = scan_written(pm, base, npages)
        assert regions.dtype == np.uint64 and regions.shape[1] == 3
        assert np.all(regions[:, 2] == nat.PAGE_IS_WRITTEN)
        assert regions_to_pages(regions, base) == first
        assert len(regions) == 5  # [0], [3..6], [700], [2048], [4095]: runs are single regions
        assert len(scan_written(pm, base, npages)) == 0  # the first scan re-protected them

        second = [5, 6, 1000]
        child.ask(f"write {json.dumps(second)}")
        assert regions_to_pages(scan_written(pm, base, npages), base) == second
        assert len(scan_written(pm, base, npages)) == 0
    finally:
        os.close(pm)


def test_pagemap_scan_spans_many_output_buffers(children):
    """More regions than one ioctl's vector (4096): the wrapper loops on walk_end."""
    _skip_unless("PAGEMAP_SCAN")
    npages = 3 * 4096 * 2
    child = children(WP_CHILD, [npages, 1, -1])
    base = child.recv()["base"]
    pm = nat.open_pagemap(child.pid)
    try:
        every_other = list(range(0, npages, 2))  # 12288 separate regions
        child.ask(f"write {json.dumps(every_other)}")
        regions = scan_written(pm, base, npages)
        assert len(regions) == len(every_other)
        assert regions_to_pages(regions, base) == every_other
        assert len(scan_written(pm, base, npages)) == 0
        child.ask(f"write {json.dumps(list(range(100, 300)))}")
        limited = nat.pagemap_scan(
            pm, base, base + npages * PAGE, flags=nat.PM_SCAN_WP_MATCHING | nat.PM_SCAN_CHECK_WPASYNC,
            category_mask=nat.PAGE_IS_WRITTEN, return_mask=nat.PAGE_IS_WRITTEN, max_pages=50,
        )
        assert regions_to_pages(limited, base) == list(range(100, 150))
        assert regions_to_pages(scan_written(pm, base, npages), base) == list(range(150, 300))
    finally:
        os.close(pm)


@pytest.mark.parametrize("helper_only", [False, True], ids=["shared", "helper-only"])
def test_pagemap_scan_split_reports_and_rearms_what_one_walk_does(children, helper_only):
    """The final collect's split walk: chunks walked by this thread and the helper (or the
    helper alone: it must see every page) give the pages one walk gives, across chunk
    edges, past a chunk whose region slice fills (1,024 regions), in a last partial chunk;
    and re-protect them (a second walk finds nothing)."""
    _skip_unless("PAGEMAP_SCAN")
    chunk_pages = nat._SPLIT_MIN_CHUNK_BYTES // PAGE  # 8192: the range below is 3 chunks and a part
    npages = 3 * chunk_pages + 1000
    child = children(WP_CHILD, [npages, 1, -1])
    base = child.recv()["base"]
    pm = nat.open_pagemap(child.pid)
    split_args = dict(flags=nat.PM_SCAN_WP_MATCHING | nat.PM_SCAN_CHECK_WPASYNC,
                      category_mask=nat.PAGE_IS_WRITTEN, return_mask=nat.PAGE_IS_WRITTEN, helper_only=helper_only)
    try:
        crowded = list(range(chunk_pages + 10, chunk_pages + 10 + 2 * 3000, 2))  # 3,000 regions in chunk 1
        written = sorted({0, 1, chunk_pages - 1, chunk_pages, *crowded, 2 * chunk_pages - 1, 2 * chunk_pages + 5,
                          3 * chunk_pages, npages - 1})
        child.ask(f"write {json.dumps(written)}")
        nat.scan_helper_arm(0.01)
        regions, helper_chunks = nat.pagemap_scan_split(pm, base, base + npages * PAGE, **split_args)
        assert regions_to_pages(regions, base) == written
        assert np.all(regions[:, 2] == nat.PAGE_IS_WRITTEN)
        if helper_only:
            assert helper_chunks == 4
        assert 0 <= helper_chunks <= 4
        again, _ = nat.pagemap_scan_split(pm, base, base + npages * PAGE, **split_args)
        assert len(again) == 0 and len(scan_written(pm, base, npages)) == 0
        # the same written again, found by a plain walk: the split walk left nothing half-armed
        child.ask(f"write {json.dumps(written)}")
        assert regions_to_pages(scan_written(pm, base, npages), base) == written
    finally:
        os.close(pm)


@pytest.mark.parametrize("err", [errno.EBUSY, errno.EAGAIN], ids=["busy", "no-thread"])
def test_pagemap_scan_split_walks_alone_when_the_helper_is_unavailable(children, monkeypatch, err):
    """Nothing walked by the split (another split walk runs in the process, or the helper
    thread cannot be started): the caller walks alone and loses nothing; an EINVAL is not
    papered over."""
    _skip_unless("PAGEMAP_SCAN")
    npages = 4096
    child = children(WP_CHILD, [npages, 1, -1])
    base = child.recv()["base"]
    pm = nat.open_pagemap(child.pid)
    real = nat.lib

    class Unavailable:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def vmem_pagemap_scan_split(*args):
            out = args[-1]
            out[0], out[1], out[2] = 0, 0, -1  # as the C does before it refuses
            return -err

    args = dict(flags=nat.PM_SCAN_WP_MATCHING | nat.PM_SCAN_CHECK_WPASYNC,
                category_mask=nat.PAGE_IS_WRITTEN, return_mask=nat.PAGE_IS_WRITTEN)
    try:
        written = [3, 4, 700, 4095]
        child.ask(f"write {json.dumps(written)}")
        monkeypatch.setattr(nat, "lib", Unavailable())
        regions, helper_chunks = nat.pagemap_scan_split(pm, base, base + npages * PAGE, **args)
        assert regions_to_pages(regions, base) == written and helper_chunks == 0
        with pytest.raises(OSError) as refused:  # the tests' helper-only walk does not fall back
            nat.pagemap_scan_split(pm, base, base + npages * PAGE, helper_only=True, **args)
        assert refused.value.errno == err
        monkeypatch.setattr(nat, "lib", real)
        assert len(scan_written(pm, base, npages)) == 0, "the walk alone re-armed them"
    finally:
        os.close(pm)


def test_pagemap_scan_split_refusals():
    """More chunks than the job holds, or a chunk not a whole number of pages: EINVAL, and
    nothing walked; an error of the walk itself names the chunk."""
    vec, counts, ends, out = nat._split_buffers()
    args = (nat.PM_SCAN_CHECK_WPASYNC, 0, nat.PAGE_IS_WRITTEN, 0, nat.PAGE_IS_WRITTEN, 1, vec, counts, ends, out)
    too_many = (nat.lib.VMEM_SCAN_SPLIT_MAX_CHUNKS + 1) * PAGE
    assert nat.lib.vmem_pagemap_scan_split(-1, 0, too_many, PAGE, *args) == -errno.EINVAL
    assert nat.lib.vmem_pagemap_scan_split(-1, 0, 1 << 20, PAGE + 1, *args) == -errno.EINVAL
    with pytest.raises(OSError) as err:
        nat.pagemap_scan_split(-1, 1 << 30, (1 << 30) + (64 << 20), flags=0, category_mask=nat.PAGE_IS_WRITTEN,
                               return_mask=nat.PAGE_IS_WRITTEN)
    assert err.value.errno == errno.EBADF and "PAGEMAP_SCAN" in str(err.value)


def test_uffd_received_over_unix_socket_writeprotects_the_childs_pages(children):
    """The migrator holds the guest's uffd and (un)protects the guest's addresses with it."""
    _skip_unless("PAGEMAP_SCAN")
    npages = 256
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    uffd = -1
    try:
        child = children(WP_CHILD, [npages, 0, child_sock.fileno()], pass_fds=[child_sock.fileno()])
        child_sock.close()
        base = child.recv()["base"]
        _msg, fds, _flags, _addr = socket.recv_fds(parent_sock, 16, 1)
        assert len(fds) == 1
        uffd = fds[0]
        pm = nat.open_pagemap(child.pid)
        try:
            # Registered but not protected: every page reads as "written" (not WP).
            assert regions_to_pages(scan_written(pm, base, npages, rearm=False), base) == list(range(npages))
            nat.uffd_writeprotect(uffd, base, npages * PAGE, True)  # from the parent
            assert len(scan_written(pm, base, npages, rearm=False)) == 0

            written = [1, 2, 77, 255]
            child.ask(f"write {json.dumps(written)}")
            # A report-only scan does not re-protect: the pages stay written.
            assert regions_to_pages(scan_written(pm, base, npages, rearm=False), base) == written
            assert regions_to_pages(scan_written(pm, base, npages, rearm=False), base) == written
            nat.uffd_writeprotect(uffd, base, npages * PAGE, True)
            assert len(scan_written(pm, base, npages, rearm=False)) == 0

            nat.uffd_writeprotect(uffd, base + 7 * PAGE, 2 * PAGE, False)  # unprotect 7, 8
            assert regions_to_pages(scan_written(pm, base, npages), base) == [7, 8]
            assert len(scan_written(pm, base, npages)) == 0
        finally:
            os.close(pm)
    finally:
        if uffd >= 0:
            os.close(uffd)
        parent_sock.close()
        child_sock.close()


# --- post-copy placement from another process --------------------------------------------
FAULT_CHILD = """
npages = int(sys.argv[1])
mode = sys.argv[2]            # "missing" or "minor"
ram_fd = int(sys.argv[3])     # -1: make our own memfd
sock_fd = int(sys.argv[4])
ram_fd, m, ram = map_ram(npages, ram_fd, name="vmem-test-fault")
base = ram.ctypes.data
uffd = nat.uffd_open()
if mode == "missing":
    nat.uffd_api(uffd, 0)
    ioctls = nat.uffd_register(uffd, base, npages * PAGE, nat.UFFDIO_REGISTER_MODE_MISSING)
else:
    nat.uffd_api(uffd, nat.UFFD_FEATURE_MINOR_SHMEM)
    ioctls = nat.uffd_register(uffd, base, npages * PAGE, nat.UFFDIO_REGISTER_MODE_MINOR)
with socket.socket(fileno=sock_fd) as s:
    socket.send_fds(s, [b"u"], [uffd])
reply({"base": base, "ioctls": ioctls})
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "read":                    # blocks in the fault until the parent places the page
        page = int(arg)
        reply({"page": page, "sum": int(ram[page].sum(dtype=np.uint64)), "first": int(ram[page, 0])})
"""


def _recv_uffd(sock: socket.socket) -> int:
    _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
    assert len(fds) == 1
    return fds[0]


def _wait_fault(uffd: int, timeout: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    ready, _, _ = select.select([uffd], [], [], timeout)
    assert ready, "no fault event arrived"
    return nat.uffd_read_fault_events(uffd)


def test_uffd_copy_resolves_a_missing_fault_in_another_process(children, page_buffer):
    _skip_unless("userfaultfd", "UFFD_FEATURE_MISSING_SHMEM")
    npages = 16
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    uffd = -1
    try:
        child = children(FAULT_CHILD, [npages, "missing", -1, child_sock.fileno()], pass_fds=[child_sock.fileno()])
        child_sock.close()
        uffd = _recv_uffd(parent_sock)
        hello = child.recv()
        base = hello["base"]
        assert hello["ioctls"] & (1 << nat._UFFDIO_COPY)
        assert len(nat.uffd_read_faults(uffd)) == 0  # nothing pending: empty, not an error

        src, src_addr = page_buffer(2)
        src[0, :] = 3
        src[1, :] = 5
        child.send("read 3")
        addrs, flags = _wait_fault(uffd)
        assert addrs.tolist() == [base + 3 * PAGE]
        assert not flags[0] & nat.UFFD_PAGEFAULT_FLAG_WP
        assert nat.uffd_copy(uffd, base + 3 * PAGE, src_addr, PAGE) == PAGE  # wakes the child
        assert child.recv() == {"page": 3, "sum": 3 * PAGE, "first": 3}

        # Placing an existing page is benign and reported as -EEXIST; a range that is
        # partly present places the rest.
        assert nat.uffd_copy(uffd, base + 3 * PAGE, src_addr + PAGE, PAGE) == -17
        assert nat.uffd_copy(uffd, base + 3 * PAGE, src_addr, 2 * PAGE) == PAGE
        assert child.ask("read 4") == {"page": 4, "sum": 5 * PAGE, "first": 5}
        assert nat.uffd_zeropage(uffd, base + 9 * PAGE, PAGE) == PAGE
        assert child.ask("read 9", timeout=10) == {"page": 9, "sum": 0, "first": 0}
        with pytest.raises(OSError) as exc:
            nat.uffd_copy(uffd, base + 1, src_addr, PAGE)  # unaligned
        assert exc.value.errno == 22 and "UFFDIO_COPY" in str(exc.value)
    finally:
        if uffd >= 0:
            os.close(uffd)
        parent_sock.close()
        child_sock.close()


def test_uffd_continue_maps_a_page_written_through_another_mapping(children):
    """MINOR mode: write the page cache through our own mapping, then UFFDIO_CONTINUE."""
    _skip_unless("userfaultfd", "UFFD_FEATURE_MINOR_SHMEM")
    npages = 8
    ram_fd = nat.memfd_create(f"vmem-test-minor-{os.getpid()}")
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    uffd = -1
    mine = None
    try:
        os.ftruncate(ram_fd, npages * PAGE)
        mine = mmap.mmap(ram_fd, npages * PAGE, flags=mmap.MAP_SHARED)
        child = children(
            FAULT_CHILD, [npages, "minor", ram_fd, child_sock.fileno()], pass_fds=[ram_fd, child_sock.fileno()]
        )
        child_sock.close()
        uffd = _recv_uffd(parent_sock)
        base = child.recv()["base"]
        mine[2 * PAGE : 3 * PAGE] = bytes([9]) * PAGE  # in the page cache, not yet in the child's page table
        child.send("read 2")
        addrs, flags = _wait_fault(uffd)
        assert addrs.tolist() == [base + 2 * PAGE]
        assert flags[0] & nat.UFFD_PAGEFAULT_FLAG_MINOR
        assert nat.uffd_continue(uffd, base + 2 * PAGE, PAGE) == PAGE
        assert child.recv() == {"page": 2, "sum": 9 * PAGE, "first": 9}
        assert nat.uffd_continue(uffd, base + 2 * PAGE, PAGE) == -17  # already mapped
    finally:
        if uffd >= 0:
            os.close(uffd)
        if mine is not None:
            mine.close()
        os.close(ram_fd)
        parent_sock.close()
        child_sock.close()


# --- mprotect tracker (always in a child: it owns the process's SIGSEGV) ------------------
MPROT_CHILD = """
npages = int(sys.argv[1])
fd, m, ram = map_ram(npages, name="vmem-test-mprot")
nwords = -(-npages // 64)
dirty = np.zeros(nwords, dtype=np.uint64)
out = np.zeros(nwords, dtype=np.uint64)
nat.mprot_install(ram.ctypes.data, npages, dirty.ctypes.data)
reply({"installed": nat.mprot_installed()})
for line in sys.stdin:
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "write":
        idx = np.array(json.loads(arg), dtype=np.int64)
        ram[idx, 100] += 1
        reply({"faults": nat.mprot_faults()})
    elif cmd == "write_every_other":          # pages 0, 2, 4, ... (n of them), one C loop
        n = int(arg)
        ram[0 : 2 * n : 2, 5] = 1
        reply({"faults": nat.mprot_faults()})
    elif cmd == "write_random":               # n distinct pages in random order, one C loop
        n, seed = map(int, arg.split())
        idx = np.random.default_rng(seed).choice(npages, n, replace=False)
        ram[idx, 5] = 1
        reply({"faults": nat.mprot_faults(), "pages": sorted(idx.tolist())})
    elif cmd == "collect":
        count = nat.mprot_collect(out.ctypes.data)
        with open("/proc/self/maps") as f:
            vmas = sum(1 for _ in f)
        reply({"count": count, "pages": pages_of(out), "fallbacks": nat.mprot_fallbacks(), "vmas": vmas})
    elif cmd == "uninstall":
        nat.mprot_uninstall()
        nat.mprot_uninstall()                 # idempotent
        ram[1:5, 0] = 1                       # writable again, no handler involved
        reply({"installed": nat.mprot_installed(), "faults": nat.mprot_faults()})
    elif cmd == "errors":                     # error paths, reported as errno per call
        def errno_of(fn, *args):
            try:
                fn(*args)
                return 0
            except OSError as err:
                return err.errno
        spare = np.zeros(nwords, dtype=np.uint64)
        hole = mmap.mmap(-1, 4 * PAGE)
        hole_addr = np.frombuffer(hole, dtype=np.uint8).ctypes.data
        hole.close()                          # an address range that is no longer mapped
        reply({
            "busy": errno_of(nat.mprot_install, ram.ctypes.data, npages, spare.ctypes.data),
            "collect_after_uninstall": (nat.mprot_uninstall(), errno_of(nat.mprot_collect, out.ctypes.data))[1],
            "unaligned": errno_of(nat.mprot_install, ram.ctypes.data + 1, npages, spare.ctypes.data),
            "unmapped": errno_of(nat.mprot_install, hole_addr, 4, spare.ctypes.data),
            "installed": nat.mprot_installed(),
        })
    elif cmd == "foreign":                    # a write fault that is not ours must still kill us
        ro = mmap.mmap(-1, PAGE, prot=mmap.PROT_READ)
        import ctypes
        ctypes.memset(np.frombuffer(ro, dtype=np.uint8).ctypes.data, 1, 1)
        reply({"survived": True})
"""


def test_mprot_tracker_records_and_rearms(children):
    _skip_unless("mprotect_tracker")
    child = children(MPROT_CHILD, [256])
    assert child.recv() == {"installed": True}
    scattered = [3, 17, 64, 65, 200, 255]
    child.ask(f"write {json.dumps(scattered)}")
    got = child.ask("collect")
    assert got["pages"] == scattered and got["count"] == len(scattered) and got["fallbacks"] == 0
    assert child.ask("collect")["pages"] == []  # re-protected: nothing new
    faults = child.ask("write [100, 100, 17]")["faults"]
    assert faults == len(scattered) + 2  # the second write to page 100 did not fault
    assert child.ask("collect")["pages"] == [17, 100]
    assert child.ask("collect")["pages"] == []
    done = child.ask("uninstall")
    assert done == {"installed": False, "faults": faults}


@pytest.mark.parametrize("npages", [1, 63, 64, 65, 4096, 262_144 + 37])
def test_bitmap_pages_lists_the_set_bits_below_npages(npages):
    """The bitmap trackers' decode: every set bit below npages, in order, none past it."""
    rng = np.random.default_rng(npages)
    nwords = -(-npages // 64)
    bits = np.zeros(nwords, dtype=np.uint64)
    want = np.unique(rng.integers(0, npages, max(1, npages // 90)))
    want = np.union1d(want, [0, npages - 1])  # both ends
    np.bitwise_or.at(bits, want // 64, np.left_shift(np.uint64(1), (want % 64).astype(np.uint64)))
    if npages % 64:
        bits[-1] |= np.uint64(1) << np.uint64(63)  # a bit past npages in the last word: not a page
    got = nat.bitmap_pages(bits, npages)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    assert nat.bitmap_count(bits, npages) == len(want)
    # With the count known the bitmap is read once; a wrong count still gives the pages.
    for expected in (len(want), 0, len(want) - 1, len(want) + 5):
        assert np.array_equal(nat.bitmap_pages(bits, npages, expected=expected), want), expected
    assert nat.bitmap_pages(np.zeros(nwords, dtype=np.uint64), npages).size == 0


def test_bitmap_pages_refusals():
    bits = np.full(4, np.uint64(0xFFFF_FFFF_FFFF_FFFF))
    with pytest.raises(TypeError):
        nat.bitmap_pages(bits.view(np.int64), 256)
    with pytest.raises(TypeError):
        nat.bitmap_pages(np.zeros(8, dtype=np.uint64)[::2], 256)
    with pytest.raises(ValueError):
        nat.bitmap_pages(bits, 257)  # more pages than bits
    with pytest.raises(ValueError):
        nat.bitmap_count(bits, 257)
    # An output too small (a bitmap that grew between the count and the fill): ENOSPC,
    # never written past its end.
    out = np.full(101, -7, dtype=np.int64)
    rc = nat.lib.vmem_bitmap_pages(nat.ffi.cast("uint64_t *", bits.ctypes.data), 256,
                                   nat.ffi.cast("int64_t *", out.ctypes.data), 100)
    assert rc == -errno.ENOSPC and np.array_equal(out[:100], np.arange(100)) and out[100] == -7


def test_mprot_error_paths(children):
    _skip_unless("mprotect_tracker")
    child = children(MPROT_CHILD, [64])
    child.recv()
    assert child.ask("errors") == {
        "busy": 16,  # EBUSY: one region per process
        "collect_after_uninstall": 107,  # ENOTCONN
        "unaligned": 22,
        "unmapped": 12,  # ENOMEM from mprotect; nothing stays installed
        "installed": False,
    }


def test_mprot_foreign_segfault_still_kills_the_process(children):
    _skip_unless("mprotect_tracker")
    child = children(MPROT_CHILD, [16])
    child.recv()
    child.send("foreign")
    assert child.proc.wait(timeout=30) == -signal.SIGSEGV


@pytest.mark.parametrize("pattern", ["every_other", "random"])
def test_mprot_survives_vm_max_map_count(children, pattern):
    """Scattered writes needing ~2 VMAs each exceed vm.max_map_count: no crash, no lost page."""
    _skip_unless("mprotect_tracker")
    with open("/proc/sys/vm/max_map_count") as f:
        max_map_count = int(f.read())
    npages = (1 << 30) // PAGE  # 1 GiB memfd (sparse: only written pages use memory)
    nwrites = max(40_000, max_map_count // 2 + 8_000)
    if 2 * nwrites > npages:
        pytest.skip(f"vm.max_map_count={max_map_count} is too high to reach with a 1 GiB region")
    child = children(MPROT_CHILD, [npages])
    child.recv()
    if pattern == "every_other":
        faults = child.ask(f"write_every_other {nwrites}", timeout=120)["faults"]
        written = set(range(0, 2 * nwrites, 2))
    else:
        got = child.ask(f"write_random {nwrites} 7", timeout=120)
        faults, written = got["faults"], set(got["pages"])
        assert len(written) == nwrites
    assert 0 < faults <= nwrites
    got = child.ask("collect", timeout=120)
    reported = set(got["pages"])
    assert written <= reported, f"{len(written - reported)} written pages were lost"
    assert got["fallbacks"] > 0
    # The fallback widens locally; it does not give up on the whole region.
    assert len(reported) < 2 * nwrites
    if pattern == "every_other":
        assert reported <= set(range(2 * nwrites + 32768))
    assert got["vmas"] < 2_000  # re-protecting runs merged the VMAs back
    assert child.ask("collect")["pages"] == []
    child.ask("write [7, 262143]")
    assert child.ask("collect")["pages"] == [7, 262143]
    assert child.proc.poll() is None


# --- digests ---------------------------------------------------------------------------
def _digest_all(arr: np.ndarray) -> np.ndarray:
    out = np.empty(arr.shape[0], dtype=np.uint64)
    nat.digest_range(arr.ctypes.data, 0, arr.shape[0], out)
    return out


def test_digest_equal_pages_equal_digests():
    rng = np.random.default_rng(1)
    pages = rng.integers(0, 256, size=(64, PAGE), dtype=np.uint8)
    pages[9] = pages[5]
    pages[10] = 0
    pages[11] = 0
    d = _digest_all(pages)
    assert d[5] == d[9] and d[10] == d[11]
    assert len(set(d.tolist())) == 62
    assert int(d[10]) == nat.digest_page_bytes(bytes(PAGE))


def test_digest_single_flipped_byte_anywhere_changes_it():
    rng = np.random.default_rng(2)
    page = rng.integers(0, 256, size=PAGE, dtype=np.uint8)
    base = _digest_all(page.reshape(1, PAGE))[0]
    for flip in (0x01, 0x80, 0xFF):
        variants = np.tile(page, (PAGE, 1))
        variants[np.arange(PAGE), np.arange(PAGE)] ^= flip  # variant i has byte i flipped
        d = _digest_all(variants)
        assert not np.any(d == base), f"flip {flip:#x} went unnoticed"
        assert len(np.unique(d)) == PAGE
    zero = np.zeros((PAGE, PAGE), dtype=np.uint8)
    zero[np.arange(PAGE), np.arange(PAGE)] = 1  # one set byte, at every position
    d = _digest_all(zero)
    assert len(np.unique(d)) == PAGE and not np.any(d == _digest_all(np.zeros((1, PAGE), np.uint8))[0])


def test_digest_is_position_sensitive():
    rng = np.random.default_rng(3)
    page = rng.integers(0, 256, size=PAGE, dtype=np.uint8)
    words = page.view(np.uint64).copy()
    swapped = words.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    rotated = np.roll(words, 1)
    d = _digest_all(np.stack([page, swapped.view(np.uint8), rotated.view(np.uint8)]))
    assert len(set(d.tolist())) == 3


def test_digest_pages_and_range_agree():
    rng = np.random.default_rng(4)
    ram = rng.integers(0, 256, size=(300, PAGE), dtype=np.uint8)
    full = np.empty(300, dtype=np.uint64)
    nat.digest_range(ram.ctypes.data, 0, 300, full)
    idx = rng.integers(0, 300, size=1000).astype(np.int64)  # unordered, with repeats
    picked = np.empty(1000, dtype=np.uint64)
    nat.digest_pages(ram.ctypes.data, idx, picked)
    assert np.array_equal(picked, full[idx])
    part = np.empty(50, dtype=np.uint64)
    nat.digest_range(ram.ctypes.data, 120, 50, part)
    assert np.array_equal(part, full[120:170])
    nat.digest_pages(ram.ctypes.data, np.empty(0, np.int64), np.empty(0, np.uint64))  # no-op


def test_digest_argument_checks():
    ram = np.zeros((4, PAGE), dtype=np.uint8)
    out = np.empty(4, dtype=np.uint64)
    with pytest.raises(TypeError):
        nat.digest_pages(ram.ctypes.data, np.arange(4, dtype=np.int32), out)
    with pytest.raises(TypeError):
        nat.digest_pages(ram.ctypes.data, np.arange(4, dtype=np.int64), np.empty(4, np.int64))
    with pytest.raises(ValueError):
        nat.digest_pages(ram.ctypes.data, np.array([0, -1], np.int64), out)
    with pytest.raises(ValueError):
        nat.digest_range(ram.ctypes.data, 0, 5, out)


def test_digest_is_xxh64():
    import xxhash  # a test extra (pyproject.toml): the reference implementation, not a dependency of vmem
    page = os.urandom(PAGE)
    assert nat.digest_page_bytes(page) == xxhash.xxh64_intdigest(page)


def test_digest_paths_agree_with_xxh64_bit_for_bit():
    """The AVX-512 path (eight pages per call) and the scalar one give XXH64 for every page,
    whatever the count (groups of eight and the rest), the order and the repeats -- through
    digest_range, digest_pages and place_pages.  On a CPU without AVX-512 both are scalar
    (said by the skip-free assertion on what digest_impl reports)."""
    import xxhash

    rng = np.random.default_rng(11)
    ram = rng.integers(0, 256, size=(43, PAGE), dtype=np.uint8)
    ram[7] = 0
    ram[8] = ram[9]
    ref = np.array([xxhash.xxh64_intdigest(ram[i].tobytes()) for i in range(43)], dtype=np.uint64)
    idx = rng.integers(0, 43, size=29).astype(np.int64)  # unordered, repeats, 3 groups + 5
    before = nat.digest_impl()
    try:
        for impl in ("scalar", "avx512"):
            got_impl = nat.digest_impl(impl)
            assert got_impl == impl or (impl == "avx512" and got_impl == "scalar")
            for n in (0, 1, 7, 8, 9, 16, 43):
                out = np.zeros(n, dtype=np.uint64)
                nat.digest_range(ram.ctypes.data, 0, n, out)
                assert np.array_equal(out, ref[:n]), (impl, n)
            picked = np.zeros(len(idx), dtype=np.uint64)
            nat.digest_pages(ram.ctypes.data, idx, picked)
            assert np.array_equal(picked, ref[idx]), impl
            # place_pages digests each run of what it wrote, read back through the view
            fd = nat.memfd_create("vmem-test-digest")
            try:
                os.ftruncate(fd, 64 * PAGE)
                view = np.frombuffer(mmap.mmap(fd, 64 * PAGE), dtype=np.uint8)
                digests = np.zeros(64, dtype=np.uint64)
                pages = np.r_[np.arange(3, 23), np.arange(40, 61), [1, 2]].astype(np.int64)
                nat.place_pages(fd, -1, 0, ram, pages, rows=np.arange(len(pages)) % 43, digests=digests,
                                view=view.ctypes.data)
                assert np.array_equal(digests[pages], ref[np.arange(len(pages)) % 43]), impl
                del view
            finally:
                os.close(fd)
    finally:
        nat.digest_impl(before)
    with pytest.raises(ValueError):
        nat.digest_impl("sse")


# --- process ---------------------------------------------------------------------------
PDEATH_CHILD = """
nat.set_pdeathsig(signal.SIGKILL)
reply({"ready": True})
signal.pause()
"""


def test_set_pdeathsig_fires_when_the_parent_thread_exits(children):
    """PDEATHSIG follows the *thread* that forked: spawn from a thread, let it end."""
    box: dict[str, Child] = {}

    def spawner():
        box["child"] = children(PDEATH_CHILD)
        box["child"].recv()

    t = threading.Thread(target=spawner)
    t.start()
    t.join()
    assert box["child"].proc.wait(timeout=30) == -signal.SIGKILL


def test_set_pdeathsig_rejects_bad_signal():
    with pytest.raises(OSError) as exc:
        nat.set_pdeathsig(1000)
    assert exc.value.errno == 22 and "PR_SET_PDEATHSIG" in str(exc.value)


# --- constants shared with C, and the post-copy fault threads ----------------------------
def test_constants_shared_with_c_match_the_python_tables():
    """The C fragments keep their own copies of a few wire constants (compile-time values);
    they are exposed through the cdef and must equal the one Python definition."""
    from transport.codec import PAGE_BYTES
    from vmem.format import wire
    from vmem.migration.postcopy import destination as pcdest
    from vmem.pages import PAGE_SHIFT, PAGE_SIZE

    assert nat.lib.VMEM_PAGE_SIZE == PAGE_SIZE == 1 << PAGE_SHIFT == wire.PAGE_SIZE == PAGE_BYTES
    assert nat.lib.VMEM_PC_REC_PAGE_DATA == wire.PostcopyRecordType.PAGE_DATA
    assert nat.lib.VMEM_PC_REC_FAULT == wire.PostcopyRecordType.FAULT == wire.ControlType.POSTCOPY_FAULT
    assert nat.lib.VMEM_PC_MAX_PAGES == wire.MAX_PAGES_PER_RECORD
    assert (pcdest.MISSING, pcdest.PLACING, pcdest.PRESENT) == (nat.lib.VMEM_PC_MISSING, nat.lib.VMEM_PC_PLACING,
                                                                nat.lib.VMEM_PC_PRESENT)


def _urgent_fault(pfns, rtype=None) -> bytes:
    """One FAULT record of the urgent channel (vmem/format/postcopy.py draws it)."""
    from vmem.format import wire

    rtype = int(wire.PostcopyRecordType.FAULT) if rtype is None else rtype
    head = np.array([rtype | ((8 + 8 * len(pfns)) << 32), len(pfns)], dtype="<u8")
    return head.tobytes() + np.asarray(pfns, dtype="<u8").tobytes()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "EOF"
        buf += chunk
    return bytes(buf)


def test_fault_server_answers_faults_and_reports_named_stats():
    """The source's C fault server: a FAULT on the urgent channel is answered with a
    post-copy PAGE_DATA record straight from RAM; sent[] and the pre-paging cursor follow;
    a malformed record stops it with EPROTO in its statistics."""
    from vmem.format import wire

    npages = 64
    ram = np.random.default_rng(3).integers(0, 256, (npages, PAGE), dtype=np.uint8)
    sent = np.zeros(npages, dtype=np.uint8)
    cursor = np.zeros(3, dtype=np.int64)
    ours, theirs = socket.socketpair()
    server = nat.PostcopyFaultServer(theirs.fileno(), ram, sent, cursor)
    try:
        assert server.stats() == {"fault_records": 0, "pages_sent": 0, "error": 0, "priority": 0, "cpu": -1}
        server.start()
        ours.sendall(_urgent_fault([3, 9]))
        head = np.frombuffer(_recv_exact(ours, 16 + 16), dtype="<u8")
        assert int(head[0]) & 0xFFFFFFFF == wire.PostcopyRecordType.PAGE_DATA
        assert int(head[0]) >> 32 == 8 + 16 + 2 * PAGE and head[1] == 2 and head[2:].tolist() == [3, 9]
        pages = np.frombuffer(_recv_exact(ours, 2 * PAGE), dtype=np.uint8).reshape(2, PAGE)
        assert np.array_equal(pages, ram[[3, 9]])
        deadline = time.monotonic() + 10
        while server.stats()["fault_records"] < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        # the thread got what a probe thread gets here (nice -15 and the short slice as root)
        assert server.stats() == {"fault_records": 1, "pages_sent": 2, "error": 0,
                                  "priority": nat.fault_thread_priority()[0], "cpu": -1}
        assert np.flatnonzero(sent).tolist() == [3, 9] and cursor.tolist() == [9, 1, 0]
        ours.sendall(_urgent_fault([99]))  # beyond the guest
        while server.stats()["error"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert server.stats()["error"] == errno.EPROTO
    finally:
        server.stop()
        server.close()
        ours.close()
        theirs.close()


def test_a_fault_thread_pinned_runs_on_its_cpu_and_says_so_when_refused():
    """``set_cpu`` (--fault-cpu): the thread pins itself before its first poll and reports
    the CPU it got; the kernel's refusal of a CPU that is not online (1023 here: the
    migration's own check refuses it earlier, this is the thread's fallback) is reported as
    -errno, the thread running on unpinned; bad numbers are refused at once."""
    npages = 8
    ram = np.zeros((npages, PAGE), dtype=np.uint8)
    last = max(os.sched_getaffinity(0))
    for cpu, want in ((last, last), (1023, -errno.EINVAL), (None, -1)):
        ours, theirs = socket.socketpair()
        server = nat.PostcopyFaultServer(theirs.fileno(), ram, np.zeros(npages, dtype=np.uint8),
                                         np.zeros(3, dtype=np.int64))
        try:
            server.set_cpu(cpu)
            server.start()
            deadline = time.monotonic() + 10
            while server.stats()["cpu"] == -1 and want != -1 and time.monotonic() < deadline:
                time.sleep(0.001)
            assert server.stats()["cpu"] == want, (cpu, server.stats())
            if cpu == last:  # the thread itself: its affinity is that one CPU
                tids = [t for t in os.listdir("/proc/self/task")
                        if open(f"/proc/self/task/{t}/comm").read().strip() == "vmem-pc-fault"]
                assert tids and all(os.sched_getaffinity(int(t)) == {last} for t in tids), tids
        finally:
            server.stop()
            server.close()
            ours.close()
            theirs.close()
    ours, theirs = socket.socketpair()
    server = nat.PostcopyFaultServer(theirs.fileno(), ram, np.zeros(npages, dtype=np.uint8),
                                     np.zeros(3, dtype=np.int64))
    try:
        for bad in (-1, 1024, True, "0"):
            with pytest.raises(ValueError, match="a fault thread's CPU"):
                server.set_cpu(bad)
    finally:
        server.close()
        ours.close()
        theirs.close()


def test_fault_server_takes_records_that_arrive_together_or_a_byte_at_a_time():
    """The fault thread reads whatever has arrived and hands records out from there (one
    read() per record that arrives whole): two FAULT records in one send are both answered --
    the second has no poll wake-up of its own, it was read with the first -- and a record
    sent a byte at a time is answered once it is whole, with the right pages."""
    npages = 64
    ram = np.random.default_rng(4).integers(0, 256, (npages, PAGE), dtype=np.uint8)
    sent = np.zeros(npages, dtype=np.uint8)
    cursor = np.zeros(3, dtype=np.int64)
    ours, theirs = socket.socketpair()
    ours.settimeout(10.0)  # an answer that never comes fails the test instead of hanging it
    server = nat.PostcopyFaultServer(theirs.fileno(), ram, sent, cursor)

    def answer(want):
        head = np.frombuffer(_recv_exact(ours, 16 + 8 * len(want)), dtype="<u8")
        assert head[1] == len(want) and head[2:].tolist() == want
        pages = np.frombuffer(_recv_exact(ours, len(want) * PAGE), dtype=np.uint8).reshape(-1, PAGE)
        assert np.array_equal(pages, ram[want])

    try:
        server.start()
        ours.sendall(_urgent_fault([1]) + _urgent_fault([2, 5]))
        answer([1])
        answer([2, 5])
        record = _urgent_fault([7])
        for i in range(len(record)):
            ours.sendall(record[i:i + 1])
            time.sleep(0.001)
        answer([7])
        assert _wait_stats(server, "fault_records", 3)["error"] == 0
        assert np.flatnonzero(sent).tolist() == [1, 2, 5, 7]
    finally:
        server.stop()
        server.close()
        ours.close()
        theirs.close()


def _skip_without_custom_slices() -> None:
    """Skip unless this process may raise a thread to nice -15 and the kernel has custom EEVDF
    slices and shows them (/proc/<pid>/sched)."""
    if os.geteuid() != 0:
        pytest.skip("a negative nice value needs root or CAP_SYS_NICE")
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (6, 12):
        pytest.skip("custom EEVDF slices need Linux >= 6.12")
    if not os.path.exists("/proc/self/sched"):
        pytest.skip("/proc/<pid>/sched needs CONFIG_SCHED_DEBUG")


def _thread_sched(tid: int | str) -> dict:
    """Thread ``tid`` of this process as /proc/<pid>/task/<tid>/sched shows it."""
    with open(f"/proc/self/task/{tid}/sched") as f:
        return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line)}


def _fault_thread_sched() -> dict:
    """This process's ``vmem-pc-fault`` thread as /proc shows it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "vmem-pc-fault":
                    return _thread_sched(tid)
        except FileNotFoundError:
            continue
    raise AssertionError("no vmem-pc-fault thread")


@pytest.mark.parametrize("slice_ns, expected", [(0, "slice"), (50_000, "nice")])
def test_fault_threads_get_a_short_slice_or_say_they_did_not(slice_ns, expected):
    """The fault thread runs at nice -15 with a 0.1 ms EEVDF slice (vmem/_build/postcopy.py
    says why), as the kernel's own view of the thread shows (prio 105, se.slice).  Asked for
    a slice the kernel does not grant as asked (it clamps one under 0.1 ms up to 0.1 ms), the
    thread reads back another value and claims no slice: it reports nice -15."""
    _skip_without_custom_slices()
    npages = 8
    ram = np.zeros((npages, PAGE), dtype=np.uint8)
    sent = np.zeros(npages, dtype=np.uint8)
    cursor = np.zeros(3, dtype=np.int64)
    ours, theirs = socket.socketpair()
    nat.set_fault_thread_slice_ns(slice_ns)
    server = nat.PostcopyFaultServer(theirs.fileno(), ram, sent, cursor)
    try:
        server.start()
        deadline = time.monotonic() + 10
        while server.stats()["priority"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        want = nat.PC_PRIO_SLICE if expected == "slice" else nat.PC_PRIO_NICE
        assert server.stats()["priority"] == want
        sched = _fault_thread_sched()
        assert sched["prio"] == "105"  # 120 + nice -15
        if expected == "slice":
            assert sched["se.slice"] == "100000"
        else:  # clamped up to 0.1 ms (Linux 6.18) or refused: either way not what was asked
            assert sched["se.slice"] != str(slice_ns)
    finally:
        nat.set_fault_thread_slice_ns(0)
        server.stop()
        server.close()
        ours.close()
        theirs.close()


def test_boost_current_thread_gives_the_caller_the_fault_threads_scheduling():
    """The benchmarks' floors call this in their own threads: the caller gets what a fault
    thread gets (here nice -15 and the 0.1 ms slice, as the kernel shows it), and a thread
    that did not call it keeps the default."""
    _skip_without_custom_slices()
    import threading

    def sched_of_this_thread() -> dict:
        return _thread_sched(threading.get_native_id())

    mine = sched_of_this_thread()
    seen: dict = {}

    def boosted():
        seen["before"] = sched_of_this_thread()
        seen["got"] = nat.boost_current_thread()
        seen["after"] = sched_of_this_thread()

    t = threading.Thread(target=boosted)
    t.start()
    t.join()
    assert seen["got"] == (nat.PC_PRIO_SLICE, nat.FAULT_THREAD_PRIORITIES[nat.PC_PRIO_SLICE])
    assert seen["after"]["prio"] == "105" and seen["after"]["se.slice"] == "100000"
    assert seen["before"]["prio"] == mine["prio"] and seen["before"]["se.slice"] == mine["se.slice"] != "100000"
    assert sched_of_this_thread()["prio"] == mine["prio"]  # the caller's thread only


EMFILE_CHILD = """
import errno, os, resource, socket
import numpy as np
from vmem import _native as nat
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError as err:
    assert err.errno == errno.EMFILE, err
os.close(held.pop())  # room for exactly one more fd: the wake pipe needs two
npages = 4
for make in (lambda: nat.PostcopyFaultServer(0, np.zeros((npages, nat.PAGE_SIZE), np.uint8),
                                             np.zeros(npages, np.uint8), np.zeros(3, np.int64)),
             lambda: nat.PostcopyFaultEngine(-1, 0, -1, 0, npages, np.zeros(npages, np.uint8),
                                             np.zeros(npages, np.uint8), np.zeros(npages, np.uint8),
                                             np.zeros(npages, np.int64), None, np.zeros((4, 3), np.int64), npages)):
    try:
        make()
    except OSError as err:
        print(type(err).__name__, err.errno, err.filename)
    else:
        print("created")
"""


def test_background_push_claims_a_piece_at_a_time():
    """Issue 13 (fault p99): a page the background push has claimed (PLACING) is one a
    faulting guest must wait for -- the fault thread does not ask the source for it again.
    The push used to claim a whole batch (1,024 pages) before placing its first piece, so a
    fault on its last piece waited for every piece before it.  Now it claims, places and
    marks one piece at a time: while the first piece is being placed (made slow on purpose,
    vmem.migration.inject's slow_us) the later pieces are still MISSING, free for a demand
    answer to claim; in the end every page is PRESENT and in the RAM file."""
    npages = 4 * nat.PUSH_PIECE_PAGES
    fd = nat.memfd_create(f"vmem-test-pieces-{os.getpid()}")
    a, b = socket.socketpair()
    try:
        os.ftruncate(fd, npages * PAGE)
        state = np.zeros(npages, np.uint8)  # MISSING
        engine = nat.PostcopyFaultEngine(-1, a.fileno(), fd, 0, npages, state, np.zeros(npages, np.uint8),
                                         np.zeros(npages, np.uint8), np.zeros(npages, np.int64), None,
                                         np.zeros((16, 3), np.int64), npages)
        staging = np.random.default_rng(9).integers(0, 256, (npages, PAGE), dtype=np.uint8)
        nat.set_push_pieces(0, True, 300_000)  # each piece holds the placement gate 0.3 s first
        try:
            placer = threading.Thread(target=engine.place, args=(staging, np.arange(npages, dtype=np.int64)))
            placer.start()
            deadline = time.monotonic() + 10
            while state[0] != nat.PC_PLACING and time.monotonic() < deadline:
                time.sleep(0.001)
            seen = state.copy()  # the first piece is being placed (0.3 s), nothing later claimed yet
            placer.join(30)
        finally:
            nat.set_push_pieces()
        first = nat.PUSH_PIECE_PAGES
        assert (seen[:first] == nat.PC_PLACING).all()
        assert (seen[first:] == nat.PC_MISSING).all(), np.bincount(seen[first:])
        assert (state == nat.PC_PRESENT).all()
        assert engine.stats()["duplicates"] == 0
        got = np.frombuffer(os.pread(fd, npages * PAGE, 0), np.uint8).reshape(npages, PAGE)
        assert np.array_equal(got, staging)
        engine.close()
    finally:
        os.close(fd)
        a.close()
        b.close()


def test_fault_thread_constructors_report_emfile_as_oserror():
    """Out of file descriptors is an OSError(EMFILE), not a MemoryError (a child process
    with RLIMIT_NOFILE lowered)."""
    proc = subprocess.run([sys.executable, "-c", EMFILE_CHILD], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    for line, what in zip(lines, ("fault server", "fault engine")):
        kind, err, context = line.split(" ", 2)
        assert kind == "OSError" and int(err) == errno.EMFILE and what in context, line


# --- features --------------------------------------------------------------------------
def test_probe_features_names_and_format():
    feats = vfeatures.probe_features()
    for name in ("memfd_create", "userfaultfd", "PAGEMAP_SCAN", "mprotect_tracker", "UFFD_FEATURE_WP_ASYNC",
                 "UFFD_FEATURE_MINOR_SHMEM", "UFFD_FEATURE_MOVE", "UFFD_FEATURE_POISON"):
        assert name in feats and feats[name].name == name and feats[name].detail
    assert feats["memfd_create"].available
    table = vfeatures.format_features(feats)
    assert all(name in table for name in feats)
    assert vfeatures.probe_features(refresh=True).keys() == feats.keys()


def test_require():
    feats = vfeatures.probe_features()
    vfeatures.require("memfd_create")
    if feats["UFFD_FEATURE_WP_ASYNC"].available:
        vfeatures.require("WP_ASYNC")  # short alias
    with pytest.raises(ValueError):
        vfeatures.require("no-such-feature")
    missing = vfeatures.Feature("PAGEMAP_SCAN", False, "kernel too old")
    saved = vfeatures._cache
    try:
        vfeatures._cache = {**feats, "PAGEMAP_SCAN": missing}
        with pytest.raises(FeatureUnavailable) as exc:
            vfeatures.require("PAGEMAP_SCAN", alternative="--tracker mprotect")
        assert exc.value.feature == "PAGEMAP_SCAN" and exc.value.alternative == "--tracker mprotect"
        assert "kernel too old" in str(exc.value)
    finally:
        vfeatures._cache = saved


def _wait_stats(thread, key, want, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while thread.stats()[key] != want and time.monotonic() < deadline:
        time.sleep(0.001)
    return thread.stats()


def _link_framing(name: str):
    """The Python channel class of an urgent link's framing: a keyed link's MacChannel, or
    the SealedChannel a TLS link's urgent connection switches to (transport.seal)."""
    from transport.seal import SealedChannel
    from transport.secure import MacChannel

    return {"mac": MacChannel, "sealed": SealedChannel}[name]


@pytest.mark.parametrize("framing", ["mac", "sealed"])
def test_fault_engine_refuses_a_tampered_answer_on_a_keyed_link(framing):
    """The destination's C fault thread on a keyed link (MacChannel's framing, taken over
    with native_handoff) or a TLS link's sealed urgent connection: an answer the source's
    channel framed is placed; an answer whose tag is wrong -- a man in the middle changing
    a page -- stops the thread with EBADMSG before anything of it is placed: the page stays
    MISSING and the RAM file keeps what it had."""
    from transport import channel_pair
    from vmem.format import wire
    from vmem.migration.postcopy import native_link

    npages = 16
    fd = nat.memfd_create(f"vmem-test-tamper-{os.getpid()}")
    a, b = channel_pair()
    session = bytes(range(40, 72))
    framed = _link_framing(framing)
    dest, src = framed(a, session, "client"), framed(b, session, "server")

    def answer(pfn: int, page: np.ndarray) -> bytes:
        head = np.array([int(wire.PostcopyRecordType.PAGE_DATA) | ((8 + 8 + PAGE) << 32), 1, pfn], dtype="<u8")
        return head.tobytes() + page.tobytes()

    try:
        os.ftruncate(fd, npages * PAGE)
        state = np.zeros(npages, np.uint8)  # MISSING
        dest.send(b"attach")
        assert src.recv_exact(6) == b"attach"
        link_fd, mac = native_link(dest)
        engine = nat.PostcopyFaultEngine(-1, link_fd, fd, 0, npages, state, np.zeros(npages, np.uint8),
                                         np.zeros(npages, np.uint8), np.zeros(npages, np.int64), None,
                                         np.zeros((16, 3), np.int64), npages)
        try:
            engine.set_mac(mac)
            engine.start()
            good = np.full(PAGE, 0xA5, np.uint8)
            src.send(answer(3, good))
            deadline = time.monotonic() + 10
            while state[3] != nat.PC_PRESENT and time.monotonic() < deadline:
                time.sleep(0.001)
            assert state[3] == nat.PC_PRESENT
            assert os.pread(fd, PAGE, 3 * PAGE) == good.tobytes()
            forged = answer(5, np.full(PAGE, 0x5A, np.uint8))
            b.send(len(forged).to_bytes(4, "little") + forged + bytes(16))  # right shape, wrong tag
            assert _wait_stats(engine, "error", errno.EBADMSG)["error"] == errno.EBADMSG
            assert state[5] == nat.PC_MISSING
            assert os.pread(fd, PAGE, 5 * PAGE) == bytes(PAGE)
        finally:
            engine.stop()
            engine.close()
    finally:
        os.close(fd)
        dest.close()
        src.close()


@pytest.mark.parametrize("framing", ["mac", "sealed"])
def test_fault_server_speaks_the_mac_framing_of_a_keyed_link(framing):
    """On a keyed link the C fault server takes over transport.secure.MacChannel's framing,
    on a TLS link's urgent connection transport.seal's (keys and frame numbers from
    native_handoff, after Python frames went both ways): a Python peer's FAULT is answered
    with frames that peer verifies (and decrypts), an answer larger than one frame spans
    frames, and a forged frame stops the server (EBADMSG)."""
    from transport import channel_pair
    from vmem.format import wire
    from vmem.migration.postcopy import native_link

    npages = 512
    ram = np.random.default_rng(5).integers(0, 256, (npages, PAGE), dtype=np.uint8)
    sent = np.zeros(npages, dtype=np.uint8)
    cursor = np.zeros(3, dtype=np.int64)
    a, b = channel_pair()
    session = bytes(range(7, 39))
    framed = _link_framing(framing)
    dest, src = framed(a, session, "client"), framed(b, session, "server")
    try:
        dest.send(b"attach")  # the attach exchange, framed by Python: frame numbers move on
        assert src.recv_exact(6) == b"attach"
        src.send(b"ok")
        assert dest.recv_exact(2) == b"ok"
        fd, mac = native_link(src)
        assert mac["send_seq"] == 1 and mac["recv_seq"] == 1 and mac["cipher"] == framed.CIPHER
        with pytest.raises(Exception, match="handed to native code"):
            src.send(b"x")  # the Python channel must not move data any more
        server = nat.PostcopyFaultServer(fd, ram, sent, cursor)
        try:
            server.set_mac(mac)
            server.start()
            wanted = list(range(100, 100 + 300))  # 1.2 MiB of pages: the answer spans two frames
            dest.send(_urgent_fault(wanted))
            head = np.frombuffer(dest.recv_exact(16 + 8 * len(wanted)), dtype="<u8")
            assert int(head[0]) & 0xFFFFFFFF == wire.PostcopyRecordType.PAGE_DATA and head[1] == len(wanted)
            pages = np.frombuffer(dest.recv_exact(len(wanted) * PAGE), dtype=np.uint8).reshape(-1, PAGE)
            assert np.array_equal(pages, ram[wanted])
            assert _wait_stats(server, "fault_records", 1)["error"] == 0
            # A man in the middle: a frame of the right shape with a wrong tag.
            forged = _urgent_fault([3])
            a.send(len(forged).to_bytes(4, "little") + forged + bytes(16))
            assert _wait_stats(server, "error", errno.EBADMSG)["error"] == errno.EBADMSG
            assert sent[3] == 0  # nothing was answered for it
        finally:
            server.stop()
            server.close()
    finally:
        dest.close()
        src.close()


def test_fault_thread_refuses_an_unknown_link_cipher():
    """A handoff naming a framing the native threads do not speak is refused before they
    start (a silent fallback would put a TLS link's pages on the wire in the clear)."""
    import socket

    a, b = socket.socketpair()
    with a, b:
        server = nat.PostcopyFaultServer(a.fileno(), np.zeros((4, PAGE), np.uint8), np.zeros(4, np.uint8),
                                         np.zeros(3, np.int64))
        try:
            with pytest.raises(ValueError, match="unknown link cipher 'rot13'"):
                server.set_mac({"send_key": bytes(32), "recv_key": bytes(32), "send_seq": 0, "recv_seq": 0,
                                "cipher": "rot13"})
        finally:
            server.close()


def test_fault_server_seals_its_answers_on_a_tls_links_urgent_connection():
    """Confidentiality of the sealed urgent link: the C fault server's answer carries no
    byte of the page in the clear (a marker filling the pages is not on the wire), and a
    SealedChannel holding the session key decrypts it to exactly the pages -- while a
    MacChannel link (integrity only) does carry them in the clear, which is what the check
    catches."""
    from transport import channel_pair
    from transport.seal import SealedChannel, new_session_key
    from transport.secure import MacChannel
    from vmem.migration.postcopy import native_link

    npages, wanted = 64, [9, 10, 11]
    marker = b"vmem-plain-page!"  # 16 bytes, repeated over every page
    ram = np.frombuffer(marker * (npages * PAGE // len(marker)), dtype=np.uint8).reshape(npages, PAGE).copy()
    for framed, on_wire_plain in ((SealedChannel, False), (MacChannel, True)):
        key = new_session_key()
        a, b = channel_pair()
        c, d = channel_pair()
        src, dest, reader = framed(b, key, "server"), framed(a, key, "client"), framed(c, key, "client")
        try:
            fd, mac = native_link(src)
            server = nat.PostcopyFaultServer(fd, ram, np.zeros(npages, np.uint8), np.zeros(3, np.int64))
            try:
                server.set_mac(mac)
                server.start()
                dest.send(_urgent_fault(wanted))
                n_wire = 4 + (16 + 8 * len(wanted) + len(wanted) * PAGE) + 16  # one frame
                raw = a.recv_exact(n_wire)  # the bytes on the wire, under the framing
            finally:
                server.stop()
                server.close()
            assert (marker in raw) is on_wire_plain, framed.__name__
            d.send(raw)
            head = reader.recv_exact(16 + 8 * len(wanted))
            assert np.frombuffer(head, dtype="<u8")[2:].tolist() == wanted
            assert np.array_equal(np.frombuffer(reader.recv_exact(len(wanted) * PAGE), np.uint8).reshape(-1, PAGE),
                                  ram[wanted])
        finally:
            for ch in (src, dest, reader, d):
                ch.close()
