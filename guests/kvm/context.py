"""The KVM guest's context blob: the vCPU state, as the migration stream carries it.

Layout (little-endian)::

    0   magic  b"VMEMKVMC"
    8   u32 version (CONTEXT_VERSION)       12  u32 section count
    16  sections: 8-byte name (NUL-padded), u32 length, then length bytes
    ..  16-byte BLAKE2b of everything before it

Sections: regs, sregs, xsave, lapic, events, msrs (guests/kvm/vm.py) and meta (JSON:
counters that live in the status device, the TSC rate, the RAM size, the dirty mode).

Compatibility rule: :func:`unpack` accepts exactly CONTEXT_VERSION.  It refuses, naming
the reason, a blob that is truncated, corrupt (checksum), of another version, lacks a
section, was taken from a guest of another RAM size, or whose vCPU would not resume in
the guest program (not in long mode with paging, or RIP outside the program).
"""
from __future__ import annotations

import hashlib
import json
import struct

from guests.kvm import layout as L

MAGIC = b"VMEMKVMC"
CONTEXT_VERSION = 1
SECTIONS = ("regs", "sregs", "xsave", "lapic", "events", "msrs")
MAX_SECTION_BYTES = 1 << 16
_DIGEST_BYTES = 16


class ContextRefused(ValueError):
    """A vCPU context that cannot be loaded (the message says why)."""


def pack(state: dict[str, bytes], meta: dict) -> bytes:
    parts = [MAGIC, struct.pack("<II", CONTEXT_VERSION, len(SECTIONS) + 1)]
    for name, data in [(n, state[n]) for n in SECTIONS] + [("meta", json.dumps(meta).encode())]:
        parts += [name.encode().ljust(8, b"\0"), struct.pack("<I", len(data)), data]
    body = b"".join(parts)
    return body + hashlib.blake2b(body, digest_size=_DIGEST_BYTES).digest()


def unpack(blob: bytes, npages: int) -> tuple[dict[str, bytes], dict]:
    """Check and split a context blob for a guest of ``npages``.

    Raises:
        ContextRefused: the blob is not a loadable vCPU context (the reason named).
    """
    if len(blob) < 16 + _DIGEST_BYTES or blob[:8] != MAGIC:
        raise ContextRefused("vCPU context refused: not a KVM guest context (bad magic or too short)")
    body, digest = blob[:-_DIGEST_BYTES], blob[-_DIGEST_BYTES:]
    if hashlib.blake2b(body, digest_size=_DIGEST_BYTES).digest() != digest:
        raise ContextRefused("vCPU context refused: checksum mismatch (corrupted in transit or storage)")
    version, count = struct.unpack_from("<II", body, 8)
    if version != CONTEXT_VERSION:
        raise ContextRefused(f"vCPU context refused: version {version}, this build reads {CONTEXT_VERSION}")
    sections, off = {}, 16
    for _ in range(min(count, 16)):
        if off + 12 > len(body):
            raise ContextRefused("vCPU context refused: truncated section header")
        name = body[off:off + 8].rstrip(b"\0").decode("ascii", "replace")
        (length,) = struct.unpack_from("<I", body, off + 8)
        if length > MAX_SECTION_BYTES or off + 12 + length > len(body):
            raise ContextRefused(f"vCPU context refused: section {name!r} length {length} out of bounds")
        sections[name] = body[off + 12:off + 12 + length]
        off += 12 + length
    missing = [n for n in SECTIONS + ("meta",) if n not in sections]
    if missing:
        raise ContextRefused(f"vCPU context refused: missing section(s) {', '.join(missing)}")
    meta = json.loads(sections.pop("meta"))
    if int(meta.get("npages", -1)) != npages:
        raise ContextRefused(f"vCPU context refused: taken from a guest of {meta.get('npages')} pages, "
                             f"this one has {npages}")
    if len(sections["regs"]) != 144 or len(sections["sregs"]) != 312:
        raise ContextRefused("vCPU context refused: register sections of the wrong size")
    rip = struct.unpack_from("<Q", sections["regs"], 16 * 8)[0]
    code = L.firmware_gpa(npages, L.FW_CODE)
    if not code <= rip < code + L.CODE_MAX_BYTES:
        raise ContextRefused(f"vCPU context refused: RIP {rip:#x} is outside the guest program "
                             f"[{code:#x}, {code + L.CODE_MAX_BYTES:#x})")
    cr0 = struct.unpack_from("<Q", sections["sregs"], 224)[0]
    if not cr0 & 0x80000001 == 0x80000001:
        raise ContextRefused(f"vCPU context refused: CR0 {cr0:#x} has no protected mode with paging")
    return sections, meta
