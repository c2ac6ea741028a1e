"""Save a running guest to a file and restore it: vmem's ``xl save`` / ``xl restore``.

A save file is exactly what ``xl save`` writes: xl's save-file header, the domain config,
then the libxl migration stream (libxl header, LIBXC_CONTEXT, the libxc stream with every
page that holds data, the x86 HVM state records, libxl EMULATOR_CONTEXT with the guest
context, libxl END).  Without vmem post-copy records (a save never has them) the stream is
a valid Xen migration stream v2/v3 (Xen's ``verify-stream-v2 -f xl`` accepts the file).

::

     0     1     2     3     4     5     6     7 octet
    +-----------------------------------------------+
    | magic "Xen saved domain, xl format\\n \\0 \\r"  |  32 octets
    | ...                                           |
    +-----------------------+-----------------------+
    | byteorder 0x01020304  | mandatory_flags 3     |  little-endian: 04 03 02 01, 03 00 00 00
    +-----------------------+-----------------------+     (bit 0 JSON config, bit 1 stream v2)
    | optional_flags 0      | optional_data_len     |
    +-----------------------+-----------------------+
    | config_len            | config: JSON, NUL-terminated (config_len counts the NUL) ...
    +-----------------------+------------------------
    | libxl stream: "LibxlFmt" ... libxl END        |  docs/stream.md; offset 48 + optional_data_len
    +-----------------------------------------------+   (not 8-aligned in the file: xl does not pad)

The config is shaped like libxl's domain config (``c_info``: type, name; ``b_info``:
memory) with vmem's own section under ``"vmem"``: the guest spec (workload, params,
seed), RAM size, the guest counters at the pause, and ``ram_digest``, a digest of all of
RAM (XXH64 per page, BLAKE2b-128 over the per-page digests; holes count as zero pages)
that :func:`restore_guest` recomputes from the pages it places, and ``context_digest``
(BLAKE2b-128 of the guest context): corruption the stream framing cannot see (page or
context bytes) is refused before the guest runs.

Guarantees:
    * :func:`save_guest` writes ``PATH.part``, fsyncs it and renames it to ``PATH``: a
      reader never sees a partial file under ``PATH``.  On failure the part file is
      removed and a guest that was paused for the save is resumed.
    * :func:`restore_guest` reads with the bounded :class:`vmem.format.stream.StreamReader`
      (every length checked before anything is read or allocated; at most two 4 MiB
      staging buffers) and raises :class:`~vmem.errors.StreamError` naming the file
      offset for anything malformed; on every failure the incoming guest is reaped.

Command line (one host, no agent)::

    python -m vmem.migration.savefile save --workload hotcold --size 256M --run 2 FILE
    python -m vmem.migration.savefile restore FILE --run 2
    python -m vmem.migration.savefile check FILE
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from vmem.format import control, stream
from vmem.format.frame import ExactSource
from vmem.migration.backend import GuestSpec, boot_guest, incoming_factory
from vmem.errors import MigrationError, StreamError, VmemError
from vmem.format.wire import (
    IHDR_VERSION_2,
    IHDR_VERSIONS,
    MAX_PAGES_PER_RECORD,
    MAX_XL_OPTIONAL_DATA_BYTES,
    PAGE_SIZE,
    PFN_MASK,
    XL_BYTEORDER_VALUE,
    XL_HEADER_BYTES,
    XL_MANDATORY_FLAG_JSON,
    XL_MANDATORY_FLAG_STREAMV2,
    XL_MANDATORY_FLAGS_KNOWN,
    XL_SAVEFILE_MAGIC,
    HvmParam,
    LibxlRecordType,
)

__all__ = ["XlHeader", "encode_xl_header", "read_xl_header", "save_guest", "restore_guest", "RamPlacement",
           "check_savefile", "ram_digest", "SAVEFILE_FORMAT"]

SAVEFILE_FORMAT = 1
"""Version of vmem's ``"vmem"`` config section.  Compatibility rule: a vmem that reads
format F restores files of format F and below; a newer format is refused by name."""

_XL_HDR = struct.Struct("<32sIIII")  # magic, byteorder, mandatory, optional, optional_data_len
_U32 = struct.Struct("<I")
_DIGEST_PREFIX = "blake2b-128:"
_PLACEHOLDER_DIGEST = _DIGEST_PREFIX + "0" * 32  # same width as a real one: rewritten in place

#: progress(pages_done, pages_total)
Progress = Callable[[int, int], Any]

# HVM params whose value is a pfn (the rest are flags or addresses): a restorer clears
# some of those pages, so they must never point into guest RAM.
_PFN_PARAMS = (HvmParam.STORE_PFN, HvmParam.IOREQ_PFN, HvmParam.BUFIOREQ_PFN,
               HvmParam.CONSOLE_PFN, HvmParam.PAGING_RING_PFN, HvmParam.MONITOR_RING_PFN,
               HvmParam.SHARING_RING_PFN)


# ======================================================================================
# xl header
# ======================================================================================


@dataclass(frozen=True)
class XlHeader:
    """What :func:`read_xl_header` found in front of the libxl stream."""

    mandatory_flags: int
    optional_flags: int
    config: dict | None
    """The JSON config (None if the file has none)."""
    stream_offset: int
    """File offset of the libxl stream: 48 + optional_data_len."""

    @property
    def stream_v2(self) -> bool:
        return bool(self.mandatory_flags & XL_MANDATORY_FLAG_STREAMV2)


def encode_xl_header(config: dict) -> bytes:
    """xl's save-file header with ``config`` as the (NUL-terminated JSON) domain config.

    Flags: JSON config | stream v2 (what ``xl save`` of Xen >= 4.6 writes).

    Raises:
        ValueError: the config is larger than ``MAX_XL_OPTIONAL_DATA_BYTES``.
    """
    text = json.dumps(config, separators=(",", ":"), sort_keys=True, allow_nan=False)
    body = text.encode("utf-8") + b"\0"  # xl: config_len = strlen(config) + 1
    optional = _U32.pack(len(body)) + body
    if len(optional) > MAX_XL_OPTIONAL_DATA_BYTES:
        raise ValueError(f"config of {len(body)} octets exceeds the xl optional data limit")
    flags = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2
    return _XL_HDR.pack(XL_SAVEFILE_MAGIC, XL_BYTEORDER_VALUE, flags, 0, len(optional)) + optional


def read_xl_header(recv_exact: Callable[[int], bytes], *,
                   max_optional_bytes: int = MAX_XL_OPTIONAL_DATA_BYTES,
                   truncation_errors: tuple[type[BaseException], ...] = (EOFError,)) -> XlHeader:
    """Read and check an xl save-file header and its optional data (bounded).

    Reads exactly ``48 + optional_data_len`` octets: the stream follows.

    Raises:
        StreamError: wrong magic (the message says what the file looks like instead), wrong
            byte order, unknown mandatory or optional flags (xl: "reject restore"), a
            libxl stream that is not v2, optional data over ``max_optional_bytes``, a
            config length that overruns it, a config that is not NUL-terminated JSON
            object text, or truncation.
    """
    src = ExactSource(recv_exact, None, truncation_errors)
    raw = src.read_exact(XL_HEADER_BYTES, "xl save-file header")
    magic, order, mandatory, optional, optlen = _XL_HDR.unpack(raw)
    if magic != XL_SAVEFILE_MAGIC:
        if magic.startswith(b"LibxlFmt"):
            what = "a bare libxl stream (no xl header)"
        elif magic.startswith(b"\xff" * 8):
            what = "a bare libxc stream (no xl header)"
        elif magic.startswith(b"vmem-migrate-v"):
            what = "a vmem migration stream"
        else:
            what = f"something else ({magic[:16]!r}...)"
        raise StreamError(f"not an xl save file: it starts with {what}", 0)
    if order != XL_BYTEORDER_VALUE:
        detail = " (big-endian file)" if order == 0x0403_0201 else ""
        raise StreamError(f"xl header byte order 0x{order:08x} is not 0x{XL_BYTEORDER_VALUE:08x}"
                          f"{detail}", 32)
    if mandatory & ~XL_MANDATORY_FLAGS_KNOWN:
        raise StreamError(f"xl header has unknown mandatory flags "
                          f"0x{mandatory & ~XL_MANDATORY_FLAGS_KNOWN:08x}", 36)
    if not mandatory & XL_MANDATORY_FLAG_STREAMV2:
        raise StreamError("xl header announces a legacy (pre-v2) stream; vmem reads "
                          "libxl stream v2 only", 36)
    if optional:
        raise StreamError(f"xl header has unknown optional flags 0x{optional:08x}", 40)
    if optlen > max_optional_bytes:
        raise StreamError(f"xl optional data length {optlen} exceeds the limit of "
                          f"{max_optional_bytes} octets", 44)
    config = None
    if optlen:
        data = src.read_exact(optlen, "xl optional data")
        if optlen < 4:
            raise StreamError(f"xl optional data of {optlen} octets cannot hold the config "
                              f"length", XL_HEADER_BYTES)
        (clen,) = _U32.unpack_from(data)
        if clen > optlen - 4:
            raise StreamError(f"xl config length {clen} overruns the optional data "
                              f"({optlen - 4} octets left)", XL_HEADER_BYTES)
        text = data[4:4 + clen]
        if clen and mandatory & XL_MANDATORY_FLAG_JSON:
            if text[-1:] != b"\0":
                raise StreamError("xl JSON config is not NUL-terminated", XL_HEADER_BYTES + 4)
            config = control.decode_json(text[:-1], XL_HEADER_BYTES + 4)
            if not isinstance(config, dict):
                raise StreamError(f"xl JSON config must be an object, not "
                                  f"{type(config).__name__}", XL_HEADER_BYTES + 4)
    return XlHeader(mandatory, optional, config, XL_HEADER_BYTES + optlen)


# ======================================================================================
# Helpers
# ======================================================================================


class _FileSink:
    """``send_parts`` onto a file descriptor: one ``writev`` per call, partial writes
    resumed.  Counts octets written."""

    def __init__(self, fd: int):
        self.fd = fd
        self.bytes_written = 0

    def send_parts(self, parts: list) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        views = [v for v in views if v.nbytes]
        while views:
            n = os.writev(self.fd, views[:1024])  # IOV_MAX
            self.bytes_written += n
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if n:
                views[0] = views[0][n:]


class _FileSource:
    """``recv_exact`` / ``recv_into`` over an unbuffered file; short only at end of file."""

    def __init__(self, f):
        self.f = f

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        got = self.recv_into(memoryview(buf))
        return bytes(buf) if got == n else bytes(buf[:got])

    def recv_into(self, view: memoryview) -> int:
        view = view.cast("B")
        got = 0
        while got < view.nbytes:
            n = self.f.readinto(view[got:])
            if not n:
                break
            got += n
        return got


def ram_digest(digests: np.ndarray) -> str:
    """The whole-RAM digest recorded in a save file: BLAKE2b-128 over the per-page XXH64
    digests (little-endian u64, one per page, holes = the zero page's digest)."""
    data = np.ascontiguousarray(digests, dtype="<u8")
    return _DIGEST_PREFIX + hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()


def _page_batches(pages: np.ndarray):
    for i in range(0, len(pages), MAX_PAGES_PER_RECORD):
        yield pages[i:i + MAX_PAGES_PER_RECORD]


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ======================================================================================
# Save
# ======================================================================================


def _context_digest(context: bytes) -> str:
    return _DIGEST_PREFIX + hashlib.blake2b(context, digest_size=16).hexdigest()


def _domain_config(guest, name: str, npages: int, counters: dict, data_pages: int,
                   digest: str, context: bytes, version: int) -> dict:
    memkb = npages * PAGE_SIZE // 1024
    return {
        # libxl_domain_config's shape, so that xl's tools can at least read the basics.
        "c_info": {"type": "hvm", "name": name},
        "b_info": {"max_vcpus": 1, "max_memkb": memkb, "target_memkb": memkb},
        "vmem": {
            "format": SAVEFILE_FORMAT,
            "backend": getattr(guest, "backend_name", "process"),
            "guest": guest.spec.to_json(),
            "npages": npages,
            "page_size": PAGE_SIZE,
            "data_pages": data_pages,
            "counters": counters,
            "ram_digest": digest,
            "context_digest": _context_digest(context),
            "stream_version": version,
            "saved_at_unix_s": round(time.time(), 3),
        },
    }


def save_guest(guest, path: str | os.PathLike, *, keep_running: bool = False,
               name: str | None = None, version: int = IHDR_VERSION_2,
               progress: Progress | None = None, fd: int | None = None) -> dict:
    """Save ``guest`` (a running :class:`vmem.migration.backend.SourceGuest`) to ``path``, like
    ``xl save``.

    Pauses the guest at its next safe point, writes every page that holds data (holes are
    left out: they restore as zero pages), the x86 HVM state records and the guest context,
    fsyncs and renames ``PATH.part`` to ``PATH``.  Then the guest exits (``xl save``), or
    with ``keep_running`` resumes (``xl save -c``).

    Args:
        name: the domain name recorded in the file (default ``vmem-WORKLOAD``).
        version: libxc image version, 2 or 3.
        progress: called as ``progress(pages_done, pages_total)`` after each record.
        fd: write into this open regular file instead (truncated first, fsynced, not
            closed; ``path`` only names it): whoever opened it owns its name -- the agent
            writes through a descriptor its caller opened as itself.  On failure it is
            truncated to nothing.

    Returns:
        stats: ``pages`` (pages with data written), ``guest_pages``, ``bytes`` (file
        size), ``seconds`` (pause request to durable rename), ``pause_ms``, ``write_s``
        (stream written to the page cache), ``fsync_s`` (file and directory fsync),
        ``gbps`` (GB/s of page data over ``seconds``),
        ``ram_digest``, ``counters`` (the guest's at the pause), ``path``.

    Raises:
        ValueError: bad ``version``.  OSError: the file could not be written.
        GuestError: the guest did not pause.  In every failure case no file (and no part
        file) is left, and a guest paused here is resumed.
    """
    if version not in IHDR_VERSIONS:
        raise ValueError(f"libxc image version must be one of {IHDR_VERSIONS}, not {version}")
    from vmem import _native as nat
    from vmem.pages import page_buffers, zero_page_digest
    from vmem.pages import runs_to_pages

    path = os.fspath(path)
    part = path + ".part"
    npages = int(guest.npages)
    name = name or f"vmem-{guest.spec.workload}"
    own_file = fd is None
    fd = -1 if own_file else fd
    paused = None
    t_start = time.monotonic()
    try:
        if own_file:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        else:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        paused = guest.pause()
        t_paused = time.monotonic()
        counters = guest.counters()
        ram = guest.ram
        pages = runs_to_pages(ram.data_runs())
        digests = np.full(npages, zero_page_digest(), dtype=np.uint64)

        # The header goes first with a placeholder digest of the final width; it is
        # rewritten in place once every page has been digested on its way out.
        config = _domain_config(guest, name, npages, counters, len(pages),
                                _PLACEHOLDER_DIGEST, paused.context, version)
        header = encode_xl_header(config)
        sink = _FileSink(fd)
        sink.send_parts([header])
        writer = stream.StreamWriter(sink.send_parts)
        writer.begin(version)
        staging = np.empty((MAX_PAGES_PER_RECORD, PAGE_SIZE), dtype=np.uint8)
        tmp = np.empty(MAX_PAGES_PER_RECORD, dtype=np.uint64)
        done = 0
        for batch in _page_batches(pages):
            nat.digest_pages(ram.address, batch, tmp)
            digests[batch] = tmp[:len(batch)]
            writer.page_data(batch, page_buffers(ram.pages, batch, staging))
            done += len(batch)
            if progress is not None:
                progress(done, len(pages))
        writer.x86_hvm_state(npages, elapsed_ns=int(counters.get("vclock_s", 0) * 1e9))
        writer.end_libxc()
        writer.emulator_context(paused.context)
        writer.end_libxl()

        digest = ram_digest(digests)
        config["vmem"]["ram_digest"] = digest
        final = encode_xl_header(config)
        if len(final) != len(header):  # pragma: no cover - fixed-width digest
            raise AssertionError("xl header changed size when the digest was filled in")
        os.pwrite(fd, final, 0)
        t_written = time.monotonic()
        os.fsync(fd)
        if own_file:
            os.close(fd)
            fd = -1
            os.rename(part, path)
            _fsync_dir(path)
        t_synced = time.monotonic()
    except BaseException:
        if not own_file:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
        else:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
        if paused is not None and guest.alive():
            try:
                guest.resume()
            except VmemError:
                pass  # the original error says more
        raise
    seconds = time.monotonic() - t_start
    stats = {
        "path": path,
        "pages": len(pages),
        "guest_pages": npages,
        "bytes": sink.bytes_written,
        "seconds": round(seconds, 6),
        "pause_ms": round((t_paused - t_start) * 1e3, 3),
        "write_s": round(t_written - t_paused, 6),
        "fsync_s": round(t_synced - t_written, 6),
        "gbps": round(len(pages) * PAGE_SIZE / max(seconds, 1e-9) / 1e9, 3),
        "ram_digest": digest,
        "counters": counters,
    }
    if keep_running:
        guest.resume()
    else:
        guest.exit()
    return stats


# ======================================================================================
# Restore
# ======================================================================================


def _vmem_section(config: dict | None, offset: int) -> dict:
    """Check the ``"vmem"`` config section; return what restore needs."""
    section = config.get("vmem") if isinstance(config, dict) else None
    if not isinstance(section, dict):
        raise StreamError("the save file's config has no \"vmem\" section: not saved by vmem "
                          "(a Xen guest's image cannot run as a vmem guest)", offset)
    try:
        fmt = int(section["format"])
        npages = int(section["npages"])
        page_size = int(section["page_size"])
        guest = dict(section["guest"])
        backend = str(section.get("backend", "process"))
        digest = str(section["ram_digest"])
        data_pages = int(section.get("data_pages", 0))
        context_digest = section.get("context_digest")
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise StreamError(f"the save file's vmem config is incomplete: {err!r}", offset) from err
    if fmt > SAVEFILE_FORMAT:
        raise StreamError(f"save file format {fmt} is newer than this vmem reads "
                          f"({SAVEFILE_FORMAT})", offset)
    if page_size != PAGE_SIZE:
        raise StreamError(f"page size {page_size} is not supported (only {PAGE_SIZE})", offset)
    if not 0 < npages <= PFN_MASK + 1:
        raise StreamError(f"guest size of {npages} pages is impossible", offset)
    counters = section.get("counters")
    return {"npages": npages, "guest": guest, "backend": backend, "digest": digest,
            "data_pages": data_pages, "context_digest": context_digest, "counters": counters if isinstance(counters, dict) else {}}


class RamPlacement:
    """Page payloads into an incoming guest's RAM memfd: the sink restore hands to
    :meth:`vmem.format.stream.StreamReader.read_page_payload` (and the stream fuzzer too).

    One staging buffer per record (4 MiB at most): ``recv_into`` straight from the source,
    XXH64 digests of the batch, then one ``pwrite`` per run of consecutive pfns (C).
    The pfns must lie inside RAM and ``digests``: the reader's ``max_pfn`` ensures it.

    Args:
        source: has ``recv_into(memoryview) -> int`` (octets received; fewer = the end).
        ram_fd: the RAM memfd.
        digests: per-page XXH64 digests, updated for every page placed.
    """

    def __init__(self, source, ram_fd: int, digests: np.ndarray):
        self.source = source
        self.fd = ram_fd
        self.digests = digests
        self.staging = np.empty((MAX_PAGES_PER_RECORD, PAGE_SIZE), dtype=np.uint8)
        self.tmp = np.empty(MAX_PAGES_PER_RECORD, dtype=np.uint64)
        self.pages = 0

    def __call__(self, pfns: np.ndarray, nbytes: int) -> None:
        from vmem import _native as nat

        n = len(pfns)
        buf = self.staging[:n]
        got = self.source.recv_into(memoryview(buf).cast("B"))
        if got != nbytes:
            raise EOFError(f"page data ends after {got} of {nbytes} octets")
        nat.digest_range(self.staging.ctypes.data, 0, n, self.tmp)
        pages = pfns.astype(np.int64, copy=False)
        self.digests[pages] = self.tmp[:n]
        nat.pwrite_pages(self.fd, buf, pages)
        self.pages += n


def _param_name(index: int) -> str:
    try:
        return HvmParam(index).name
    except ValueError:
        return str(index)


def _restore_error(path: str, err: StreamError) -> StreamError:
    out = StreamError(f"cannot restore {path}: {err}")
    out.offset = err.offset
    return out


def restore_guest(path: str | os.PathLike, *, name: str | None = None,
                  progress: Progress | None = None, fd: int | None = None) -> tuple[Any, dict]:
    """Restore a guest saved by :func:`save_guest` (or any vmem save file), like
    ``xl restore``.  The guest runs on from its saved context when this returns.

    Steps: check the xl header and the vmem config; pre-spawn an incoming guest of the
    saved size; read the whole stream with a bounded reader that demands the x86 HVM
    records (``require_hvm_state``) and no post-copy records; ``pwrite`` every page into
    the new RAM while digesting it; compare the whole-RAM digest with the one recorded at
    save; resume the guest from the EMULATOR_CONTEXT and wait for its first step.

    Args:
        name: the name to report (default: the one in the file).
        progress: ``progress(pages_done, pages_total)`` after each record.
        fd: read this open file from its start instead (``path`` only names it; not closed).

    Returns:
        ``(guest, stats)``: the running guest (caller owns it: ``exit()``/``close()``), and
        ``pages``, ``bytes``, ``seconds``, ``gbps``, ``ram_digest``, ``name``,
        ``saved_counters``, ``hvm_params``, ``path``.

    Raises:
        StreamError: the file is not a vmem save file, is malformed, truncated, has data
            after the libxl END, or its pages do not match the recorded digest; the
            message names the file and ``offset`` is the file offset.
        MigrationError: not enough memory, or the guest backend is unavailable here.
        GuestError: the guest failed to start or resume.
        OSError: the file cannot be read.
        No process or memfd is left behind when this raises.
    """
    from vmem.pages import zero_page_digest
    from vmem.ram import format_bytes, mem_available_bytes

    path = os.fspath(path)
    t_start = time.monotonic()
    guest = None
    with (os.fdopen(os.dup(fd), "rb", buffering=0) if fd is not None else open(path, "rb", buffering=0)) as f:
        f.seek(0)
        source = _FileSource(f)
        try:
            hdr = read_xl_header(source.recv_exact)
            section = _vmem_section(hdr.config, XL_HEADER_BYTES + 4)
            npages = section["npages"]
            need = npages * PAGE_SIZE
            if need > mem_available_bytes():
                raise MigrationError("setup", f"cannot restore a guest of {format_bytes(need)}: "
                                              f"only {format_bytes(mem_available_bytes())} available")
            try:
                factory = incoming_factory(section["backend"])
            except KeyError:
                raise MigrationError("setup", f"guest backend {section['backend']!r} is not "
                                              f"available on this host") from None
            guest = factory(section["guest"], npages)
            digests = np.full(npages, zero_page_digest(), dtype=np.uint64)
            placement = RamPlacement(source, guest.ram.fd, digests)
            reader = stream.StreamReader(source.recv_exact, max_pfn=npages - 1,
                                         allow_postcopy=False, require_hvm_state=True,
                                         base_offset=hdr.stream_offset)
            reader.read_begin()
            context = None
            total = section["data_pages"]
            while not reader.finished:
                rec = reader.next_record()
                if isinstance(rec, stream.PageData):
                    reader.read_page_payload(placement)
                    if progress is not None:
                        progress(placement.pages, total)
                elif rec.type is LibxlRecordType.EMULATOR_CONTEXT:
                    if context is not None:
                        raise StreamError("a second EMULATOR_CONTEXT record", rec.offset)
                    context = bytes(stream.parse_emulator_record(rec).data)
                elif rec.type is LibxlRecordType.EMULATOR_XENSTORE_DATA:
                    raise StreamError("EMULATOR_XENSTORE_DATA is not part of vmem save files",
                                      rec.offset)
            end = reader.offset
            if f.read(1):
                raise StreamError("data after the libxl END record (the file is longer than "
                                  "its stream)", end)
            if context is None:
                raise StreamError("the stream has no EMULATOR_CONTEXT (no guest context)", end)
            params = reader.hvm_params or {}
            inside = {_param_name(k): v for k, v in params.items()
                      if k in _PFN_PARAMS and v < npages}
            if inside:
                raise StreamError(f"HVM params point into guest RAM: {inside} (a restorer "
                                  f"would clear those pages)", hdr.stream_offset)
            if section["context_digest"] not in (None, _context_digest(context)):
                raise StreamError("the guest context does not match the save (EMULATOR_CONTEXT "
                                  "corrupt)", end)
            digest = ram_digest(digests)
            if digest != section["digest"]:
                raise StreamError(f"the restored RAM does not match the save: digest {digest}, "
                                  f"recorded {section['digest']} (page data corrupt)", end)
            guest.resume(context)
            guest.wait_first_step()
        except StreamError as err:
            if guest is not None:
                guest.close()
            raise _restore_error(path, err) from err
        except BaseException:
            if guest is not None:
                guest.close()
            raise
    seconds = time.monotonic() - t_start
    return guest, {
        "path": path,
        "name": name or (hdr.config or {}).get("c_info", {}).get("name"),
        "pages": placement.pages,
        "guest_pages": npages,
        "bytes": end,
        "seconds": round(seconds, 6),
        "gbps": round(placement.pages * PAGE_SIZE / max(seconds, 1e-9) / 1e9, 3),
        "ram_digest": digest,
        "saved_counters": section["counters"],
        "hvm_params": {_param_name(k): v for k, v in params.items()},
    }


def check_savefile(path: str | os.PathLike) -> dict:
    """Read a save file through without restoring it (no guest, 4 MiB of memory): header,
    config and stream checked as :func:`restore_guest` would, page data skipped.

    Returns a summary (records, pages, stream version, config); raises StreamError.
    """
    path = os.fspath(path)
    with open(path, "rb", buffering=0) as f:
        source = _FileSource(f)
        try:
            hdr = read_xl_header(source.recv_exact)
            section = _vmem_section(hdr.config, XL_HEADER_BYTES + 4)
            reader = stream.StreamReader(source.recv_exact, max_pfn=section["npages"] - 1,
                                         allow_postcopy=False, require_hvm_state=True,
                                         base_offset=hdr.stream_offset)
            info = reader.read_begin()
            pages = 0
            while not reader.finished:
                rec = reader.next_record()
                if isinstance(rec, stream.PageData):
                    pages += reader.skip_page_payload() // PAGE_SIZE
            if f.read(1):
                raise StreamError("data after the libxl END record", reader.offset)
        except StreamError as err:
            raise _restore_error(path, err) from err
    return {"path": path, "stream_version": info.version, "records": reader.records_read,
            "pages": pages, "bytes": reader.offset, "config": hdr.config}


# ======================================================================================
# python -m vmem.migration.savefile
# ======================================================================================


def _run_for(guest, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not guest.alive():
            raise guest.crash_error("run")
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def main(argv: list[str] | None = None) -> int:
    from vmem.ram import format_bytes, parse_size

    p = argparse.ArgumentParser(prog="python -m vmem.migration.savefile",
                                description="save a vmem guest to a file (xl save) or restore it (xl restore)")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save", help="boot a guest, let it run, save it to FILE")
    s.add_argument("file")
    s.add_argument("--workload", default="hotcold")
    s.add_argument("--size", default="256M")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--run", type=float, default=1.0, metavar="S", help="seconds to run before saving")
    s.add_argument("--stream-version", type=int, default=IHDR_VERSION_2, choices=IHDR_VERSIONS)
    r = sub.add_parser("restore", help="restore FILE, let it run, verify its RAM, stop it")
    r.add_argument("file")
    r.add_argument("--run", type=float, default=1.0, metavar="S", help="seconds to run after restoring")
    r.add_argument("--name")
    c = sub.add_parser("check", help="check FILE without restoring it")
    c.add_argument("file")
    args = p.parse_args(argv)
    try:
        if args.cmd == "save":
            size = parse_size(args.size)
            with boot_guest(GuestSpec(args.workload, {}, args.seed), size) as guest:
                _run_for(guest, args.run)
                st = save_guest(guest, args.file, version=args.stream_version)
            print(f"saved {st['pages']} pages ({format_bytes(st['bytes'])}) to {st['path']} in "
                  f"{st['seconds']:.3f} s ({st['gbps']:.2f} GB/s; write {st['write_s']:.3f} s, "
                  f"fsync {st['fsync_s']:.3f} s; guest paused after {st['pause_ms']:.1f} ms) "
                  f"at step {st['counters'].get('steps')}")
            print(f"ram digest {st['ram_digest']}")
        elif args.cmd == "restore":
            guest, st = restore_guest(args.file, name=args.name)
            with guest:
                print(f"restored {st['name']}: {st['pages']} pages ({format_bytes(st['bytes'])}) "
                      f"in {st['seconds']:.3f} s ({st['gbps']:.2f} GB/s), digest matches")
                _run_for(guest, args.run)
                now = guest.counters()
                check = guest.verify()
                saved = st["saved_counters"].get("steps", 0)
                print(f"guest ran from step {saved} to {now['steps']}; verify: "
                      f"{'ok' if check.get('ok') else check}")
                guest.exit()
                return 0 if check.get("ok") and now["steps"] >= saved else 1
        else:
            st = check_savefile(args.file)
            print(json.dumps({k: v for k, v in st.items() if k != "config"}, indent=1))
    except (VmemError, OSError) as err:
        print(f"vmem savefile: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
