"""Post-copy record bodies and the urgent channel's framing.

PFNS (forward stream) and POSTCOPY_FAULT (back channel) share one body layout, after the
2017 RFC's ``POSTCOPY_PFNS`` / ``POSTCOPY_FAULT``::

    +0  u32 count      number of pfns, 1..MAX_PFNS_PER_RECORD
    +4  u32 reserved   0
    +8  u64 pfn[count] little-endian, each < the guest's page count

The urgent channel is a second connection used only for demand faults: the destination
sends POSTCOPY_FAULT records on it (the control-record framing below), the source answers
with post-copy PAGE_DATA records with the PAGE_DATA body of the Xen stream.  Both ends of
it are C threads (``vmem/_build/postcopy.py``, wrapped by ``vmem._native.PostcopyFaultEngine``
and ``PostcopyFaultServer``); the record types, the page size and the page limit they use
are the ones of :mod:`vmem.format.wire` (the C side's copies are exposed through the cdef
and checked against them by tests/test_native.py).  Layouts::

    FAULT, destination -> source:
    +0  u32 type = PostcopyRecordType.FAULT        +4 u32 length = 8 + 8*count
    +8  u32 count (1..MAX_PAGES_PER_RECORD)        +12 u32 reserved (0)
    +16 u64 pfn[count]                             (length is a multiple of 8: no padding)

    PAGE_DATA, source -> destination:

    +0  u32 type = PostcopyRecordType.PAGE_DATA   +4 u32 length = 8 + 8*count + 4096*count
    +8  u32 count (1..MAX_PAGES_PER_RECORD)        +12 u32 reserved (0)
    +16 u64 pfn[count] (type bits 0: every page carries data)
    ... 4096 * count octets of page data, in pfn order

Every length is checked against its limit before anything is allocated or read.
"""
from __future__ import annotations

import struct

import numpy as np

from vmem.errors import StreamError

__all__ = ["MAX_PFNS_PER_RECORD", "encode_pfn_list", "decode_pfn_list"]

#: pfns per PFNS / FAULT record: 512 KiB of body, so a fully populated 1 GiB guest's list
#: is 4 records rather than 256 (each record costs the receiver a few microseconds).
MAX_PFNS_PER_RECORD = 65536
_HDR = struct.Struct("<II")


def encode_pfn_list(pfns: np.ndarray) -> bytes:
    """Body of one PFNS or POSTCOPY_FAULT record (``1 <= len(pfns) <= MAX_PFNS_PER_RECORD``)."""
    n = len(pfns)
    if not 1 <= n <= MAX_PFNS_PER_RECORD:
        raise ValueError(f"a pfn list record holds 1..{MAX_PFNS_PER_RECORD} pfns, not {n}")
    return _HDR.pack(n, 0) + np.ascontiguousarray(pfns, dtype="<u8").tobytes()


def decode_pfn_list(body, npages: int, what: str = "PFNS", offset: int = -1) -> np.ndarray:
    """Parse a PFNS / POSTCOPY_FAULT body into an int64 array.

    Raises:
        StreamError: short body, count 0 or over the limit, count not matching the length,
            reserved field set, or a pfn beyond the guest.
    """
    mv = memoryview(body).cast("B")
    if len(mv) < _HDR.size + 8:
        raise StreamError(f"{what} body of {len(mv)} octets is too short for a count and one pfn", offset)
    count, reserved = _HDR.unpack_from(mv)
    if reserved:
        raise StreamError(f"reserved field set in {what}", offset)
    if not 1 <= count <= MAX_PFNS_PER_RECORD:
        raise StreamError(f"{what} count {count} is outside 1..{MAX_PFNS_PER_RECORD}", offset)
    if len(mv) != _HDR.size + 8 * count:
        raise StreamError(f"{what} length {len(mv)} does not match its count {count} (8 + 8*count)", offset)
    pfns = np.frombuffer(mv, dtype="<u8", count=count, offset=_HDR.size)
    bad = np.flatnonzero(pfns >= np.uint64(npages))
    if bad.size:
        raise StreamError(f"{what} pfn {int(pfns[bad[0]])} is beyond the guest's {npages} pages", offset)
    return pfns.astype(np.int64)
