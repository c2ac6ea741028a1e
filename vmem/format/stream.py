"""Xen migration stream v2/v3 framing: a pure encoder, a writer and a bounded reader.

The bytes, as Xen's libxl and libxc write them (all numbers little-endian except the two
headers marked BE; every record padded with zeros to a multiple of 8 octets)::

    offset  octets  field
    ------  ------  --------------------------------------------------------------------
         0      16  libxl header (BE)    u64 ident "LibxlFmt" | u32 version 2 | u32 options 0
        16       8  libxl record         u32 type LIBXC_CONTEXT (1) | u32 length 0
        24      24  libxc image hdr (BE) u64 marker ~0 | u32 id "XENF" | u32 version 2|3
                                         | u16 options 0 | u16 0 | u32 0
        48      16  libxc domain header  u32 type X86_HVM (2) | u16 page_shift 12 | u16 0
                                         | u32 xen_major | u32 xen_minor
        64       8  [v3] STATIC_DATA_END u32 type 0x10 | u32 length 0
         .       .  PAGE_DATA record     u32 type 1 | u32 length 8 + 8*C + 4096*N
                                         | u32 count C | u32 0 | u64 pfn[C] | N pages
         .       .  ... more PAGE_DATA (vmem post-copy records 0x564D00xx, later) ...
         .       8  libxc END            u32 type 0 | u32 length 0
         .       .  libxl EMULATOR_CONTEXT  u32 type 3 | u32 length 8 + L
                                         | u32 emulator_id | u32 index | L octets | pad
         .       8  libxl END            u32 type 0 | u32 length 0

    pfn[i]:  bit 63..60 PageType | bit 59..52 reserved (0) | bit 51..0 pfn
    N = number of pfns whose type carries data (all but BROKEN, XALLOC, XTAB)

The record frame is :mod:`vmem.format.frame`'s; the x86 HVM record bodies (TSC_INFO,
HVM_PARAMS, HVM_CONTEXT) are :mod:`vmem.format.hvm`'s; vmem's own control protocol and
preamble are :mod:`vmem.format.control`'s.  The constants are in :mod:`vmem.format.wire`,
the full pictures in ``docs/stream.md``.

Encoding is pure: functions return ``bytes`` or a list of buffers for vectored sends,
and page data is never copied (the writer hands the caller's page buffers on as they are).
Decoding is bounded: every length and count is checked against :mod:`vmem.format.wire`'s limits
before anything is read or allocated, and every problem raises
:class:`vmem.errors.StreamError` carrying the stream offset.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import io
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from vmem.errors import StreamError
from vmem.format.frame import RECORD_HEADER as _RHDR
from vmem.format.frame import Buffer, ExactSource, as_parts, buffer_nbytes, frame
from vmem.format.hvm import (
    HvmContextInfo,
    check_x86_tsc_info,
    host_cpuid_eax,
    hvm_context_blob,
    hvm_params_body,
    parse_hvm_context,
    parse_hvm_params,
    vmem_hvm_params,
    x86_tsc_info_body,
)
from vmem.format.wire import (
    DHDR_BYTES,
    MAX_HVM_PARAMS,
    TSC_MODE_DEFAULT,
    EMULATOR_HEADER_BYTES,
    HVM_PARAMS_ENTRY_BYTES,
    HVM_PARAMS_HEADER_BYTES,
    IHDR_BYTES,
    IHDR_ID,
    IHDR_MARKER,
    IHDR_OPT_BIG_ENDIAN,
    IHDR_OPT_RESERVED_MASK,
    IHDR_VERSION_2,
    IHDR_VERSION_3,
    IHDR_VERSIONS,
    LIBXL_HDR_BYTES,
    LIBXL_IDENT,
    LIBXL_OPT_BIG_ENDIAN,
    LIBXL_OPT_LEGACY,
    LIBXL_OPT_RESERVED_MASK,
    LIBXL_VERSION,
    MAX_EMULATOR_CONTEXT_BYTES,
    MAX_PAGE_DATA_BODY_BYTES,
    MAX_PAGES_PER_RECORD,
    MAX_RECORD_BODY_BYTES,
    PAGE_DATA_HEADER_BYTES,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGE_TYPE_HAS_DATA,
    PAGE_TYPE_KNOWN,
    PFN_MASK,
    PFN_RESERVED_MASK,
    PFN_TYPE_SHIFT,
    PV_ONLY_RECORD_TYPES,
    RECORD_HEADER_BYTES,
    REC_TYPE_OPTIONAL,
    STATIC_DATA_RECORD_TYPES,
    SUPPORTED_DOMAIN_TYPES,
    V3_RECORD_TYPES,
    VMEM_EMULATOR_ID,
    VMEM_RECORD_BASE,
    VMEM_RECORD_MASK,
    X86_CPUID_LEAF_BYTES,
    X86_MSR_ENTRY_BYTES,
    X86_TSC_INFO_BYTES,
    DomainType,
    EmulatorId,
    LibxcRecordType,
    LibxlRecordType,
    PostcopyRecordType,
    VmemRecordType,
)

__all__ = [
    # encoder
    "libxl_header", "libxc_context_record", "libxc_image_header", "domain_header",
    "record", "page_data_header", "static_data_end_record", "end_record",
    "libxl_end_record", "emulator_context_record", "rehearse_tail",
    # writer / reader
    "StreamWriter", "StreamReader", "StreamInfo", "Record", "PageData",
    "EmulatorRecord", "parse_emulator_record",
]

_LIBXL_HDR = struct.Struct(">QII")  # ident, version, options
_IHDR = struct.Struct(">QIIHHI")  # marker, id, version, options, reserved, reserved
_DHDR = struct.Struct("<IHHII")  # type, page_shift, reserved, xen_major, xen_minor
_U32_PAIR = struct.Struct("<II")  # PAGE_DATA count/reserved, emulator id/index

assert (_LIBXL_HDR.size, _IHDR.size, _DHDR.size) == (LIBXL_HDR_BYTES, IHDR_BYTES, DHDR_BYTES)

# Indexed by the 4-bit page type, so that 1024 pfns are classified by one fancy-index.
_TYPE_KNOWN = np.array(PAGE_TYPE_KNOWN, dtype=bool)
_TYPE_HAS_DATA = np.array(PAGE_TYPE_HAS_DATA, dtype=bool)

_LIBXC_TYPES = {int(t): t for t in LibxcRecordType}
# vmem's own records: post-copy's and the others (VmemRecordType); allow_postcopy gates all.
_POSTCOPY_TYPES = {int(t): t for t in (*PostcopyRecordType, *VmemRecordType)}
_POSTCOPY_ONLY = {int(t) for t in PostcopyRecordType}
_LIBXL_TYPES = {int(t): t for t in LibxlRecordType}
_EMULATOR_IDS = {int(e): e for e in EmulatorId}
_DOMAIN_TYPES = {int(t): t for t in DomainType}

_PAGE_DATA_TYPES = (LibxcRecordType.PAGE_DATA, PostcopyRecordType.PAGE_DATA)
_SKIP_CHUNK_BYTES = 1 << 20  # discard bodies in bounded chunks


def _raise_first(offset: int, checks: list[tuple[Any, int, str]]) -> None:
    """Raise StreamError for the first ``(violated, field_offset, message)`` whose
    ``violated`` is true, at ``offset + field_offset``: a header's checks in wire order."""
    for violated, field_offset, message in checks:
        if violated:
            raise StreamError(message, offset + field_offset)


def _record_name(rtype: enum.IntEnum) -> str:
    prefix = "POSTCOPY_" if isinstance(rtype, PostcopyRecordType) else ""
    return f"{prefix}{rtype.name}"


# The names the reader uses in its messages, made once: an enum member's name is a
# descriptor lookup, and the reader runs cold inside a stop-and-copy's downtime.
_RECORD_NAMES = {t: _record_name(t) for t in (*LibxcRecordType, *PostcopyRecordType, *VmemRecordType)}


# ======================================================================================
# Encoder: pure functions returning bytes or buffer lists
# ======================================================================================


def libxl_header() -> bytes:
    """The 16-octet libxl stream header: ``"LibxlFmt"``, version 2, options 0 (big-endian).

    Options 0 means a little-endian stream that was not converted from a legacy image.
    """
    return _LIBXL_HDR.pack(LIBXL_IDENT, LIBXL_VERSION, 0)


def libxc_context_record() -> bytes:
    """libxl's LIBXC_CONTEXT record (length 0): the libxc stream follows it directly."""
    return _RHDR.pack(LibxlRecordType.LIBXC_CONTEXT, 0)


def libxc_image_header(version: int = IHDR_VERSION_2) -> bytes:
    """The 24-octet libxc image header (big-endian), little-endian options.

    Raises:
        ValueError: ``version`` is not 2 or 3.
    """
    if version not in IHDR_VERSIONS:
        raise ValueError(f"libxc image version must be one of {IHDR_VERSIONS}, not {version}")
    return _IHDR.pack(IHDR_MARKER, IHDR_ID, version, 0, 0, 0)


def domain_header(domain_type: int = DomainType.X86_HVM, page_shift: int = PAGE_SHIFT,
                  xen_major: int = 4, xen_minor: int = 17) -> bytes:
    """The 16-octet libxc domain header (little-endian).

    The defaults describe what vmem writes: an x86 HVM domain (Xen saves PVH guests with
    this type too) with 4 KiB pages, "saved by Xen 4.17".  Any domain type and page shift
    encode; :class:`StreamReader` only accepts X86_HVM with page_shift 12.

    Raises:
        ValueError: a field does not fit its width.
    """
    if not (0 <= int(domain_type) <= 0xFFFF_FFFF and 0 <= page_shift <= 0xFFFF
            and 0 <= xen_major <= 0xFFFF_FFFF and 0 <= xen_minor <= 0xFFFF_FFFF):
        raise ValueError("domain header field out of range")
    return _DHDR.pack(int(domain_type), page_shift, 0, xen_major, xen_minor)


def record(type: int, body_parts: Buffer | Iterable[Buffer] = ()) -> list[Buffer]:
    """Frame one record: ``[header, *body_parts, zero padding]`` for a vectored send.

    The parts are not copied.  Works for libxc, libxl and vmem record types alike (they
    share the frame); ``type`` is written as given.

    Raises:
        ValueError: the body exceeds ``MAX_RECORD_BODY_BYTES`` (the reader would reject
            it), or a part is not a C-contiguous buffer.
    """
    parts = as_parts(body_parts)
    length = sum(buffer_nbytes(p) for p in parts)
    if length > MAX_RECORD_BODY_BYTES:
        raise ValueError(f"record body of {length} octets exceeds MAX_RECORD_BODY_BYTES "
                         f"({MAX_RECORD_BODY_BYTES})")
    return frame(type, parts, length)


def _fill_pfn_words(out: np.ndarray, pfns: np.ndarray | Iterable[int],
                    types: np.ndarray | int | None) -> int:
    """Write ``pfn | type << 60`` into ``out`` (a ``<u8`` array); return pages with data."""
    pfns = np.asarray(pfns)
    count = out.shape[0]
    if pfns.shape != (count,) or (count and pfns.dtype.kind not in "iu"):
        raise ValueError("pfns must be a 1-D array of integers")
    if count and (int(pfns.min()) < 0 or int(pfns.max()) > PFN_MASK):
        raise ValueError(f"pfns must lie in [0, 0x{PFN_MASK:x}] (52 bits)")
    np.copyto(out, pfns, casting="unsafe")  # values checked just above
    if types is None:
        return count  # all NOTAB (0): every page carries data
    types = np.asarray(types)
    if types.dtype.kind not in "iu":
        raise ValueError("page types must be integers")
    types = np.broadcast_to(types, (count,))
    if int(types.min()) < 0 or int(types.max()) > 0xF or not _TYPE_KNOWN[types].all():
        raise ValueError("unknown page type (see vmem.format.wire.PageType)")
    out |= types.astype(np.uint64) << np.uint64(PFN_TYPE_SHIFT)
    return int(_TYPE_HAS_DATA[types].sum())


def _check_count(count: int) -> None:
    if not 1 <= count <= MAX_PAGES_PER_RECORD:
        raise ValueError(f"a PAGE_DATA record holds 1..{MAX_PAGES_PER_RECORD} pages, not {count}")


def page_data_header(pfns: np.ndarray, types: np.ndarray | int | None = None) -> bytes:
    """The start of a PAGE_DATA body: ``u32 count, u32 reserved, u64 pfn[count]``.

    Built with numpy (no per-page Python).  Page data for every pfn whose type carries
    data follows this in the body, in pfn order.

    Args:
        pfns: 1-D integer array of page frame numbers (< 2**52), 1..1024 of them.
        types: per-pfn :class:`~vmem.format.wire.PageType` values (array or one scalar for all);
            ``None`` means NOTAB (ordinary pages).

    Raises:
        ValueError: count out of range, a pfn beyond 52 bits, or an unknown page type.
    """
    count = int(np.asarray(pfns).size)
    _check_count(count)
    words = np.zeros(1 + count, dtype="<u8")
    words[0] = count  # u32 count, then u32 reserved = 0: one little-endian u64
    _fill_pfn_words(words[1:], pfns, types)
    return words.tobytes()


def static_data_end_record() -> bytes:
    """libxc STATIC_DATA_END (v3 only, length 0)."""
    return _RHDR.pack(LibxcRecordType.STATIC_DATA_END, 0)


def end_record() -> bytes:
    """libxc END (length 0).  Byte-identical to :func:`libxl_end_record`; the layer differs."""
    return _RHDR.pack(LibxcRecordType.END, 0)


def libxl_end_record() -> bytes:
    """libxl END (length 0): the last record of the whole stream."""
    return _RHDR.pack(LibxlRecordType.END, 0)


def emulator_context_record(data: Buffer, emulator_id: int = VMEM_EMULATOR_ID,
                            index: int = 0) -> list[Buffer]:
    """libxl EMULATOR_CONTEXT: ``u32 emulator_id, u32 index, data``, padded; ``data`` not copied.

    Raises:
        ValueError: ``data`` exceeds ``MAX_EMULATOR_CONTEXT_BYTES``, the emulator id is not
            one Xen defines (Xen's verifier rejects others), or ``index`` exceeds 32 bits.
    """
    if int(emulator_id) not in _EMULATOR_IDS:
        raise ValueError(f"emulator id {emulator_id} is not a vmem.format.wire.EmulatorId")
    if not 0 <= index <= 0xFFFF_FFFF:
        raise ValueError(f"emulator index {index} does not fit 32 bits")
    size = buffer_nbytes(data)
    if size > MAX_EMULATOR_CONTEXT_BYTES:
        raise ValueError(f"emulator context of {size} octets exceeds "
                         f"MAX_EMULATOR_CONTEXT_BYTES ({MAX_EMULATOR_CONTEXT_BYTES})")
    return record(LibxlRecordType.EMULATOR_CONTEXT,
                  [_U32_PAIR.pack(int(emulator_id), index), data])



# ======================================================================================
# Writer
# ======================================================================================


class _Phase(enum.Enum):
    """Where a writer or reader is in the nested stream."""

    START = "before the headers"
    LIBXC = "in the libxc stream"
    LIBXL = "in the libxl records after libxc END"
    DONE = "after libxl END"


@functools.lru_cache(maxsize=8)
def _hvm_params_record(npages: int) -> bytes:
    """The HVM_PARAMS record (header, body, padding) vmem writes for ``npages``: a pure
    function of it, so built once per process (it ran cold inside the downtime, ~0.07 ms with
    HVM_CONTEXT's).  Raises ValueError as :func:`vmem_hvm_params` does (not cached)."""
    return b"".join(bytes(memoryview(p).cast("B")) for p in record(LibxcRecordType.HVM_PARAMS,
                                                                  hvm_params_body(vmem_hvm_params(npages))))


@functools.lru_cache(maxsize=8)
def _hvm_context_record(tsc_khz: int) -> bytes:
    """The HVM_CONTEXT record for ``tsc_khz`` (this host's CPUID signature, read once per
    process): built once per process, as :func:`_hvm_params_record`."""
    return b"".join(bytes(memoryview(p).cast("B")) for p in record(LibxcRecordType.HVM_CONTEXT,
                                                                  hvm_context_blob(gtsc_khz=tsc_khz)))


def _x86_hvm_state_parts(npages: int, elapsed_ns: int, tsc_khz: int) -> list[Buffer]:
    """X86_TSC_INFO, HVM_PARAMS, HVM_CONTEXT as send parts, in the spec's order."""
    return [*record(LibxcRecordType.X86_TSC_INFO, x86_tsc_info_body(TSC_MODE_DEFAULT, tsc_khz, elapsed_ns, 0)),
            _hvm_params_record(int(npages)), _hvm_context_record(int(tsc_khz))]


class StreamWriter:
    """Writes one libxl-wrapped libxc stream through ``send_parts(list_of_buffers)``.

    Each method sends whole records in a single ``send_parts`` call (the transport's
    ``Channel.send_parts``, a vectored send).  Page buffers are passed on uncopied, so
    they must stay unchanged until ``send_parts`` returns.

    Guarantees: the writer only emits what :class:`StreamReader` accepts and, for streams
    without vmem records, what Xen's ``verify-stream-v2`` accepts (v2).  In a v3 stream it
    emits STATIC_DATA_END before the first memory/register record if the caller has not.
    If ``send_parts`` raises, some, all or none of that call's records may have gone
    out; the error is re-raised and every later call raises ``RuntimeError``.

    Counters (updated only after ``send_parts`` returned):
        bytes_written: octets handed to ``send_parts``, headers included.
        records_written: records of both layers written (the two headers are not records).
        pages_written: pages whose 4 KiB of data went out in PAGE_DATA records.
    """

    def __init__(self, send_parts: Callable[[list[Buffer]], Any], *,
                 domain_type: DomainType = DomainType.X86_HVM,
                 xen_major: int = 4, xen_minor: int = 17):
        if domain_type not in SUPPORTED_DOMAIN_TYPES:
            raise ValueError(f"vmem writes {sorted(t.name for t in SUPPORTED_DOMAIN_TYPES)} "
                             f"streams, not {DomainType(domain_type).name}")
        self._send_parts = send_parts
        self._domain_header = domain_header(domain_type, PAGE_SHIFT, xen_major, xen_minor)
        # HVM_CONTEXT carries the host's CPUID signature, read from /proc/cpuinfo once per
        # process (~0.2 ms): read it now, not in x86_hvm_state, which runs in the downtime.
        host_cpuid_eax()
        self._phase = _Phase.START
        self._static_data_done = False
        self._hvm_context_sent = False
        self._failed: BaseException | None = None
        self.version: int | None = None
        """libxc image version chosen by :meth:`begin`."""
        self.bytes_written = 0
        self.records_written = 0
        self.pages_written = 0

    @property
    def finished(self) -> bool:
        """True once :meth:`end_libxl` has been sent."""
        return self._phase is _Phase.DONE

    # -- internals ---------------------------------------------------------------------

    def _expect(self, phase: _Phase, what: str) -> None:
        if self._failed is not None:
            raise RuntimeError("StreamWriter is unusable: an earlier send failed") from self._failed
        if self._phase is not phase:
            raise RuntimeError(f"StreamWriter.{what}() is only valid {phase.value}; "
                               f"the writer is {self._phase.value}")

    def _send(self, parts: list[Buffer], records: int, pages: int = 0) -> None:
        nbytes = sum(buffer_nbytes(p) for p in parts)
        try:
            self._send_parts(parts)
        except BaseException as err:
            self._failed = err
            raise
        self.bytes_written += nbytes
        self.records_written += records
        self.pages_written += pages

    def _static_prefix(self) -> list[Buffer]:
        # v3 mandates STATIC_DATA_END ahead of any memory/register content.
        if self.version == IHDR_VERSION_3 and not self._static_data_done:
            self._static_data_done = True
            return [static_data_end_record()]
        return []

    # -- libxc layer -------------------------------------------------------------------

    def begin(self, version: int = IHDR_VERSION_2) -> None:
        """Send libxl header, LIBXC_CONTEXT, libxc image header and domain header (64 octets).

        Version 2 (default) is what Xen's ``verify-stream-v2`` checks; version 3 adds
        STATIC_DATA_END and is what Xen >= 4.14 writes.  Both restore on Xen 4.17.
        """
        self._expect(_Phase.START, "begin")
        if version not in IHDR_VERSIONS:
            raise ValueError(f"libxc image version must be one of {IHDR_VERSIONS}, not {version}")
        self.version = version
        head = libxl_header() + libxc_context_record() + libxc_image_header(version) \
            + self._domain_header
        self._send([head], records=1)
        self._phase = _Phase.LIBXC

    def static_data_end(self) -> None:
        """Send STATIC_DATA_END now (v3 only; otherwise sent automatically when needed)."""
        self._expect(_Phase.LIBXC, "static_data_end")
        if self.version != IHDR_VERSION_3:
            raise ValueError("STATIC_DATA_END does not exist in stream version 2")
        if self._static_data_done:
            raise RuntimeError("STATIC_DATA_END was already sent")
        self._static_data_done = True
        self._send([static_data_end_record()], records=1)

    def page_data(self, pfns: np.ndarray, page_buffers: Buffer | Iterable[Buffer],
                  types: np.ndarray | int | None = None, *,
                  record_type: LibxcRecordType | PostcopyRecordType = LibxcRecordType.PAGE_DATA,
                  ) -> None:
        """Send one PAGE_DATA record without copying the pages.

        Args:
            pfns: 1-D integer array of 1..1024 page frame numbers.
            page_buffers: buffers (e.g. row ranges of the RAM array) whose concatenation
                is the data of every pfn whose type carries data, in pfn order; their total
                length must be ``4096 * npages_with_data``.  Passed on uncopied.
            types: per-pfn :class:`~vmem.format.wire.PageType` (array or scalar); None = NOTAB.
            record_type: PAGE_DATA, or vmem's ``PostcopyRecordType.PAGE_DATA`` (same body).

        Raises:
            ValueError: bad count/pfn/type, or the buffers' total length does not match.
        """
        self._expect(_Phase.LIBXC, "page_data")
        if record_type not in _PAGE_DATA_TYPES:
            raise ValueError(f"record_type must be one of {_PAGE_DATA_TYPES}")
        count = int(np.asarray(pfns).size)
        _check_count(count)
        buffers = as_parts(page_buffers)
        payload = sum(buffer_nbytes(b) for b in buffers)
        # One array holds the record header, count/reserved and the pfn words.
        head = np.zeros(2 + count, dtype="<u8")
        npages = _fill_pfn_words(head[2:], pfns, types)
        if payload != npages * PAGE_SIZE:
            raise ValueError(f"page buffers hold {payload} octets; {npages} pages with data "
                             f"need {npages * PAGE_SIZE}")
        length = PAGE_DATA_HEADER_BYTES + 8 * count + payload  # a multiple of 8: no padding
        head[0] = int(record_type) | (length << 32)  # u32 type, u32 length, little-endian
        head[1] = count  # u32 count, u32 reserved 0
        prefix = self._static_prefix()
        self._send([*prefix, memoryview(head).cast("B"), *buffers],
                   records=1 + len(prefix), pages=npages)

    def write_record(self, type: int, body_parts: Buffer | Iterable[Buffer] = ()) -> None:
        """Send any other record of the current layer (e.g. HVM_PARAMS, a post-copy record,
        EMULATOR_XENSTORE_DATA).  Checks the type and the length limit; the body's content
        is the caller's.

        Raises:
            ValueError: the type is unknown, has its own method (END, PAGE_DATA,
                STATIC_DATA_END, LIBXC_CONTEXT, EMULATOR_CONTEXT), does not exist in this
                stream version, belongs to PV or checkpointed streams, or is static data
                after STATIC_DATA_END; or the body is too long.
        """
        if self._phase is _Phase.LIBXL:
            rtype = _LIBXL_TYPES.get(int(type))
            if rtype is not LibxlRecordType.EMULATOR_XENSTORE_DATA:
                raise ValueError(f"write_record() in the libxl layer sends "
                                 f"EMULATOR_XENSTORE_DATA only, not {type!r}")
            self._expect(_Phase.LIBXL, "write_record")
            self._send(record(rtype, body_parts), records=1)
            return
        self._expect(_Phase.LIBXC, "write_record")
        rtype = _LIBXC_TYPES.get(int(type))
        if rtype is None:
            rtype = _POSTCOPY_TYPES.get(int(type))
        if rtype is None:
            raise ValueError(f"unknown libxc record type {type!r}")
        if rtype in (LibxcRecordType.END, LibxcRecordType.PAGE_DATA,
                     LibxcRecordType.STATIC_DATA_END, PostcopyRecordType.PAGE_DATA):
            raise ValueError(f"use the dedicated StreamWriter method for {rtype.name}")
        if rtype in V3_RECORD_TYPES and self.version != IHDR_VERSION_3:
            raise ValueError(f"{rtype.name} does not exist in stream version {self.version}")
        if rtype in PV_ONLY_RECORD_TYPES or rtype in _UNSUPPORTED_LIBXC:
            raise ValueError(f"{rtype.name} records are not part of vmem streams")
        self._check_hvm_order(rtype)
        if rtype in STATIC_DATA_RECORD_TYPES:
            if self._static_data_done:
                raise ValueError(f"{rtype.name} must precede STATIC_DATA_END")
            prefix = []
        else:
            prefix = self._static_prefix()
        self._send([*prefix, *record(rtype, body_parts)], records=1 + len(prefix))
        if rtype is LibxcRecordType.HVM_CONTEXT:
            self._hvm_context_sent = True

    def _check_hvm_order(self, rtype) -> None:
        # Spec: "HVM_PARAMS must precede HVM_CONTEXT"; libxc applies one context.
        if rtype is LibxcRecordType.HVM_CONTEXT and self._hvm_context_sent:
            raise ValueError("HVM_CONTEXT was already sent (a stream carries one)")
        if rtype is LibxcRecordType.HVM_PARAMS and self._hvm_context_sent:
            raise ValueError("HVM_PARAMS must precede HVM_CONTEXT (spec: parameters can "
                             "affect the validity of the context)")

    # -- x86 HVM state -----------------------------------------------------------------

    def x86_tsc_info(self, *, mode: int = TSC_MODE_DEFAULT, khz: int = 0, nsec: int = 0,
                     incarnation: int = 0) -> None:
        """Send X86_TSC_INFO (see :func:`x86_tsc_info_body`)."""
        self.write_record(LibxcRecordType.X86_TSC_INFO,
                          x86_tsc_info_body(mode, khz, nsec, incarnation))

    def hvm_params(self, params: Mapping[int, int]) -> None:
        """Send HVM_PARAMS with ``params`` (``{HvmParam: value}``); before HVM_CONTEXT.

        Raises:
            ValueError: too many params, or HVM_CONTEXT was already sent.
        """
        self.write_record(LibxcRecordType.HVM_PARAMS, hvm_params_body(params))

    def hvm_context(self, blob: Buffer | None = None) -> None:
        """Send HVM_CONTEXT: ``blob`` (an hvm save blob), by default :func:`hvm_context_blob`.

        Raises:
            ValueError: a second HVM_CONTEXT, or an empty blob.
        """
        blob = hvm_context_blob() if blob is None else blob
        if not buffer_nbytes(blob):
            raise ValueError("HVM_CONTEXT must not be empty")
        self.write_record(LibxcRecordType.HVM_CONTEXT, blob)

    def x86_hvm_state(self, npages: int, *, elapsed_ns: int = 0, tsc_khz: int = 0) -> None:
        """Send the x86 HVM state records in the spec's order, in one ``send_parts`` call:
        X86_TSC_INFO, HVM_PARAMS (:func:`vmem_hvm_params` for ``npages``), HVM_CONTEXT
        (:func:`hvm_context_blob`).  Call it once, after the last PAGE_DATA and before
        :meth:`end_libxc`.  ~200 octets; no system call besides the send.

        Args:
            npages: pages of guest RAM (decides where the special pages lie).
            elapsed_ns: the guest's elapsed (virtual) time, TSC_INFO's ``nsec``.
            tsc_khz: guest TSC frequency for TSC_INFO and the HVM header; 0 = the host's.

        Raises:
            ValueError: HVM_PARAMS or HVM_CONTEXT was already sent, or bad npages.
        """
        self._expect(_Phase.LIBXC, "x86_hvm_state")
        self._check_hvm_order(LibxcRecordType.HVM_PARAMS)
        state = _x86_hvm_state_parts(npages, elapsed_ns, tsc_khz)  # built first: a ValueError leaves the writer untouched
        prefix = self._static_prefix()
        self._send([*prefix, *state], records=3 + len(prefix))
        self._hvm_context_sent = True

    def end_of_stream(self, npages: int, context: Buffer, *, elapsed_ns: int = 0, tsc_khz: int = 0,
                      emulator_id: int = VMEM_EMULATOR_ID, index: int = 0) -> None:
        """Send the stream's tail in one ``send_parts`` call: :meth:`x86_hvm_state`,
        :meth:`end_libxc`, :meth:`emulator_context` and :meth:`end_libxl`, the same bytes as
        those four calls make.  Call it once, after the last PAGE_DATA.

        Why one call: in a stop-and-copy each send woke the destination, which read what had
        arrived and slept again before the next (the two processes alternating on one CPU:
        a unix socket's wake-up is a sync one); one send is read in one go.  HVM_PARAMS and
        HVM_CONTEXT depend only on ``npages`` and ``tsc_khz`` and are built once per process
        (:func:`rehearse_tail` builds them ahead of a pause).

        Raises:
            ValueError: HVM_PARAMS or HVM_CONTEXT was already sent, bad ``npages``, or
                ``context`` / ``emulator_id`` / ``index`` as :meth:`emulator_context` refuses
                them -- raised before anything is sent.
        """
        self._expect(_Phase.LIBXC, "end_of_stream")
        self._check_hvm_order(LibxcRecordType.HVM_PARAMS)
        state = _x86_hvm_state_parts(npages, elapsed_ns, tsc_khz)
        emulator = emulator_context_record(context, emulator_id, index)
        prefix = self._static_prefix()
        self._send([*prefix, *state, end_record(), *emulator, libxl_end_record()], records=6 + len(prefix))
        self._hvm_context_sent = True
        self._phase = _Phase.DONE

    def end_libxc(self) -> None:
        """Send libxc END; the libxl layer continues (emulator context, libxl END)."""
        self._expect(_Phase.LIBXC, "end_libxc")
        prefix = self._static_prefix()
        self._send([*prefix, end_record()], records=1 + len(prefix))
        self._phase = _Phase.LIBXL

    # -- libxl layer -------------------------------------------------------------------

    def emulator_context(self, data: Buffer, emulator_id: int = VMEM_EMULATOR_ID,
                         index: int = 0) -> None:
        """Send the guest context as a libxl EMULATOR_CONTEXT record (after end_libxc)."""
        self._expect(_Phase.LIBXL, "emulator_context")
        self._send(emulator_context_record(data, emulator_id, index), records=1)

    def end_libxl(self) -> None:
        """Send libxl END: the stream is complete."""
        self._expect(_Phase.LIBXL, "end_libxl")
        self._send([libxl_end_record()], records=1)
        self._phase = _Phase.DONE


# Records vmem neither writes nor reads: deprecated, or only meaningful in checkpointed
# (Remus/COLO) streams, which vmem does not implement.
_UNSUPPORTED_LIBXC = {
    LibxcRecordType.TOOLSTACK: "TOOLSTACK is deprecated by the spec (\"should not be used\")",
    LibxcRecordType.CHECKPOINT: "checkpointed (Remus/COLO) streams are unsupported",
    LibxcRecordType.CHECKPOINT_DIRTY_PFN_LIST:
        "CHECKPOINT_DIRTY_PFN_LIST belongs to the COLO back channel",
}



# ======================================================================================
# Reader
# ======================================================================================


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """What :meth:`StreamReader.read_begin` found in the headers."""

    version: int
    """libxc image version: 2 or 3."""
    domain_type: DomainType
    page_shift: int
    xen_major: int
    """0 means "converted from a legacy image" (then xen_minor is the converter's version)."""
    xen_minor: int
    libxl_version: int = LIBXL_VERSION
    legacy: bool = False
    """libxl options bit 1: the stream was produced by Xen's legacy conversion tool."""

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift


@dataclass(frozen=True, slots=True)
class Record:
    """One non-page record.

    Caution: libxc and libxl numbers overlap (both ENDs are 0; libxc PAGE_DATA and libxl
    LIBXC_CONTEXT are 1) and IntEnums of different classes compare equal by value.
    Compare with ``is`` (``rec.type is LibxlRecordType.END``) or check :attr:`layer`.
    """

    type: LibxcRecordType | LibxlRecordType | PostcopyRecordType
    body: bytes
    """The body without padding (length as on the wire)."""
    offset: int = -1
    """Stream offset of the record header."""

    @property
    def layer(self) -> str:
        """``"libxl"`` or ``"libxc"`` (vmem post-copy records travel in the libxc layer)."""
        return "libxl" if isinstance(self.type, LibxlRecordType) else "libxc"


@dataclass(frozen=True, slots=True)
class PageData:
    """The header of a PAGE_DATA (or post-copy PAGE_DATA) record, payload not yet read.

    The caller must next call one of :meth:`StreamReader.read_page_payload` (what the
    destination and restore use: their sink receives straight into staging and places
    the pages), :meth:`~StreamReader.read_page_payload_into` or
    :meth:`~StreamReader.skip_page_payload` (even when ``npages_with_data`` is 0).
    """

    count: int
    pfns: np.ndarray
    """uint64 page frame numbers, type bits stripped, in record order."""
    types: np.ndarray
    """uint8 :class:`~vmem.format.wire.PageType` per pfn."""
    npages_with_data: int
    """Pages whose 4096 octets follow (all but BROKEN/XALLOC/XTAB)."""
    type: LibxcRecordType | PostcopyRecordType = LibxcRecordType.PAGE_DATA
    offset: int = -1
    """Stream offset of the record header."""

    @property
    def payload_bytes(self) -> int:
        return self.npages_with_data * PAGE_SIZE

    @property
    def pfns_with_data(self) -> np.ndarray:
        """The pfns whose data is in the payload, in payload order."""
        return self.pfns[_TYPE_HAS_DATA[self.types]]


@dataclass(frozen=True, slots=True)
class EmulatorRecord:
    """The parts of an EMULATOR_CONTEXT / EMULATOR_XENSTORE_DATA record."""

    emulator_id: EmulatorId
    index: int
    data: memoryview
    """The emulator's blob (a view of the record body, not a copy)."""


def parse_emulator_record(rec: Record) -> EmulatorRecord:
    """Split an EMULATOR_* record (as returned by :meth:`StreamReader.next_record`).

    Raises:
        StreamError: not an emulator record, too short, or an unknown emulator id.
    """
    if rec.type not in (LibxlRecordType.EMULATOR_CONTEXT,
                        LibxlRecordType.EMULATOR_XENSTORE_DATA) or rec.layer != "libxl":
        raise StreamError(f"{rec.type!r} is not a libxl emulator record", rec.offset)
    if len(rec.body) < EMULATOR_HEADER_BYTES:
        raise StreamError("emulator record too short to hold its 8-octet header", rec.offset)
    emu_id, index = _U32_PAIR.unpack_from(rec.body)
    if emu_id not in _EMULATOR_IDS:
        raise StreamError(f"unknown emulator id 0x{emu_id:08x}", rec.offset + RECORD_HEADER_BYTES)
    return EmulatorRecord(_EMULATOR_IDS[emu_id], index,
                          memoryview(rec.body)[EMULATOR_HEADER_BYTES:])


@dataclass(slots=True)
class _PendingPayload:
    pfns_with_data: np.ndarray
    nbytes: int
    record_offset: int


class StreamReader(ExactSource):
    """Bounded decoder of a libxl-wrapped libxc stream.

    Args:
        recv_exact: ``recv_exact(n) -> bytes`` returning exactly ``n`` octets (the
            transport's ``Channel.recv_exact``).  A shorter result counts as truncation.
        recv_into: ``recv_into(memoryview)`` filling the whole view (``Channel.recv_into``);
            if it returns an int, that is the count received.  Used for page payloads;
            if None, payloads go through ``recv_exact`` and a copy.
        max_pfn: largest pfn accepted, inclusive (e.g. guest pages - 1); None = 52 bits.
        allow_postcopy: accept vmem's post-copy records (0x564D00xx) in the libxc layer.
        require_hvm_state: demand what restoring an x86 HVM image needs: HVM_PARAMS and
            HVM_CONTEXT before the libxc END (libxc fails without the context), the
            context a well-formed hvm save blob (:func:`parse_hvm_context`).  Off by
            default: streams of older vmem versions carry neither.  Whatever the setting,
            HVM_PARAMS after HVM_CONTEXT and a second HVM_CONTEXT are errors (spec order).
        xen_record_order: accept HVM_PARAMS after HVM_CONTEXT, the order Xen 4.17's
            libxc really writes (``vmem inspect`` of ``xl save`` files).
        base_offset: added to every offset reported (:attr:`offset`, StreamError.offset).
        truncation_errors: exceptions from the callables that mean "the stream ended"
            (e.g. the transport's broken-channel error); reported as StreamError.
            Other exceptions propagate unchanged.
        recv_some: ``Channel.recv_some``, for :meth:`read_ahead` (see
            :class:`~vmem.format.frame.ExactSource`).  With octets read ahead, a page
            payload must be read with :meth:`read_page_payload_into` (a sink reads from the
            source itself).

    Call :meth:`read_begin` once, then :meth:`next_record` until :attr:`finished`.

    Guarantees: every length and count from the wire is checked against the limits in
    :mod:`vmem.format.wire` before anything is read or allocated: at most
    ``MAX_RECORD_BODY_BYTES`` octets are requested at once, page payloads go only into
    the caller's memory.  Everything wrong with the stream raises
    :class:`~vmem.errors.StreamError` with :attr:`offset` information; calling methods
    in the wrong order raises ``RuntimeError``.  After any error the reader is unusable
    (the error is sticky): later calls raise StreamError.  Reserved fields and padding
    must be zero: the spec lets a restorer ignore them, but vmem is the only writer of
    what it reads, so non-zero octets there mean corruption (Xen's verifier agrees).
    Unknown *optional* libxc records (bit 31 set) are skipped, as the spec allows.
    """

    def __init__(self, recv_exact: Callable[[int], bytes],
                 recv_into: Callable[[memoryview], Any] | None = None, *,
                 max_pfn: int | None = None, allow_postcopy: bool = True,
                 require_hvm_state: bool = False, base_offset: int = 0,
                 truncation_errors: tuple[type[BaseException], ...] = (EOFError,),
                 xen_record_order: bool = False, recv_some: Callable[[int], bytes] | None = None):
        super().__init__(recv_exact, recv_into, truncation_errors, base_offset, recv_some)
        # Xen 4.17's libxc writes HVM_PARAMS *after* HVM_CONTEXT (x86_hvm_end_of_checkpoint),
        # against the spec's text; reading a real ``xl save`` file needs this leniency.
        self._xen_record_order = xen_record_order
        self._max_pfn = PFN_MASK if max_pfn is None else int(max_pfn)
        self._allow_postcopy = allow_postcopy
        self._require_hvm_state = require_hvm_state
        self.hvm_params: dict[int, int] | None = None
        """The HVM_PARAMS read so far (``{index: value}``), None before the record."""
        self.hvm_context: HvmContextInfo | None = None
        """The parsed HVM_CONTEXT (with ``require_hvm_state``), None before the record."""
        self._hvm_context_seen = False
        self._phase = _Phase.START
        self._static_data_seen = False
        self._pending: _PendingPayload | None = None
        self._failed: BaseException | None = None
        self._legacy = False
        self.info: StreamInfo | None = None
        """Set by :meth:`read_begin`."""
        self.records_read = 0
        """Records of both layers returned so far (LIBXC_CONTEXT included)."""
        self.optional_records_skipped = 0
        """Unknown optional libxc records skipped (spec: they may be ignored)."""

    @property
    def finished(self) -> bool:
        """True once the libxl END record has been read."""
        return self._phase is _Phase.DONE

    # -- error discipline ---------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StreamError(f"stream reader is unusable after an earlier error: "
                              f"{self._failed}", self.offset) from self._failed

    @contextlib.contextmanager
    def _sticky(self):
        self._check_usable()
        try:
            yield
        except BaseException as err:
            self._failed = err
            raise

    # -- headers -----------------------------------------------------------------------

    def read_begin(self) -> StreamInfo:
        """Read and validate libxl header, LIBXC_CONTEXT, libxc image and domain headers.

        Raises:
            StreamError: bad ident/marker/id, unsupported version, endianness, domain type
                or page size, reserved bits set, a first record other than LIBXC_CONTEXT,
                or truncation.
        """
        if self._phase is not _Phase.START:
            raise RuntimeError("StreamReader.read_begin() may be called only once")
        with self._sticky():
            self._read_libxl_header()
            off = self.offset
            rtype, length = _RHDR.unpack(self.read_exact(RECORD_HEADER_BYTES, "record header"))
            if rtype != LibxlRecordType.LIBXC_CONTEXT:
                name = _LIBXL_TYPES[rtype].name if rtype in _LIBXL_TYPES else f"0x{rtype:08x}"
                raise StreamError(f"record out of order: the libxl stream must start with "
                                  f"LIBXC_CONTEXT, found {name}", off)
            if length != 0:
                raise StreamError(f"LIBXC_CONTEXT must have length 0, not {length}", off)
            self.records_read += 1
            version = self._read_image_header()
            self.info = self._read_domain_header(version, self._legacy)
            self._phase = _Phase.LIBXC
            return self.info

    def _read_libxl_header(self) -> None:
        off = self.offset
        ident, version, options = _LIBXL_HDR.unpack(self.read_exact(LIBXL_HDR_BYTES, "libxl header"))
        _raise_first(off, [
            (ident != LIBXL_IDENT, 0, f"bad libxl header ident 0x{ident:016x}: expected "
                                      f"0x{LIBXL_IDENT:016x} (\"LibxlFmt\")"),
            (version != LIBXL_VERSION, 8, f"unsupported libxl stream version {version}: vmem "
                                          f"reads version {LIBXL_VERSION}"),
            (options & LIBXL_OPT_RESERVED_MASK, 12,
             f"reserved bits set in libxl header options: 0x{options:08x}"),
            (options & LIBXL_OPT_BIG_ENDIAN, 12, "big-endian libxl streams are unsupported"),
        ])
        self._legacy = bool(options & LIBXL_OPT_LEGACY)

    def _read_image_header(self) -> int:
        off = self.offset
        marker, ident, version, options, res1, res2 = _IHDR.unpack(
            self.read_exact(IHDR_BYTES, "libxc image header"))
        _raise_first(off, [
            (marker != IHDR_MARKER, 0, f"bad libxc image marker 0x{marker:016x}: expected "
                                       f"0x{IHDR_MARKER:016x} (a zero bit means a legacy image)"),
            (ident != IHDR_ID, 8, f"bad libxc image id 0x{ident:08x}: expected "
                                  f"0x{IHDR_ID:08x} (\"XENF\")"),
            (version not in IHDR_VERSIONS, 12, f"unsupported libxc image version {version}: vmem "
                                               f"reads versions {IHDR_VERSIONS}"),
            (options & IHDR_OPT_RESERVED_MASK or res1 or res2, 16,
             "reserved bits set in libxc image header"),
            (options & IHDR_OPT_BIG_ENDIAN, 16, "big-endian libxc streams are unsupported"),
        ])
        return version

    def _read_domain_header(self, version: int, legacy: bool) -> StreamInfo:
        off = self.offset
        dtype, page_shift, reserved, major, minor = _DHDR.unpack(
            self.read_exact(DHDR_BYTES, "libxc domain header"))

        def fail(message: str) -> StreamError:
            # A record header here instead of the domain header reads as type = record
            # type and page_shift = low half of its length: say so.
            if page_shift != PAGE_SHIFT and dtype in _LIBXC_TYPES:
                message += (f" (this looks like a {_LIBXC_TYPES[dtype].name} record header: "
                            f"record out of order, before the domain header?)")
            return StreamError(message, off)

        if dtype not in SUPPORTED_DOMAIN_TYPES:
            name = _DOMAIN_TYPES[dtype].name if dtype in _DOMAIN_TYPES else f"0x{dtype:08x}"
            hint = " (Xen saves PVH guests as X86_HVM; type 3 was PVHv1)" \
                if dtype == DomainType.X86_PVH else ""
            raise fail(f"unsupported domain type {name} in the domain header: vmem reads "
                       f"X86_HVM{hint}")
        if page_shift != PAGE_SHIFT:
            raise fail(f"unsupported page size 2**{page_shift} in the domain header: vmem "
                       f"reads page_shift {PAGE_SHIFT} (4 KiB pages)")
        if reserved:
            raise fail("reserved field set in the domain header")
        return StreamInfo(version, DomainType(dtype), page_shift, major, minor,
                          LIBXL_VERSION, legacy)

    # -- records -----------------------------------------------------------------------

    def next_record(self) -> Record | PageData:
        """Read the next record of the current layer.

        Returns :class:`PageData` for PAGE_DATA (and post-copy PAGE_DATA) records, whose
        payload the caller must then consume with a ``read_page_payload*`` or
        :meth:`skip_page_payload` call; :class:`Record` for everything else, including the
        libxc END (after which libxl records follow) and the libxl END (then
        :attr:`finished` is True).

        Raises:
            StreamError: truncation, unknown mandatory type, length beyond its limit or not
                matching the record's layout, non-zero padding or reserved bits, a pfn
                beyond ``max_pfn``, or a record out of order (a v3 record in a v2 stream,
                memory before STATIC_DATA_END in v3, static data after it, a second
                LIBXC_CONTEXT, anything after the libxl END).
        """
        if self._phase is _Phase.START:
            raise RuntimeError("call StreamReader.read_begin() before next_record()")
        if self._pending is not None:
            raise RuntimeError("the PAGE_DATA payload must be consumed (read_page_payload*, "
                               "skip_page_payload) before next_record()")
        # _sticky() written out: this runs for every record (and cold, inside a downtime,
        # for the closing ones); the context manager cost ~0.7 us a record, warm
        self._check_usable()
        try:
            if self._phase is _Phase.DONE:
                raise StreamError("record out of order: the stream ended with the libxl "
                                  "END record", self.offset)
            while True:
                off = self.offset
                rtype, length = _RHDR.unpack(self.read_exact(RECORD_HEADER_BYTES, "record header"))
                if self._phase is _Phase.LIBXC:
                    result = self._libxc_record(rtype, length, off)
                else:
                    result = self._libxl_record(rtype, length, off)
                if result is not None:
                    self.records_read += 1
                    return result
        except BaseException as err:
            self._failed = err
            raise

    def _libxc_record(self, rtype: int, length: int, off: int) -> Record | PageData | None:
        t = _LIBXC_TYPES.get(rtype)
        if t is None and self._allow_postcopy:
            t = _POSTCOPY_TYPES.get(rtype)
        if t is None:
            if rtype & VMEM_RECORD_MASK == VMEM_RECORD_BASE:
                what = "vmem post-copy record" if rtype in _POSTCOPY_ONLY else "vmem record"
                raise StreamError(f"unexpected {what} 0x{rtype:08x} (allow_postcopy="
                                  f"{self._allow_postcopy})", off)
            if rtype & REC_TYPE_OPTIONAL:
                self._skip_body(length, MAX_RECORD_BODY_BYTES, f"optional record 0x{rtype:08x}",
                                off)
                self.optional_records_skipped += 1
                return None
            raise StreamError(f"unknown mandatory libxc record type 0x{rtype:08x}", off)

        name = _RECORD_NAMES[t]
        version = self.info.version
        if t in V3_RECORD_TYPES and version < IHDR_VERSION_3:
            raise StreamError(f"record out of order: {name} does not exist in stream "
                              f"version {version}", off)
        if t in PV_ONLY_RECORD_TYPES:
            raise StreamError(f"record {name} is only valid in x86 PV streams, this is "
                              f"{self.info.domain_type.name}", off)
        if t in _UNSUPPORTED_LIBXC:
            raise StreamError(f"unsupported record {name}: {_UNSUPPORTED_LIBXC[t]}", off)

        if t is LibxcRecordType.END:
            self._expect_length(name, length, 0, off)
            if self._require_hvm_state:
                missing = [n for n, seen in (("HVM_PARAMS", self.hvm_params is not None),
                                             ("HVM_CONTEXT", self._hvm_context_seen)) if not seen]
                if missing:
                    raise StreamError(f"x86 HVM image ends without {' and '.join(missing)} "
                                      f"(a restorer needs them before the libxc END)", off)
            self._phase = _Phase.LIBXL
            return Record(t, b"", off)
        if t is LibxcRecordType.HVM_CONTEXT and self._hvm_context_seen:
            raise StreamError("record out of order: a second HVM_CONTEXT", off)
        if t is LibxcRecordType.HVM_PARAMS and self._hvm_context_seen and not self._xen_record_order:
            raise StreamError("record out of order: HVM_PARAMS after HVM_CONTEXT (the spec "
                              "requires HVM_PARAMS to precede HVM_CONTEXT)", off)
        if t is LibxcRecordType.STATIC_DATA_END:
            if self._static_data_seen:
                raise StreamError("record out of order: a second STATIC_DATA_END (or one "
                                  "after memory content)", off)
            self._expect_length(name, length, 0, off)
            self._static_data_seen = True
            return Record(t, b"", off)
        if t in STATIC_DATA_RECORD_TYPES:
            if self._static_data_seen:
                raise StreamError(f"record out of order: {name} after STATIC_DATA_END", off)
        elif t is not LibxcRecordType.VERIFY and not self._static_data_seen:
            if version >= IHDR_VERSION_3:
                raise StreamError(f"record out of order: {name} before STATIC_DATA_END (a v3 "
                                  f"stream sends it ahead of memory and register content)",
                                  off)
            if t is LibxcRecordType.PAGE_DATA:
                # v2 compatibility (spec): the first PAGE_DATA of an HVM stream marks the
                # position of the implied STATIC_DATA_END.
                self._static_data_seen = True

        if t in _PAGE_DATA_TYPES:
            return self._page_data(t, length, off)
        return Record(t, self._read_checked_body(t, name, length, off), off)

    def _read_checked_body(self, t: LibxcRecordType | PostcopyRecordType, name: str,
                           length: int, off: int) -> bytes:
        # Layout rules from the spec, checked on the length before the body is read.
        if t is LibxcRecordType.VERIFY:
            self._expect_length(name, length, 0, off)
        elif t is LibxcRecordType.X86_TSC_INFO:
            self._expect_length(name, length, X86_TSC_INFO_BYTES, off)
        elif t is LibxcRecordType.HVM_PARAMS:
            # Errata 1: Xen 4.6-4.8 could send HVM_PARAMS with zero-length content.
            if length and (length < HVM_PARAMS_HEADER_BYTES or
                           (length - HVM_PARAMS_HEADER_BYTES) % HVM_PARAMS_ENTRY_BYTES):
                raise StreamError(f"{name} length {length} is not 8 + 16*count", off)
            limit = HVM_PARAMS_HEADER_BYTES + HVM_PARAMS_ENTRY_BYTES * MAX_HVM_PARAMS
            if length > limit:
                raise StreamError(f"{name} length {length} exceeds the limit of {limit} "
                                  f"octets ({MAX_HVM_PARAMS} params)", off)
        elif t is LibxcRecordType.HVM_CONTEXT:
            if length == 0:
                raise StreamError(f"{name} record with zero length", off)
        elif t is LibxcRecordType.X86_CPUID_POLICY:
            if length == 0 or length % X86_CPUID_LEAF_BYTES:
                raise StreamError(f"{name} length {length} is not a non-zero multiple of "
                                  f"{X86_CPUID_LEAF_BYTES}", off)
        elif t is LibxcRecordType.X86_MSR_POLICY:
            if length == 0 or length % X86_MSR_ENTRY_BYTES:
                raise StreamError(f"{name} length {length} is not a non-zero multiple of "
                                  f"{X86_MSR_ENTRY_BYTES}", off)
        body = self._read_body(length, MAX_RECORD_BODY_BYTES, name, off)
        body_off = off + RECORD_HEADER_BYTES
        if t is LibxcRecordType.X86_TSC_INFO:
            check_x86_tsc_info(body, body_off)
        if t is LibxcRecordType.HVM_PARAMS:
            params = parse_hvm_params(body, body_off)
            if self.hvm_params is None:
                self.hvm_params = params
            else:
                self.hvm_params.update(params)  # several HVM_PARAMS records add up
        elif t is LibxcRecordType.HVM_CONTEXT:
            if self._require_hvm_state:
                self.hvm_context = parse_hvm_context(body, body_off)
            self._hvm_context_seen = True
        return body

    def _libxl_record(self, rtype: int, length: int, off: int) -> Record:
        t = _LIBXL_TYPES.get(rtype)
        if t is None:
            # libxl, unlike libxc, fails on every unrecognised record, optional or not.
            raise StreamError(f"unknown libxl record type 0x{rtype:08x}", off)
        if t is LibxlRecordType.END:
            self._expect_length("libxl END", length, 0, off)
            self._phase = _Phase.DONE
            return Record(t, b"", off)
        if t is LibxlRecordType.LIBXC_CONTEXT:
            raise StreamError("record out of order: a second LIBXC_CONTEXT after the libxc "
                              "END (checkpointed streams are unsupported)", off)
        if t in (LibxlRecordType.CHECKPOINT_END, LibxlRecordType.CHECKPOINT_STATE):
            raise StreamError(f"unsupported libxl record {t.name}: checkpointed (Remus/COLO) "
                              f"streams are unsupported", off)
        limit = (EMULATOR_HEADER_BYTES + MAX_EMULATOR_CONTEXT_BYTES
                 if t is LibxlRecordType.EMULATOR_CONTEXT else MAX_RECORD_BODY_BYTES)
        if length < EMULATOR_HEADER_BYTES:
            raise StreamError(f"{t.name} length {length} is too short for the 8-octet "
                              f"emulator header", off)
        rec = Record(t, self._read_body(length, limit, t.name, off), off)
        parse_emulator_record(rec)  # validates the emulator id
        return rec

    # -- bodies ------------------------------------------------------------------------

    @staticmethod
    def _expect_length(name: str, length: int, expected: int, off: int) -> None:
        if length != expected:
            raise StreamError(f"{name} record must have length {expected}, not {length}", off)

    def _read_body(self, length: int, limit: int, name: str, off: int) -> bytes:
        if length > limit:
            raise StreamError(f"{name} record length {length} exceeds the limit of {limit} "
                              f"octets", off)
        return self.read_body(length, f"{name} body")

    def _skip_body(self, length: int, limit: int, name: str, off: int) -> None:
        if length > limit:
            raise StreamError(f"{name} length {length} exceeds the limit of {limit} octets", off)
        left = length
        while left:
            step = min(left, _SKIP_CHUNK_BYTES)
            self.read_exact(step, f"{name} body")
            left -= step
        self.read_padding(length, name)

    def _page_data(self, t: LibxcRecordType | PostcopyRecordType, length: int,
                   off: int) -> PageData:
        name = _RECORD_NAMES[t]
        # Everything about the record's size is decided before the pfns are read.
        if length < PAGE_DATA_HEADER_BYTES + 8:
            raise StreamError(f"{name} length {length} is too short for a count and one pfn",
                              off)
        if length > MAX_PAGE_DATA_BODY_BYTES:
            raise StreamError(f"{name} length {length} exceeds the limit of "
                              f"{MAX_PAGE_DATA_BODY_BYTES} octets ({MAX_PAGES_PER_RECORD} "
                              f"pages)", off)
        body_off = off + RECORD_HEADER_BYTES
        count, reserved = _U32_PAIR.unpack(self.read_exact(PAGE_DATA_HEADER_BYTES, f"{name} header"))
        if count == 0:
            raise StreamError(f"{name} count is 0 (must be at least 1)", body_off)
        if count > MAX_PAGES_PER_RECORD:
            raise StreamError(f"{name} count {count} exceeds the limit of "
                              f"{MAX_PAGES_PER_RECORD} pages per record", body_off)
        if reserved:
            raise StreamError(f"reserved field set in {name} header", body_off + 4)
        if length < PAGE_DATA_HEADER_BYTES + 8 * count:
            raise StreamError(f"{name} length {length} is too short for {count} pfns", off)

        pfn_off = body_off + PAGE_DATA_HEADER_BYTES
        raw = np.frombuffer(self.read_exact(8 * count, f"{name} pfns"), dtype="<u8")
        bad = np.flatnonzero(raw & np.uint64(PFN_RESERVED_MASK))
        if bad.size:
            i = int(bad[0])
            raise StreamError(f"reserved bits set in {name} pfn[{i}] = 0x{int(raw[i]):016x}",
                              pfn_off + 8 * i)
        types = (raw >> np.uint64(PFN_TYPE_SHIFT)).astype(np.uint8)
        bad = np.flatnonzero(~_TYPE_KNOWN[types])
        if bad.size:
            i = int(bad[0])
            raise StreamError(f"unknown page type 0x{int(types[i]):x} in {name} pfn[{i}]",
                              pfn_off + 8 * i)
        pfns = raw & np.uint64(PFN_MASK)
        bad = np.flatnonzero(pfns > np.uint64(self._max_pfn))
        if bad.size:
            i = int(bad[0])
            raise StreamError(f"pfn 0x{int(pfns[i]):x} ({name} pfn[{i}]) is beyond max_pfn "
                              f"0x{self._max_pfn:x}", pfn_off + 8 * i)
        has_data = _TYPE_HAS_DATA[types]
        npages = int(has_data.sum())
        expected = PAGE_DATA_HEADER_BYTES + 8 * count + PAGE_SIZE * npages
        if length != expected:
            raise StreamError(f"{name} length {length} does not match its count: "
                              f"8 + 8*{count} pfns + 4096*{npages} pages = {expected}", off)
        # The body is a multiple of 8 octets, so a PAGE_DATA record has no padding.
        self._pending = _PendingPayload(pfns if npages == count else pfns[has_data],
                                        npages * PAGE_SIZE, off)
        return PageData(count, pfns, types, npages, t, off)

    # -- page payloads -----------------------------------------------------------------

    @property
    def pending_pfns(self) -> np.ndarray | None:
        """The pfns whose pages the pending PAGE_DATA payload holds, in payload order (None
        when no payload is pending)."""
        return None if self._pending is None else self._pending.pfns_with_data

    def _take_pending(self) -> _PendingPayload:
        if self._pending is None:
            raise RuntimeError("no PAGE_DATA payload is pending: call next_record() first")
        pending, self._pending = self._pending, None
        return pending

    def read_page_payload(self, sink: Callable[[np.ndarray, int], Any]) -> int:
        """Let ``sink(pfns_with_data, nbytes)`` consume the pending page payload itself.

        The sink must read exactly ``nbytes`` octets from the same byte source, page by
        page in ``pfns_with_data`` order - typically ``recv_into`` on views of the
        destination's RAM, so pages are never copied.  It is not called when nbytes is 0.
        Returns nbytes.

        Raises:
            StreamError: the sink raised one of ``truncation_errors``.
        """
        if self._pending is not None and self._pending.nbytes and self.buffered_bytes:
            raise RuntimeError("octets of this payload were read ahead: read it with read_page_payload_into")
        pending = self._take_pending()
        with self._sticky():
            if pending.nbytes:
                start = self.offset
                try:
                    sink(pending.pfns_with_data, pending.nbytes)
                except self._truncation_errors as err:
                    raise StreamError("stream truncated in PAGE_DATA payload", start) from err
                self.offset += pending.nbytes
            return pending.nbytes

    def read_page_payload_into(self, buffer: Buffer) -> int:
        """Read the pending page payload contiguously into ``buffer[:nbytes]``; return nbytes.

        Raises:
            ValueError: ``buffer`` is read-only or shorter than the payload (nothing read;
                the payload stays pending).
            StreamError: truncation.
        """
        view = memoryview(buffer).cast("B")
        if self._pending is not None and (view.readonly or view.nbytes < self._pending.nbytes):
            raise ValueError(f"buffer must be writable and hold {self._pending.nbytes} octets")
        pending = self._take_pending()
        with self._sticky():
            if pending.nbytes:
                self.read_into(view[:pending.nbytes], "PAGE_DATA payload")
            return pending.nbytes

    def skip_page_payload(self) -> int:
        """Read and discard the pending page payload (bounded chunks); return nbytes."""
        pending = self._take_pending()
        with self._sticky():
            left = pending.nbytes
            while left:
                step = min(left, _SKIP_CHUNK_BYTES)
                self.read_exact(step, "PAGE_DATA payload")
                left -= step
            return pending.nbytes


def rehearse_tail(npages: int, context: bytes = b"{}") -> None:
    """Write a stream's tail (HVM state, libxc END, emulator context, libxl END) into memory
    and read it back, results discarded: both sides run this just before a pause.

    Why: in the downtime each of these records is written and read once, by processes that
    have been idle for the whole pre-copy, and that first run of cold Python cost more than
    the hand-offs between the processes (the destination's read of the six records 0.25 ms,
    the three hand-offs 0.12 ms; an idle 1 GiB guest's downtime, docs/performance.md).
    Guarantees: nothing is sent or received; no state outside the two throwaway objects.
    """
    buf = bytearray()
    writer = StreamWriter(lambda parts: buf.extend(b"".join(memoryview(p).cast("B") for p in parts)))
    writer.begin()
    writer.end_of_stream(npages, context)  # the code a stop-and-copy runs; caches the HVM records
    source = io.BytesIO(buf)
    reader = StreamReader(source.read, source.readinto, max_pfn=max(npages - 1, 0))
    reader.read_begin()
    while not isinstance(rec := reader.next_record(), PageData) and not (
            rec.layer == "libxl" and rec.type is LibxlRecordType.END):
        if rec.type is LibxlRecordType.EMULATOR_CONTEXT:
            parse_emulator_record(rec)
