"""Guest RAM as the guest sees it: a header, a version ledger and stamped data pages.

Everything a guest must find again after migration lives in its RAM (see DESIGN.md,
"Guest state lives in RAM").  This module gives that RAM a self-checking layout so that
the guest itself can prove, after any migration, that every page arrived intact and at
the right version -- the end-to-end oracle of the laboratory.  Pure numpy: no processes,
no kernel calls; the RAM is whatever ``(npages, 4096)`` uint8 array it is handed (a view
of the shared memfd mapping in a real guest, ``np.zeros`` in tests).

Layout (all integers little-endian; one cell = one 4 KiB page)::

    page 0                 header, u64 words:
                             [0] magic  = b"vmemRAM\\0"
                             [1] layout version (LAYOUT_VERSION)
                             [2] npages
                             [3] first_data_page
                             [4..511] zero
    pages 1 .. F-1         ledger: u32 version[npages], one entry per page of RAM
                           (entries of the header and ledger pages themselves stay 0);
                           F = first_data_page = 1 + ceil(npages * 4 / 4096)
    pages F .. npages-1    data pages, each holding the stamp of its ledger version

Compatibility rule: :meth:`GuestMemory.attach` accepts exactly ``LAYOUT_VERSION``; any
change to the header, the ledger or the stamp bumps it.

Page stamp of data page ``p`` at version ``v`` (u64 words)::

    v == 0:  the page is all zero (never written)
    v >  0:  word 0      = (0x564D << 48) | p          "VM" tag + own page number
             word 1      = v
             word i>=2   = h(p, v) XOR K[i]            (the "fill")

    h(p, v) = mix64(((p << 32) | v) + GAMMA)           first splitmix64 output for key
    K[i]    = mix64((i + 1) * GAMMA)                   splitmix64 stream, seed 0
    mix64   = splitmix64 finaliser (xor-shift 30/27/31, multiply by
              0xBF58476D1CE4E5B9 and 0x94D049BB133111EB), GAMMA = 0x9E3779B97F4A7C15

so every byte of a page depends on the page number and its version: a stale page (older
version), a misplaced page (another page's stamp), a zeroed page and a flipped byte all
differ from the expected stamp.  Versions are u32 and wrap from 2**32-1 to 1 (0 is
reserved for "never written").
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from vmem.errors import ConfigError, GuestError
from vmem.pages import PAGE_SIZE

__all__ = [
    "PAGE_SIZE",
    "WORDS_PER_PAGE",
    "HEADER_MAGIC",
    "LAYOUT_VERSION",
    "STAMP_TAG",
    "GuestMemory",
    "VerifyResult",
    "page_stamp",
    "ledger_page_count",
]

WORDS_PER_PAGE = PAGE_SIZE // 8
HEADER_MAGIC = int.from_bytes(b"vmemRAM\x00", "little")
LAYOUT_VERSION = 1
STAMP_TAG = 0x564D
MAX_NPAGES = 1 << 32  # the stamp key packs the page number into 32 bits

# Header word indices (page 0).
_H_MAGIC, _H_VERSION, _H_NPAGES, _H_FIRST_DATA = 0, 1, 2, 3
_HEADER_WORDS = 4

# splitmix64 constants.  numpy scalars, so that uint64 arithmetic wraps mod 2**64 under
# both the numpy 1.x and 2.x promotion rules.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_TAG_WORD = np.uint64(STAMP_TAG << 48)
_U32_MAX = 0xFFFFFFFF

# Verification works on blocks this large: 4 MiB of pages plus a 4 MiB expected-stamp
# buffer stay in cache, which measured ~2x faster than 16384-page blocks here.
DEFAULT_VERIFY_CHUNK_PAGES = 1024
# Writes build stamps in a temporary of this many pages at most (64 MiB).
DEFAULT_WRITE_CHUNK_PAGES = 16384


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser over a uint64 array (in place on ``z``, which it returns)."""
    z ^= z >> np.uint64(30)
    z *= _MUL1
    z ^= z >> np.uint64(27)
    z *= _MUL2
    z ^= z >> np.uint64(31)
    return z


# The per-word fill pattern K; words 0 and 1 are overwritten by tag and version.
_FILL_K = _mix64(np.arange(1, WORDS_PER_PAGE + 1, dtype=np.uint64) * _GAMMA)
_FILL_K.setflags(write=False)


def _stamp_keys(pages: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """h(p, v) for arrays of pages and versions (uint64 result)."""
    z = (pages.astype(np.uint64) << np.uint64(32)) | versions.astype(np.uint64)
    z += _GAMMA
    return _mix64(z)


def _write_stamps(out: np.ndarray, pages: np.ndarray, versions: np.ndarray) -> None:
    """Write the stamps of ``pages`` at ``versions`` into ``out`` (n, 512) uint64.

    ``out`` may be a strided view into RAM (e.g. ``words[a:b]``): no temporary of page
    size is made.
    """
    np.bitwise_xor(_stamp_keys(pages, versions)[:, None], _FILL_K[None, :], out=out)
    out[:, 0] = _TAG_WORD | pages.astype(np.uint64)
    out[:, 1] = versions
    zero = versions == 0
    if zero.any():
        out[zero] = 0


def page_stamp(page: int, version: int) -> np.ndarray:
    """Return the 4096-byte stamp (uint8) data page ``page`` holds at ``version``."""
    if not 0 <= page < MAX_NPAGES or not 0 <= version <= _U32_MAX:
        raise ValueError(f"page {page} / version {version} out of range")
    out = np.empty((1, WORDS_PER_PAGE), dtype=np.uint64)
    _write_stamps(out, np.array([page], np.uint64), np.array([version], np.uint32))
    return out.view(np.uint8).reshape(PAGE_SIZE)


def ledger_page_count(npages: int) -> int:
    """Number of pages the u32 ledger of a ``npages`` RAM occupies."""
    return -(-npages * 4 // PAGE_SIZE)


def _prev_version(versions: np.ndarray) -> np.ndarray:
    """Version a page held before it was bumped to ``versions`` (1 -> 0, 0 -> 0)."""
    prev = versions - np.uint32(1)
    prev[versions == 0] = 0
    return prev


@dataclasses.dataclass
class VerifyResult:
    """Outcome of :meth:`GuestMemory.verify`.

    Attributes:
        ok: True iff the header is valid and every data page equals its ledger stamp.
        pages_checked: data pages compared (0 if the header was unusable).
        bad_pages: pages that failed (data pages, plus page 0 for a bad header and
            metadata pages whose ledger entry is not 0).
        first_bad: up to 10 of the failing page numbers, ascending.
        detail: one human-readable line; for a failure it diagnoses the first bad page
            (zeroed, stale, misplaced, corrupt).
    """

    ok: bool
    pages_checked: int
    bad_pages: int
    first_bad: list[int]
    detail: str
    #: :meth:`GuestMemory.verify_concurrent` only: pages that failed one read and were
    #: rewritten by the guest before they could be judged (neither proven nor disproven).
    unproven_pages: int = 0


class GuestMemory:
    """The guest's RAM with its header, ledger and stamped data pages.

    Construct over an existing ``(npages, 4096)`` uint8 C-contiguous array, then call
    :meth:`format` (first boot) or :meth:`attach` (destination / re-attach).

    Attributes:
        ram: the uint8 ``(npages, 4096)`` array.
        words: uint64 view of ``ram``, shape ``(npages, 512)``.
        ledger: uint32 view of length ``npages`` over the ledger pages; ``ledger[p]`` is
            the version data page ``p`` holds.  Being RAM, it migrates with the pages.
        npages: pages of RAM.
        first_data_page: first page that holds data (after header and ledger).
        data_pages: number of data pages, ``npages - first_data_page``.
        pages_written: page stamps this object has written (unique pages per
            :meth:`write_pages` call, summed).  Process-local: it does not migrate.

    Concurrency contract (one writer, any number of readers in other processes):
    :meth:`write_pages` updates the ledger entries of a batch *first* and writes the page
    bodies *after*.  On x86-64 (TSO: stores become visible in program order) a reader that
    reads ``ledger[p]`` (L1), then the page, then ``ledger[p]`` again (L2) and finds
    L1 == L2 == L knows every byte it read belongs to the stamp of version L or of L-1
    (the page may be torn between the two while its write is in flight).  That is what
    ``check_pages(..., concurrent=True)`` implements.  :meth:`verify` and the default
    :meth:`check_pages` are exact and need a settled RAM: the writer paused at a safe
    point between steps (as it is when migration stops it) or the caller is the writer.
    """

    def __init__(self, ram: np.ndarray):
        """Wrap ``ram``; does not read or write it.

        Raises:
            ConfigError: ``ram`` is not a C-contiguous uint8 ``(npages, 4096)`` array, or
                ``npages`` is too small for header + ledger + one data page, or >= 2**32.
        """
        if not isinstance(ram, np.ndarray) or ram.dtype != np.uint8 or ram.ndim != 2 \
                or ram.shape[1] != PAGE_SIZE or not ram.flags.c_contiguous:
            raise ConfigError("ram", "must be a C-contiguous uint8 array of shape (npages, 4096)")
        npages = ram.shape[0]
        first_data_page = 1 + ledger_page_count(npages)
        if npages < first_data_page + 1:
            raise ConfigError(
                "npages", f"{npages} pages is too small: header and ledger need "
                f"{first_data_page} pages, plus at least one data page")
        if npages > MAX_NPAGES:
            raise ConfigError("npages", f"{npages} pages exceeds the layout limit of 2**32")
        self.ram = ram
        self.npages = npages
        self.first_data_page = first_data_page
        self.data_pages = npages - first_data_page
        self.words = ram.view(np.uint64)
        self.ledger = ram[1:first_data_page].reshape(-1).view(np.uint32)[:npages]
        self.pages_written = 0

    # -- header ------------------------------------------------------------------------

    def _expected_header(self) -> np.ndarray:
        header = np.zeros(WORDS_PER_PAGE, dtype=np.uint64)
        header[_H_MAGIC] = HEADER_MAGIC
        header[_H_VERSION] = LAYOUT_VERSION
        header[_H_NPAGES] = self.npages
        header[_H_FIRST_DATA] = self.first_data_page
        return header

    def format(self) -> "GuestMemory":
        """First boot: write the header and zero the ledger; returns ``self``.

        Data pages are not touched: they must already be zero (a fresh memfd is) or be
        filled with :meth:`fill_all` before :meth:`verify` can pass.
        """
        self.ram[1:self.first_data_page] = 0
        # Header last, so that a half-formatted RAM never attaches.
        self.words[0] = self._expected_header()
        return self

    def _header_problem(self) -> str:
        """Why the header is unusable, or ``""`` if it is valid."""
        # Python ints, compared one by one: numpy scalars cost ~10x more, and this runs at
        # every resume of an incoming guest, inside the downtime.
        got = self.words[0, :_HEADER_WORDS].tolist()
        if got[_H_MAGIC] != HEADER_MAGIC:
            return f"bad magic {int(got[_H_MAGIC]):#018x} (not a formatted vmem guest RAM)"
        if got[_H_VERSION] != LAYOUT_VERSION:
            return f"unsupported layout version {int(got[_H_VERSION])} (this build reads {LAYOUT_VERSION})"
        if got[_H_NPAGES] != self.npages:
            return f"header says {int(got[_H_NPAGES])} pages, RAM has {self.npages}"
        if got[_H_FIRST_DATA] != self.first_data_page:
            return f"header says first data page {int(got[_H_FIRST_DATA])}, layout needs {self.first_data_page}"
        return ""

    def attach(self) -> "GuestMemory":
        """Validate an existing header (destination or re-attach); returns ``self``.

        Raises:
            GuestError: the header is missing, of another layout version, or describes a
                RAM of a different size.
        """
        problem = self._header_problem()
        if problem:
            raise GuestError(f"guest RAM header: {problem}")
        return self

    # -- writing -----------------------------------------------------------------------

    def _as_data_pages(self, pages) -> np.ndarray:
        pages = np.asarray(pages)
        if pages.dtype.kind not in "iu":
            raise ValueError(f"pages must be integers, got dtype {pages.dtype}")
        pages = pages.reshape(-1).astype(np.int64, copy=False)
        if pages.size and (pages.min() < self.first_data_page or pages.max() >= self.npages):
            raise ValueError(
                f"pages must lie in the data range [{self.first_data_page}, {self.npages}); "
                f"got min {int(pages.min())}, max {int(pages.max())}")
        return pages

    def _stamp_unique(self, pages: np.ndarray) -> None:
        """Bump and stamp sorted unique ``pages``: ledger first, then bodies (see class doc)."""
        versions = self.ledger[pages] + np.uint32(1)
        versions[versions == 0] = 1  # u32 wrap skips 0, which means "never written"
        self.ledger[pages] = versions
        stamps = np.empty((pages.size, WORDS_PER_PAGE), dtype=np.uint64)
        _write_stamps(stamps, pages, versions)
        self.words[pages] = stamps
        self.pages_written += int(pages.size)

    def write_pages(self, pages) -> int:
        """Bump the version of each page and write its new stamp; returns pages written.

        ``pages`` are absolute page numbers in ``[first_data_page, npages)``; duplicates
        count once.  Fully vectorised; large requests are processed in chunks of
        ``DEFAULT_WRITE_CHUNK_PAGES`` so the temporary stays bounded.

        Raises:
            ValueError: a page lies outside the data range or ``pages`` is not integral
                (nothing is written then).
        """
        pages = np.unique(self._as_data_pages(pages))
        for start in range(0, pages.size, DEFAULT_WRITE_CHUNK_PAGES):
            self._stamp_unique(pages[start:start + DEFAULT_WRITE_CHUNK_PAGES])
        return int(pages.size)

    def fill_all(self, chunk_pages: int = 16384) -> None:
        """Write every data page once (first boot: a booted OS using its memory).

        On freshly formatted RAM every data page ends at version 1.  Contiguous chunks
        are stamped in place, without a page-sized temporary.
        """
        if chunk_pages < 1:
            raise ValueError("chunk_pages must be >= 1")
        for start in range(self.first_data_page, self.npages, chunk_pages):
            stop = min(start + chunk_pages, self.npages)
            versions = self.ledger[start:stop] + np.uint32(1)
            versions[versions == 0] = 1
            self.ledger[start:stop] = versions
            pages = np.arange(start, stop, dtype=np.uint64)
            _write_stamps(self.words[start:stop], pages, versions)
            self.pages_written += stop - start

    # -- checking ----------------------------------------------------------------------

    @staticmethod
    def _rows_match(rows: np.ndarray, pages: np.ndarray, versions: np.ndarray,
                    expected: np.ndarray, equal: np.ndarray) -> np.ndarray:
        """Per row: does ``rows[i]`` equal the stamp of ``(pages[i], versions[i])``?

        ``expected`` and ``equal`` are scratch buffers with at least ``len(rows)`` rows.
        """
        n = rows.shape[0]
        expected = expected[:n]
        equal = equal[:n]
        _write_stamps(expected, pages, versions)
        np.equal(rows, expected, out=equal)
        if equal.all():  # the common case: one fast reduction, no per-row work
            return np.ones(n, dtype=bool)
        return equal.all(axis=1)

    def check_pages(self, pages, *, concurrent: bool = False, retries: int = 3) -> np.ndarray:
        """Spot-check pages against the ledger; returns a bool per entry of ``pages``.

        Args:
            pages: absolute data page numbers (any order, duplicates allowed).
            concurrent: False (default): exact -- page == stamp(ledger[page]); the RAM
                must be settled (see the class docstring).  True: for a reader racing
                one writer: a page passes if, with its ledger entry unchanged across the
                read, each byte equals the stamp of the ledger version or of the version
                before it (a write in flight).  Pages whose ledger entry moves during the
                read are re-read up to ``retries`` times; one that never settles is
                reported True (it is being rewritten continuously and cannot be
                disproven).

        Raises:
            ValueError: a page lies outside the data range.
        """
        pages = self._as_data_pages(pages)
        result = np.ones(pages.size, dtype=bool)
        for start in range(0, pages.size, DEFAULT_VERIFY_CHUNK_PAGES):
            chunk = pages[start:start + DEFAULT_VERIFY_CHUNK_PAGES]
            if concurrent:
                result[start:start + chunk.size] = self._check_concurrent(chunk, retries)
            else:
                n = chunk.size
                result[start:start + n] = self._rows_match(
                    self.words[chunk], chunk, self.ledger[chunk],
                    np.empty((n, WORDS_PER_PAGE), np.uint64),
                    np.empty((n, WORDS_PER_PAGE), bool))
        return result

    def _check_concurrent(self, pages: np.ndarray, retries: int) -> np.ndarray:
        result = np.ones(pages.size, dtype=bool)
        todo = np.arange(pages.size)
        for _ in range(retries + 1):
            sub = pages[todo]
            # The read order is the protocol: ledger, body, ledger (see class docstring).
            before = self.ledger[sub].copy()
            rows = self.words[sub]
            after = self.ledger[sub].copy()
            settled = before == after
            idx, versions, rows = todo[settled], before[settled], rows[settled]
            sub = sub[settled]
            new = np.empty((idx.size, WORDS_PER_PAGE), np.uint64)
            old = np.empty_like(new)
            _write_stamps(new, sub, versions)
            _write_stamps(old, sub, _prev_version(versions))
            got_b, new_b, old_b = (a.view(np.uint8) for a in (rows, new, old))
            ok = ((got_b == new_b) | (got_b == old_b)).all(axis=1)
            wrapped = versions == 1  # before a u32 wrap, version 1 followed 2**32-1
            if wrapped.any() and not ok[wrapped].all():
                alt = np.empty((int(wrapped.sum()), WORDS_PER_PAGE), np.uint64)
                _write_stamps(alt, sub[wrapped], np.full(alt.shape[0], _U32_MAX, np.uint32))
                alt_b = alt.view(np.uint8)
                ok[wrapped] |= ((got_b[wrapped] == new_b[wrapped])
                                | (got_b[wrapped] == alt_b)).all(axis=1)
            result[idx] = ok
            todo = todo[~settled]
            if todo.size == 0:
                break
        return result

    def verify(self, chunk_pages: int = DEFAULT_VERIFY_CHUNK_PAGES) -> VerifyResult:
        """The guest's own ledger check: is every page exactly what the ledger says?

        Checks the header page (fields and zero padding), that the ledger entries of the
        header and ledger pages are 0, and that every data page equals the stamp of its
        ledger version (all zero at version 0).  Works in chunks of ``chunk_pages``; the
        temporaries are an expected-stamp buffer of that many pages and its bool mask
        (4.5 MiB at the default 1024 pages), whatever the guest size.  Needs a settled RAM
        (use :meth:`verify_concurrent` from outside while the guest runs).

        Guarantees: ``ok`` is True iff all of the above hold, so after a migration it
        proves that every page arrived, none is stale or misplaced, and the ledger itself
        arrived consistent with the pages (a stale ledger page names versions the pages
        no longer hold).
        """
        if chunk_pages < 1:
            raise ValueError("chunk_pages must be >= 1")
        problem = self._header_problem()
        if problem:
            return VerifyResult(False, 0, 1, [0], f"header: {problem}")
        bad_data: list[np.ndarray] = []
        expected = np.empty((chunk_pages, WORDS_PER_PAGE), np.uint64)
        equal = np.empty((chunk_pages, WORDS_PER_PAGE), bool)
        for start in range(self.first_data_page, self.npages, chunk_pages):
            stop = min(start + chunk_pages, self.npages)
            ok = self._rows_match(self.words[start:stop],
                                  np.arange(start, stop, dtype=np.uint64),
                                  self.ledger[start:stop], expected, equal)
            if not ok.all():
                bad_data.append(np.flatnonzero(~ok) + start)
        return self._result(bad_data)

    #: :meth:`verify_concurrent`'s waits before re-reading a page that did not match.  A
    #: write in flight lasts at most one ``write_pages`` chunk (64 MiB: tens of ms); a page
    #: that still does not match after all of them (~0.56 s), its ledger entry unchanged,
    #: is wrong, not torn.
    RECHECK_DELAYS_S = (0.001, 0.01, 0.05, 0.5)

    def verify_concurrent(self, chunk_pages: int = DEFAULT_VERIFY_CHUNK_PAGES,
                          recheck_delays_s: tuple[float, ...] = RECHECK_DELAYS_S) -> VerifyResult:
        """The ledger check from another process while the guest keeps running.

        The lab's check after a migration must not stop the guest it measures, so it reads
        the RAM from outside under the concurrency contract (class docstring): per chunk,
        ledger, pages, ledger again; a page matches if its ledger entry held still across
        the read and the page equals the stamp of that version *exactly*.  Pages that do not
        (a write in flight, or a wrong page) are re-read after each of ``recheck_delays_s``.

        Guarantees (one writer that bumps the ledger before the page, as ``write_pages``):
        a page is reported bad only if it failed the exact check at every read while its
        ledger entry stayed at the same version for all of them -- a write in flight ends
        long before, so it is stale, misplaced, zeroed or corrupt.  A page that matched
        exactly at the version it first failed at was torn by a write then in flight, and
        is good.  A page the guest rewrote (its ledger moved) after it failed a read cannot
        be judged any more: counted in ``unproven_pages``, not in ``bad_pages``.  Header and
        metadata pages (which the guest never writes) are checked exactly.  With a settled
        RAM the result equals :meth:`verify`'s.
        """
        if chunk_pages < 1:
            raise ValueError("chunk_pages must be >= 1")
        problem = self._header_problem()
        if problem:
            return VerifyResult(False, 0, 1, [0], f"header: {problem}")
        expected = np.empty((chunk_pages, WORDS_PER_PAGE), np.uint64)
        equal = np.empty((chunk_pages, WORDS_PER_PAGE), bool)
        suspects: list[np.ndarray] = []
        suspect_versions: list[np.ndarray] = []
        for start in range(self.first_data_page, self.npages, chunk_pages):
            stop = min(start + chunk_pages, self.npages)
            pages = np.arange(start, stop, dtype=np.uint64)
            ok, versions = self._read_match(pages, expected, equal, span=(start, stop))
            if not ok.all():
                suspects.append(pages[~ok])
                suspect_versions.append(versions[~ok])
        pages = np.concatenate(suspects) if suspects else np.empty(0, np.uint64)
        first_version = np.concatenate(suspect_versions) if suspect_versions else np.empty(0, np.uint32)
        unproven = 0
        for delay_s in recheck_delays_s:
            if pages.size == 0:
                break
            time.sleep(delay_s)
            ok, versions = self._read_match(pages, np.empty((pages.size, WORDS_PER_PAGE), np.uint64),
                                            np.empty((pages.size, WORDS_PER_PAGE), bool))
            same = versions == first_version
            unproven += int(np.count_nonzero(~same))
            keep = same & ~ok
            pages, first_version = pages[keep], first_version[keep]
        result = self._result([pages.astype(np.int64)])
        result.unproven_pages = unproven
        if unproven and result.ok:
            result.detail += f"; {unproven} pages rewritten by the running guest while being checked (unproven)"
        return result

    def _read_match(self, pages: np.ndarray, expected: np.ndarray, equal: np.ndarray,
                    span: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One read under the concurrency contract, in its order: ledger, pages, ledger.

        Returns (per page: equal to the stamp of its ledger version with that entry unchanged
        across the read; the entry as read last).  ``span``: ``pages`` is the contiguous
        range [first, end) (read in place, no copy of the bodies).
        """
        if span is not None:
            first, end = span
            ledger, rows = self.ledger[first:end], self.words[first:end]
            before = ledger.copy()
            ok = self._rows_match(rows, pages, before, expected, equal)  # reads the bodies now
            after = ledger.copy()
        else:
            idx = pages.astype(np.intp)
            before = self.ledger[idx]
            rows = self.words[idx]  # the bodies, copied after the first ledger read
            ok = self._rows_match(rows, pages, before, expected, equal)
            after = self.ledger[idx]
        return ok & (before == after), after

    def _result(self, bad_data: list[np.ndarray]) -> VerifyResult:
        """The verdict from the bad data pages found, plus the metadata checks (static)."""
        bad_meta = []
        if self.words[0, _HEADER_WORDS:].any():
            bad_meta.append(0)
        bad_meta.extend(int(p) for p in np.flatnonzero(self.ledger[:self.first_data_page]))
        bad_meta = sorted(set(bad_meta))
        bad = np.concatenate(bad_data) if bad_data else np.empty(0, np.int64)
        bad = np.sort(bad)
        bad_total = len(bad_meta) + int(bad.size)
        first_bad = (bad_meta + [int(p) for p in bad[:10]])[:10]
        if bad_total == 0:
            detail = f"all {self.data_pages} data pages match their ledger versions"
        elif bad_meta:
            p = bad_meta[0]
            detail = (f"{bad_total} bad pages; page {p} is metadata: "
                      + ("header padding is not zero" if p == 0 else
                         f"its ledger entry is {int(self.ledger[p])}, expected 0"))
        else:
            detail = f"{bad_total} bad pages; page {first_bad[0]}: {self.describe_page(first_bad[0])}"
        return VerifyResult(bad_total == 0, self.data_pages, bad_total, first_bad, detail)

    def describe_page(self, page: int) -> str:
        """Diagnose a data page against its ledger: ok, zeroed, stale, misplaced or corrupt."""
        page = int(self._as_data_pages([page])[0])
        want = int(self.ledger[page])
        got = self.ram[page]
        if np.array_equal(got, page_stamp(page, want)):
            return f"ok (version {want})"
        if not got.any():
            return f"zeroed; ledger says version {want}"
        words = self.words[page]
        if int(words[0]) >> 48 == STAMP_TAG and int(words[1]) <= _U32_MAX:
            owner, held = int(words[0]) & ((1 << 48) - 1), int(words[1])
            if owner < MAX_NPAGES and np.array_equal(got, page_stamp(owner, held)):
                if owner != page:
                    return f"misplaced: holds page {owner}'s stamp of version {held}"
                return (f"{'stale' if held < want else 'ahead of the ledger'}: holds an intact "
                        f"stamp of version {held}; ledger says version {want}")
        differ = np.flatnonzero(got != page_stamp(page, want))
        return (f"corrupt: {differ.size} of {PAGE_SIZE} bytes differ from the stamp of version "
                f"{want}, first at byte offset {int(differ[0])}")
