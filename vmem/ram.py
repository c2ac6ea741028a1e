"""Guest RAM: a sealed memfd, mapped MAP_SHARED, viewed as numpy pages.

The guest process and the migrator map the same memfd, so the migrator reads source
pages without any copy through the guest.  The memfd is sealed against shrinking and
growing once sized (Firecracker's habit): nobody can truncate RAM under a running guest.

Guarantees:
    * ``GuestRam.pages`` is a writable ``(npages, PAGE_SIZE)`` uint8 view of the mapping.
    * ``close()`` unmaps and closes the fd it owns; it is idempotent.
    * ``data_runs()`` lists the page runs that hold data; pages outside them are holes
      that read as zero and that nobody has ever written (SEEK_DATA/SEEK_HOLE).
"""
from __future__ import annotations

import errno
import gc
import fcntl
import mmap
import os

import numpy as np

from vmem.errors import ConfigError, VmemError
from vmem.pages import PAGE_SIZE, runs_to_pages

# PAGE_SIZE is defined in vmem.pages and re-exported here: RAM is made of pages.
__all__ = ["PAGE_SIZE", "GuestRam", "parse_size", "format_bytes", "mem_available_bytes", "preallocate"]

_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int, parameter: str = "--size") -> int:
    """Parse a memory size such as ``256M``, ``1G``, ``1GiB``, ``4096`` into bytes.

    Suffixes are binary (K = 1024).  The result must be a positive multiple of the page
    size.

    Raises:
        ConfigError: malformed, non-positive, or not page-aligned.
    """
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
        unit = s[-1:] if s[-1:] in _SIZE_SUFFIXES and not s[-1:].isdigit() else ""
        number = s[: len(s) - len(unit)] if unit else s
        try:
            value = int(float(number) * _SIZE_SUFFIXES[unit])
        except ValueError:
            raise ConfigError(parameter, f"cannot parse size {text!r} (examples: 256M, 1G, 4096)") from None
    if value <= 0:
        raise ConfigError(parameter, f"size must be positive, got {text!r}")
    if value % PAGE_SIZE:
        raise ConfigError(parameter, f"size must be a multiple of {PAGE_SIZE} bytes, got {text!r}")
    return value


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (a very large number if it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def preallocate(fd: int, nbytes: int) -> float:
    """Allocate every page of the RAM memfd ``fd`` up to ``nbytes`` now (``fallocate``), as
    QEMU's ``-mem-prealloc`` does: later writes into it (the destination's ``pwrite`` of
    round 0, the post-copy push) then copy into pages that exist instead of allocating,
    zeroing and charging each on first touch -- on this kind of VM, where first touch of
    fresh memory also faults in the host, that is most of a fresh ``pwrite``'s cost
    (docs/performance.md).  The pages read as zero and are not mapped anywhere, so a
    guest registered with userfaultfd MINOR still traps on each of them.

    Returns the seconds it took.  Raises OSError (errno, e.g. ENOSPC or ENOMEM: the memory
    is not there) -- the caller turns it into a refusal; pages allocated before the
    failure are freed with the memfd.
    """
    import time

    t0 = time.monotonic()
    if nbytes > 0:
        os.posix_fallocate(fd, 0, nbytes)
    return time.monotonic() - t0


def format_bytes(n: float) -> str:
    """Human-readable binary size, e.g. ``1.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


#: madvise(2) advice: fault a range into the caller's page tables, as reads would (Linux
#: 5.14; older Python mmap modules do not name it)
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
#: ... as writes would: the pages mapped writable (Linux 5.14)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class GuestRam:
    """A guest's RAM: a memfd mapped shared, with a numpy page view.

    Args:
        fd: the memfd (ownership passes to this object; ``close()`` closes it).
        npages: number of pages.
    """

    def __init__(self, fd: int, npages: int, *, readonly: bool = False):
        self.fd = fd
        self.npages = npages
        self.size_bytes = npages * PAGE_SIZE
        self.readonly = readonly  # the mapping (address) is read-only
        prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
        try:
            self._mmap = mmap.mmap(fd, self.size_bytes, flags=mmap.MAP_SHARED, prot=prot)
        except OSError as err:
            raise VmemError(f"cannot map guest RAM ({self.size_bytes} bytes): {err}") from err
        flat = np.frombuffer(self._mmap, dtype=np.uint8)
        self.pages: np.ndarray = flat.reshape(npages, PAGE_SIZE)
        #: Address of the mapping in *this* process (for native calls).
        self.address: int = flat.ctypes.data
        del flat

    @classmethod
    def create(cls, size_bytes: int, name: str = "vmem-ram") -> "GuestRam":
        """Create a new zero-filled RAM memfd of ``size_bytes`` and map it.

        Raises:
            VmemError: memfd_create/ftruncate/mmap failed (e.g. out of memory limits).
        """
        if size_bytes <= 0 or size_bytes % PAGE_SIZE:
            raise ConfigError("size", f"RAM size must be a positive multiple of {PAGE_SIZE}")
        try:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as err:
            raise VmemError(f"memfd_create failed: {err}") from err
        try:
            os.ftruncate(fd, size_bytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            return cls(fd, size_bytes // PAGE_SIZE)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open_fd(cls, fd: int, *, readonly: bool = False) -> "GuestRam":
        """Map an existing RAM memfd (size from fstat); takes ownership of ``fd``."""
        size = os.fstat(fd).st_size
        if size <= 0 or size % PAGE_SIZE:
            raise VmemError(f"fd {fd} is not a guest RAM memfd (size {size})")
        return cls(fd, size // PAGE_SIZE, readonly=readonly)

    def data_runs(self) -> np.ndarray:
        """Runs of pages that hold data, as an ``(n, 2)`` int64 array of [first, end).

        Holes (never written) read as zero; a migrator may skip them in round 0.
        """
        runs = []
        offset = 0
        size = self.size_bytes
        while offset < size:
            try:
                start = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # no data after offset
                    break
                raise
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            runs.append((start // PAGE_SIZE, min(-(-end // PAGE_SIZE), self.npages)))
            offset = end
        return np.array(runs, dtype=np.int64).reshape(-1, 2)

    def map_for_writing(self) -> float | None:
        """Map every page of RAM into *this* process's page tables, writable, now
        (``madvise(MADV_POPULATE_WRITE)`` over the whole mapping); returns the seconds it took.

        Why: the destination writes pages through this mapping (post-copy's demand answers
        are copied into it) and digests every page through it, and the first touch of a page
        here costs a page fault each time (~2 us per page on this VM, measured against 1 us
        for the copy into a page already mapped) -- inside a demand fault's round trip.
        ``--prealloc`` (QEMU's ``-mem-prealloc``, which also touches the memory through its
        own mapping) does it ahead, before READY.

        Guarantees: RAM contents do not change (a hole becomes an allocated zero page, as
        :func:`preallocate` makes it); only this process's mapping gains page-table
        entries, so a guest process registered with userfaultfd MINOR on its own mapping
        still traps on every page.  A kernel without the advice (before Linux 5.14: EINVAL)
        returns None and changes nothing: the writes then fault as before.

        Raises:
            OSError: the kernel refused otherwise (ENOMEM: the memory or the page tables
                are not there; EFAULT on a read-only mapping).
        """
        import time

        t0 = time.monotonic()
        try:
            self._mmap.madvise(MADV_POPULATE_WRITE)
        except OSError as err:
            if err.errno == errno.EINVAL:
                return None
            raise
        return time.monotonic() - t0

    def populate_mapping(self, runs: np.ndarray | None = None) -> int:
        """Map the pages of ``runs`` (default: :meth:`data_runs`) into *this* process's page
        tables now, with ``madvise(MADV_POPULATE_READ)``; returns how many pages.

        Why: a migrator reads a guest's RAM through this mapping (``sendmsg`` from it, the
        zero-page check, digests), and a page first read through it costs a page fault;
        a guest's first migration out of the process that booted it otherwise pays that for
        every page inside round 0 (measured on this 2-vCPU VM: ~80-95 ms per GiB; between
        agents round 0 of that first migration ran 10-20 % slower than the next ones,
        docs/performance.md).  Only pages that hold data: reading a hole through a shared
        mapping would allocate it, and the holes are what zero-page elision skips.
        Guarantees: never changes RAM contents; a kernel without MADV_POPULATE_READ (before
        Linux 5.14: EINVAL) returns 0 and changes nothing -- the reads then fault as before.
        """
        runs = self.data_runs() if runs is None else np.asarray(runs, dtype=np.int64).reshape(-1, 2)
        done = 0
        for first, end in runs.tolist():
            try:
                self._mmap.madvise(MADV_POPULATE_READ, first * PAGE_SIZE, (end - first) * PAGE_SIZE)
            except OSError as err:
                if err.errno == errno.EINVAL and done == 0:
                    return 0  # the kernel does not know the advice
                raise VmemError(f"cannot populate the guest RAM mapping (pages {first}..{end}): {err}") from err
            done += end - first
        return done

    def data_runs_in(self, runs: np.ndarray) -> np.ndarray:
        """Runs of pages that hold data *inside* ``runs`` (an ``(n, 2)`` int64 array of
        [first, end) page runs, sorted, not overlapping), as ``data_runs`` returns them.

        One ``lseek`` for a run that is still all hole, two more per run of data found in
        it: what pure post-copy uses at the pause to find the holes written since it listed
        the data pages, at a cost set by the number of holes, not by the size of RAM.
        """
        out = []
        size = self.size_bytes
        for first, end in np.asarray(runs, dtype=np.int64).reshape(-1, 2).tolist():
            offset, stop = first * PAGE_SIZE, min(end * PAGE_SIZE, size)
            while offset < stop:
                try:
                    start = os.lseek(self.fd, offset, os.SEEK_DATA)
                except OSError as err:
                    if err.errno == errno.ENXIO:  # no data after offset at all
                        return np.array(out, dtype=np.int64).reshape(-1, 2)
                    raise
                if start >= stop:
                    break
                hole = min(os.lseek(self.fd, start, os.SEEK_HOLE), stop)
                out.append((start // PAGE_SIZE, -(-hole // PAGE_SIZE)))
                offset = hole
        return np.array(out, dtype=np.int64).reshape(-1, 2)

    def data_pages(self) -> np.ndarray:
        """Every page index inside ``data_runs()``, sorted (int64)."""
        return runs_to_pages(self.data_runs())

    def close(self) -> None:
        """Unmap and close the fd.  Views of ``pages`` must be gone before this."""
        if self._mmap is not None:
            self.pages = None  # type: ignore[assignment]
            close_mapping(self._mmap)
            self._mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def close_mapping(m: mmap.mmap) -> bool:
    """Close an mmap object, collecting garbage first if views of it are still alive.

    ``mmap.mmap`` keeps a dup of the fd until it is closed, and refuses to close while a
    numpy array or memoryview exports it.  Views often linger only in reference cycles (an
    exception's traceback holding a frame holding a page view), so one ``gc.collect()``
    usually frees them.  Returns False if a live view still holds the mapping; it is then
    unmapped (and its fd closed) when the last view dies.
    """
    try:
        m.close()
        return True
    except BufferError:
        gc.collect()
    try:
        m.close()
        return True
    except BufferError:
        return False

