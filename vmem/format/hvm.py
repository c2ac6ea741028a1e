"""x86 HVM state records of the Xen stream: X86_TSC_INFO, HVM_PARAMS and HVM_CONTEXT.

The bodies, all little-endian (framed by :mod:`vmem.format.frame`, written in this order
after the last PAGE_DATA by :meth:`vmem.format.stream.StreamWriter.x86_hvm_state`)::

    X86_TSC_INFO (24 octets)   u32 mode | u32 khz | u64 nsec | u32 incarnation | u32 0
    HVM_PARAMS (8 + 16*N)      u32 count N | u32 0 | N x { u64 index | u64 value }
    HVM_CONTEXT (hvm save blob, Xen's xen/include/public/arch-x86/hvm/save.h):
        descriptor (8 octets)  u16 typecode | u16 instance | u32 length
        HEADER entry           descriptor(typecode 1, length 24)
                               | u32 magic 0x54381286 | u32 version 1 | u64 changeset
                               | u32 cpuid_eax | u32 gtsc_khz
        ... entries ...        descriptor | length octets
        END entry              descriptor(typecode 0, length 0)

An x86 HVM image carries, after its memory, "X86_TSC_INFO, HVM_PARAMS, HVM_CONTEXT"
(spec, "x86 HVM Guest"), and "HVM_PARAMS must precede HVM_CONTEXT".  vmem's guests have
no virtual CPU or devices that Xen would model, so vmem writes the smallest content
that is still well-formed for Xen (the guest's own context travels in EMULATOR_CONTEXT):

  X86_TSC_INFO  mode TSC_MODE_DEFAULT, khz 0 (Xen: "use the host's"), nsec = the
                guest's virtual clock in ns, incarnation 0.
  HVM_PARAMS    the special-page pfns libxc saves for every HVM guest (see
                vmem_hvm_params): where the xenstore/console/ioreq/ring pages of a
                guest of this size would live.  They lie outside guest RAM, so nothing a
                restorer does with them (libxc clears the xenstore/console/ioreq pages)
                can touch guest data.
  HVM_CONTEXT   an hvm save blob holding exactly HEADER (magic, version, changeset 0,
                CPUID[1].eax of the saving host, gtsc_khz 0) and END.  Xen's hvm_load()
                accepts a blob without CPU/device entries: those keep their reset state.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Mapping

from vmem.errors import StreamError
from vmem.format.wire import (
    HVM_FILE_MAGIC,
    HVM_FILE_VERSION,
    HVM_PARAMS_ENTRY_BYTES,
    HVM_PARAMS_HEADER_BYTES,
    HVM_SAVE_CODE_MAX,
    HVM_SAVE_DESCRIPTOR_BYTES,
    HVM_SAVE_HEADER_BYTES,
    MAX_HVM_PARAMS,
    PAGE_SHIFT,
    PFN_MASK,
    TSC_MODE_DEFAULT,
    X86_HVM_END_SPECIAL_REGION,
    X86_HVM_NR_SPECIAL_PAGES,
    X86_TSC_INFO_BYTES,
    HvmParam,
    HvmSaveCode,
    HvmSpecialPage,
)

__all__ = [
    "x86_tsc_info_body", "check_x86_tsc_info", "hvm_params_body", "parse_hvm_params",
    "vmem_hvm_params", "hvm_context_blob", "parse_hvm_context", "HvmContextInfo",
    "host_cpuid_eax",
]

_TSC_INFO = struct.Struct("<IIQII")  # mode, khz, nsec, incarnation, reserved
_PARAMS_HEADER = struct.Struct("<II")  # HVM_PARAMS count, reserved
_HVM_DESC = struct.Struct("<HHI")  # hvm save descriptor: typecode, instance, length
_HVM_HEADER = struct.Struct("<IIQII")  # magic, version, changeset, cpuid, gtsc_khz
_HVM_PARAM = struct.Struct("<QQ")  # index, value

assert _TSC_INFO.size == X86_TSC_INFO_BYTES


def x86_tsc_info_body(mode: int = TSC_MODE_DEFAULT, khz: int = 0, nsec: int = 0,
                      incarnation: int = 0) -> bytes:
    """The 24-octet X86_TSC_INFO body: ``u32 mode, u32 khz, u64 nsec, u32 incarnation,
    u32 reserved``.

    Raises:
        ValueError: a field does not fit its width.
    """
    if not (0 <= mode <= 0xFFFF_FFFF and 0 <= khz <= 0xFFFF_FFFF
            and 0 <= nsec < 1 << 64 and 0 <= incarnation <= 0xFFFF_FFFF):
        raise ValueError("X86_TSC_INFO field out of range")
    return _TSC_INFO.pack(mode, khz, nsec, incarnation, 0)


def check_x86_tsc_info(body: bytes | bytearray | memoryview, offset: int = -1) -> None:
    """Check an X86_TSC_INFO body of the right length (the reader checked it).
    ``offset``: stream offset of the body, for errors.

    Raises:
        StreamError: the reserved field is set.
    """
    if _TSC_INFO.unpack(body)[4]:
        raise StreamError("reserved field set in X86_TSC_INFO", offset + 20 if offset >= 0 else -1)


def hvm_params_body(params: Mapping[int, int]) -> bytes:
    """An HVM_PARAMS body: ``u32 count, u32 reserved, count x {u64 index, u64 value}``,
    entries in ``params`` order.

    Raises:
        ValueError: more than ``MAX_HVM_PARAMS`` entries, or an index/value beyond 64 bits.
    """
    items = [(int(k), int(v)) for k, v in params.items()]
    if len(items) > MAX_HVM_PARAMS:
        raise ValueError(f"{len(items)} HVM params exceed MAX_HVM_PARAMS ({MAX_HVM_PARAMS})")
    if any(not (0 <= k < 1 << 64 and 0 <= v < 1 << 64) for k, v in items):
        raise ValueError("HVM param index and value must fit 64 bits")
    return _PARAMS_HEADER.pack(len(items), 0) + b"".join(_HVM_PARAM.pack(k, v) for k, v in items)


def parse_hvm_params(body: bytes | bytearray | memoryview, offset: int = -1) -> dict[int, int]:
    """Decode an HVM_PARAMS body into ``{index: value}`` (a zero-length body, which the
    spec's errata allow, is ``{}``).  ``offset``: stream offset of the body, for errors.

    Raises:
        StreamError: not ``8 + 16 * count`` octets, count beyond ``MAX_HVM_PARAMS``,
            reserved field set, or an index given twice.
    """
    body = memoryview(body).cast("B")
    if not body.nbytes:
        return {}
    at = offset
    if body.nbytes < HVM_PARAMS_HEADER_BYTES:
        raise StreamError(f"HVM_PARAMS body of {body.nbytes} octets is shorter than its "
                          f"8-octet header", at)
    count, reserved = _PARAMS_HEADER.unpack_from(body)
    if reserved:
        raise StreamError("reserved field set in HVM_PARAMS", at + 4 if at >= 0 else -1)
    if count > MAX_HVM_PARAMS:
        raise StreamError(f"HVM_PARAMS count {count} exceeds the limit of {MAX_HVM_PARAMS}",
                          at)
    if body.nbytes != HVM_PARAMS_HEADER_BYTES + HVM_PARAMS_ENTRY_BYTES * count:
        raise StreamError(f"HVM_PARAMS count {count} does not match length {body.nbytes}", at)
    out: dict[int, int] = {}
    for i, (index, value) in enumerate(_HVM_PARAM.iter_unpack(body[HVM_PARAMS_HEADER_BYTES:])):
        if index in out:
            raise StreamError(f"HVM param {index} given twice (entry {i})",
                              at + 8 + 16 * i if at >= 0 else -1)
        out[index] = value
    return out


def vmem_hvm_params(npages: int) -> dict[HvmParam, int]:
    """The HVM params vmem writes for a guest of ``npages`` pages of RAM (pfns 0..npages-1).

    Xen's domain builder puts 8 special pages just below pfn 0xFF000 (16 MiB below 4 GiB,
    inside the MMIO hole of a guest with less than ~4 GiB of RAM).  vmem's guests have
    contiguous RAM and no hole, so a guest that reaches into that region gets its special
    pages right after its RAM instead.  Either way they never overlap guest RAM.
    IDENT_PT is an address, the others are pfns.

    Raises:
        ValueError: ``npages`` is not positive or leaves no room below 2**52 pfns.
    """
    npages = int(npages)
    if npages <= 0 or npages + X86_HVM_NR_SPECIAL_PAGES > PFN_MASK:
        raise ValueError(f"cannot lay out special pages for a guest of {npages} pages")
    first = X86_HVM_END_SPECIAL_REGION - X86_HVM_NR_SPECIAL_PAGES
    if npages > first:
        first = npages

    def special(page: HvmSpecialPage) -> int:
        return first + int(page)

    return {
        HvmParam.STORE_PFN: special(HvmSpecialPage.XENSTORE),
        HvmParam.IOREQ_PFN: special(HvmSpecialPage.IOREQ),
        HvmParam.BUFIOREQ_PFN: special(HvmSpecialPage.BUFIOREQ),
        HvmParam.PAGING_RING_PFN: special(HvmSpecialPage.PAGING),
        HvmParam.MONITOR_RING_PFN: special(HvmSpecialPage.ACCESS),
        HvmParam.SHARING_RING_PFN: special(HvmSpecialPage.SHARING),
        HvmParam.CONSOLE_PFN: special(HvmSpecialPage.CONSOLE),
        HvmParam.IDENT_PT: special(HvmSpecialPage.IDENT_PT) << PAGE_SHIFT,
    }


@functools.lru_cache(maxsize=1)
def host_cpuid_eax() -> int:
    """CPUID leaf 1 EAX (family/model/stepping signature) of this host, rebuilt from
    ``/proc/cpuinfo``; 0 if unknown.  Cached: read once per process."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("cpu family", "model", "stepping") and key not in fields:
                    fields[key] = int(value.strip())
                if not line.strip() or len(fields) == 3:
                    break
    except (OSError, ValueError):
        return 0
    if len(fields) != 3:
        return 0
    family, model, stepping = fields["cpu family"], fields["model"], fields["stepping"]
    base_family = min(family, 0xF)
    ext_family = family - 0xF if family >= 0xF else 0
    eax = (stepping & 0xF) | (model & 0xF) << 4 | base_family << 8
    if base_family in (0x6, 0xF):
        eax |= (model >> 4 & 0xF) << 16
    return eax | (ext_family & 0xFF) << 20


def hvm_context_blob(*, cpuid_eax: int | None = None, gtsc_khz: int = 0,
                     changeset: int = 0) -> bytes:
    """A minimal, well-formed hvm save blob: a HEADER entry and the END entry (40 octets).

    ``cpuid_eax`` defaults to this host's (:func:`host_cpuid_eax`); ``gtsc_khz`` 0 tells
    Xen to keep the host's TSC frequency; ``changeset`` 0 = unknown.
    """
    eax = host_cpuid_eax() if cpuid_eax is None else int(cpuid_eax)
    return (_HVM_DESC.pack(HvmSaveCode.HEADER, 0, HVM_SAVE_HEADER_BYTES)
            + _HVM_HEADER.pack(HVM_FILE_MAGIC, HVM_FILE_VERSION, changeset, eax, gtsc_khz)
            + _HVM_DESC.pack(HvmSaveCode.END, 0, 0))


@dataclass(frozen=True, slots=True)
class HvmContextInfo:
    """What :func:`parse_hvm_context` found in an HVM_CONTEXT blob."""

    version: int
    changeset: int
    cpuid_eax: int
    gtsc_khz: int
    entries: tuple[tuple[int, int, int], ...]
    """``(typecode, instance, length)`` of every entry, HEADER and END included."""


def parse_hvm_context(blob: bytes | bytearray | memoryview, offset: int = -1) -> HvmContextInfo:
    """Walk an hvm save blob: HEADER first (magic, version), entries whose lengths stay
    inside the blob, END (length 0) last and nothing after it.  ``offset``: stream
    offset of the blob, for errors.  Entry contents other than HEADER are not decoded.

    Raises:
        StreamError: any of the above violated, or a typecode beyond HVM_SAVE_CODE_MAX.
    """
    blob = memoryview(blob).cast("B")

    def at(pos: int) -> int:
        return offset + pos if offset >= 0 else -1

    size = blob.nbytes
    if size < 2 * HVM_SAVE_DESCRIPTOR_BYTES + HVM_SAVE_HEADER_BYTES:
        raise StreamError(f"HVM_CONTEXT blob of {size} octets is too short for a HEADER "
                          f"and an END entry", at(0))
    code, instance, length = _HVM_DESC.unpack_from(blob, 0)
    if code != HvmSaveCode.HEADER or length != HVM_SAVE_HEADER_BYTES:
        raise StreamError(f"HVM_CONTEXT must start with a HEADER entry of "
                          f"{HVM_SAVE_HEADER_BYTES} octets, found typecode {code} length "
                          f"{length}", at(0))
    magic, version, changeset, eax, khz = _HVM_HEADER.unpack_from(blob, HVM_SAVE_DESCRIPTOR_BYTES)
    if magic != HVM_FILE_MAGIC:
        raise StreamError(f"bad HVM_CONTEXT header magic 0x{magic:08x}: expected "
                          f"0x{HVM_FILE_MAGIC:08x}", at(HVM_SAVE_DESCRIPTOR_BYTES))
    if version != HVM_FILE_VERSION:
        raise StreamError(f"unsupported HVM_CONTEXT version {version}: expected "
                          f"{HVM_FILE_VERSION}", at(HVM_SAVE_DESCRIPTOR_BYTES + 4))
    entries = [(code, instance, length)]
    pos = HVM_SAVE_DESCRIPTOR_BYTES + HVM_SAVE_HEADER_BYTES
    while True:
        if size - pos < HVM_SAVE_DESCRIPTOR_BYTES:
            raise StreamError("HVM_CONTEXT blob ends without an END entry", at(pos))
        code, instance, length = _HVM_DESC.unpack_from(blob, pos)
        entries.append((code, instance, length))
        if code > HVM_SAVE_CODE_MAX:
            raise StreamError(f"unknown HVM_CONTEXT entry typecode {code} (Xen 4.17 knows "
                              f"0..{HVM_SAVE_CODE_MAX})", at(pos))
        if code == HvmSaveCode.HEADER:
            raise StreamError("a second HEADER entry in HVM_CONTEXT", at(pos))
        if length > size - pos - HVM_SAVE_DESCRIPTOR_BYTES:
            raise StreamError(f"HVM_CONTEXT entry typecode {code} length {length} runs past "
                              f"the end of the blob", at(pos))
        pos += HVM_SAVE_DESCRIPTOR_BYTES + length
        if code == HvmSaveCode.END:
            if length:
                raise StreamError(f"HVM_CONTEXT END entry with length {length}",
                                  at(pos - length - HVM_SAVE_DESCRIPTOR_BYTES))
            break
        if len(entries) > size // HVM_SAVE_DESCRIPTOR_BYTES:  # pragma: no cover - bound
            raise StreamError("HVM_CONTEXT has more entries than octets", at(pos))
    if pos != size:
        raise StreamError(f"{size - pos} octets after the HVM_CONTEXT END entry", at(pos))
    return HvmContextInfo(version, changeset, eax, khz, tuple(entries))
