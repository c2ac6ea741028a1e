"""An independent reader of xl save files and Xen migration streams, for tests.

Written from the published texts only, NOT from vmem's code (it imports nothing from
vmem; every constant and struct layout below is typed in from the documents):

* xl save-file header: ``struct save_file_header`` and the optional-data comment in
  xen.git ``tools/xl/xl_utils.h`` (magic, byteorder 0x01020304, mandatory flags
  JSON = bit 0 / STREAMv2 = bit 1, optional flags, optional data = u32 config length +
  config; xl writes the JSON config NUL-terminated).
* ``docs/specs/libxl-migration-stream.pandoc`` (revision 2): header, records, emulator
  sub-header, END "shall be the final record".
* ``docs/specs/libxc-migration-stream.pandoc`` (revision 3, stream versions 2 and 3):
  image header, domain header, record framing and padding, PAGE_DATA's pfn encoding
  (bits 63-60 type, 59-52 reserved, 51-0 pfn; types 5-8 reserved; BROKEN/XALLOC/XTAB
  have no data), TSC_INFO, HVM_CONTEXT, HVM_PARAMS, STATIC_DATA_END, the x86 HVM layout
  and "HVM_PARAMS must precede HVM_CONTEXT".
* HVM_CONTEXT contents: ``xen/include/public/hvm/save.h`` (``struct
  hvm_save_descriptor``: u16 typecode, u16 instance, u32 length) and
  ``arch-x86/hvm/save.h`` (HEADER = 1: magic 0x54381286, version 1; END = 0).

As a checker of a *writer* it is stricter than a restorer must be: padding and reserved
fields must be zero ("set to zero on save"), and records that have no place in a plain
saved x86 HVM image (PV records, checkpoints, the deprecated TOOLSTACK, unknown
mandatory types) are errors.  :func:`read_save_file` returns a summary dict.

The end of this file finds and runs the other checker, Xen's own ``verify-stream-v2``
(:func:`find_verify_stream_v2`, :func:`run_verify_stream_v2`).
"""
from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

# --- xl (tools/xl/xl_utils.h) ---------------------------------------------------------
XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"  # char magic[32]
XL_BYTEORDER = 0x01020304
XL_FLAG_JSON = 1 << 0
XL_FLAG_STREAMV2 = 1 << 1

# --- libxl stream (libxl-migration-stream.pandoc) ---------------------------------------
LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_REC = {0: "END", 1: "LIBXC_CONTEXT", 2: "EMULATOR_XENSTORE_DATA",
             3: "EMULATOR_CONTEXT", 4: "CHECKPOINT_END", 5: "CHECKPOINT_STATE"}
EMULATOR_IDS = {0: "Unknown", 1: "Qemu Traditional", 2: "Qemu Upstream"}

# --- libxc stream (libxc-migration-stream.pandoc) ---------------------------------------
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
DOMAIN_TYPES = {1: "x86 PV", 2: "x86 HVM", 3: "x86 PVH", 4: "ARM"}
LIBXC_REC = {
    0x00: "END", 0x01: "PAGE_DATA", 0x02: "X86_PV_INFO", 0x03: "X86_PV_P2M_FRAMES",
    0x04: "X86_PV_VCPU_BASIC", 0x05: "X86_PV_VCPU_EXTENDED", 0x06: "X86_PV_VCPU_XSAVE",
    0x07: "SHARED_INFO", 0x08: "X86_TSC_INFO", 0x09: "HVM_CONTEXT", 0x0A: "HVM_PARAMS",
    0x0B: "TOOLSTACK", 0x0C: "X86_PV_VCPU_MSRS", 0x0D: "VERIFY", 0x0E: "CHECKPOINT",
    0x0F: "CHECKPOINT_DIRTY_PFN_LIST", 0x10: "STATIC_DATA_END", 0x11: "X86_CPUID_POLICY",
    0x12: "X86_MSR_POLICY",
}
V3_ONLY = {0x10, 0x11, 0x12}
PV_ONLY = {0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x0C}
NOT_IN_A_SAVE = {0x0B: "TOOLSTACK is deprecated", 0x0E: "CHECKPOINT belongs to Remus/COLO",
                 0x0F: "CHECKPOINT_DIRTY_PFN_LIST belongs to COLO"}
PAGE_TYPE_RESERVED = {0x5, 0x6, 0x7, 0x8}
PAGE_TYPE_NO_DATA = {0xD, 0xE, 0xF}  # BROKEN, XALLOC, XTAB

# --- hvm save format (public/hvm/save.h, arch-x86/hvm/save.h) --------------------------
HVM_MAGIC = 0x54381286
HVM_CODE_END, HVM_CODE_HEADER = 0, 1
HVM_PARAM_NAMES = {1: "STORE_PFN", 5: "IOREQ_PFN", 6: "BUFIOREQ_PFN", 12: "IDENT_PT",
                   17: "CONSOLE_PFN", 27: "PAGING_RING_PFN", 28: "MONITOR_RING_PFN",
                   29: "SHARING_RING_PFN"}


class SpecError(Exception):
    """The input violates the spec (message names the rule and the file offset)."""

    def __init__(self, message: str, offset: int):
        super().__init__(f"{message} [file offset {offset}]")
        self.offset = offset


class _Cursor:
    def __init__(self, data: memoryview, pos: int = 0):
        self.data = data
        self.pos = pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise SpecError(f"truncated: {what} needs {n} octets, "
                            f"{len(self.data) - self.pos} left", self.pos)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def record(self, layer: str) -> tuple[int, int, memoryview, int]:
        """``(type, body_length, body, record offset)``; checks the zero padding."""
        at = self.pos
        rtype, length = self.unpack("<II", f"{layer} record header")
        body = self.take(length, f"{layer} record 0x{rtype:08x} body")
        pad = self.take(-length % 8, f"{layer} record padding")
        if any(pad):
            raise SpecError(f"non-zero padding after {layer} record 0x{rtype:08x}", at)
        return rtype, length, body, at


def read_save_file(data: bytes | memoryview, *, collect_pages: np.ndarray | None = None) -> dict:
    """Check an xl save file against the specs; return a summary.

    Args:
        collect_pages: optional writable ``(npages, 4096)`` uint8 array: the page data of
            every PAGE_DATA record is copied to ``collect_pages[pfn]`` (to compare RAM).

    Raises:
        SpecError: the first violation found.
    """
    cur = _Cursor(memoryview(data).cast("B"))
    magic, order, mandatory, optional, optlen = cur.unpack("<32sIIII", "xl header")
    if magic != XL_MAGIC:
        raise SpecError(f"bad xl magic {bytes(magic)!r}", 0)
    if order != XL_BYTEORDER:
        raise SpecError(f"xl byteorder 0x{order:08x} != 0x01020304", 32)
    if mandatory & ~(XL_FLAG_JSON | XL_FLAG_STREAMV2):
        raise SpecError(f"unknown xl mandatory flags 0x{mandatory:x}", 36)
    if optional:
        raise SpecError(f"unknown xl optional flags 0x{optional:x}", 40)
    if not mandatory & XL_FLAG_STREAMV2:
        raise SpecError("xl header does not announce a v2 stream", 36)
    opt = _Cursor(cur.take(optlen, "xl optional data"))
    config = None
    if optlen:
        (clen,) = opt.unpack("<I", "config length")
        text = bytes(opt.take(clen, "config"))
        if mandatory & XL_FLAG_JSON:
            if not text.endswith(b"\0"):
                raise SpecError("JSON config not NUL-terminated", 52)
            config = json.loads(text[:-1].decode("utf-8"))
    summary = {"xl": {"mandatory_flags": mandatory, "optional_data_len": optlen,
                      "config": config}, "stream_offset": cur.pos}
    summary.update(_read_libxl(cur, collect_pages))
    if cur.pos != len(cur.data):
        raise SpecError(f"{len(cur.data) - cur.pos} octets after the libxl END record", cur.pos)
    summary["file_bytes"] = len(cur.data)
    return summary


def _read_libxl(cur: _Cursor, collect_pages) -> dict:
    at = cur.pos
    ident, version, options = cur.unpack(">QII", "libxl header")  # big-endian, always
    if ident != LIBXL_IDENT:
        raise SpecError(f"bad libxl ident 0x{ident:016x}", at)
    if version != 2:
        raise SpecError(f"libxl version {version} != 2", at + 8)
    if options & ~0x3:
        raise SpecError(f"reserved libxl option bits 0x{options:x}", at + 12)
    if options & 1:
        raise SpecError("big-endian libxl stream (this reader handles x86 images)", at + 12)
    out = {"libxl_version": version, "libxl_records": [], "emulator_records": [],
           "libxl_optional_skipped": 0}
    libxc_seen = False
    while True:
        rtype, length, body, rat = cur.record("libxl")
        name = LIBXL_REC.get(rtype)
        out["libxl_records"].append(name or f"0x{rtype:08x}")
        if name is None:
            if rtype & 0x80000000:
                out["libxl_optional_skipped"] += 1
                continue
            raise SpecError(f"unknown mandatory libxl record 0x{rtype:08x}", rat)
        if name == "END":
            if length:
                raise SpecError("libxl END with a body", rat)
            break
        if name == "LIBXC_CONTEXT":
            if length:
                raise SpecError("LIBXC_CONTEXT with a body", rat)
            if libxc_seen:
                raise SpecError("a second LIBXC_CONTEXT in a non-checkpointed image", rat)
            libxc_seen = True
            out["libxc"] = _read_libxc(cur, collect_pages)
        elif name in ("EMULATOR_XENSTORE_DATA", "EMULATOR_CONTEXT"):
            if length < 8:
                raise SpecError(f"{name} shorter than its emulator sub-header", rat)
            emu, index = struct.unpack_from("<II", body)
            if emu not in EMULATOR_IDS:
                raise SpecError(f"{name} with reserved emulator_id {emu}", rat + 8)
            blob = body[8:]
            if name == "EMULATOR_XENSTORE_DATA":
                parts = bytes(blob).split(b"\0")
                if parts[-1] != b"" or (len(parts) - 1) % 2:
                    raise SpecError("xenstore data is not NUL-terminated key/value pairs", rat)
            out["emulator_records"].append({"record": name, "emulator": EMULATOR_IDS[emu],
                                            "index": index, "length": len(blob),
                                            "data": bytes(blob)})
        else:
            raise SpecError(f"{name} belongs to checkpointed (Remus/COLO) streams", rat)
    if not libxc_seen:
        raise SpecError("the libxl stream has no LIBXC_CONTEXT", cur.pos)
    return out


def _read_libxc(cur: _Cursor, collect_pages) -> dict:
    at = cur.pos
    marker, ident, version, options, res16, res32 = cur.unpack(">QIIHHI", "libxc image header")
    if marker != IHDR_MARKER:
        raise SpecError("libxc marker is not all ones (legacy image?)", at)
    if ident != IHDR_ID:
        raise SpecError(f"libxc id 0x{ident:08x} is not XENF", at + 8)
    if version not in (2, 3):
        raise SpecError(f"libxc version {version} (spec revision 3 defines 2 and 3)", at + 12)
    if options & ~1 or res16 or res32:
        raise SpecError("reserved bits set in the libxc image header", at + 16)
    if options & 1:
        raise SpecError("big-endian libxc image (x86 images are little-endian)", at + 16)
    at = cur.pos
    dtype, page_shift, dres, major, minor = cur.unpack("<IHHII", "libxc domain header")
    if dtype not in DOMAIN_TYPES:
        raise SpecError(f"reserved domain type {dtype}", at)
    if dres:
        raise SpecError("reserved field set in the domain header", at + 6)
    if page_shift != 12:
        raise SpecError(f"page_shift {page_shift} (x86 pages are 4 KiB)", at + 4)
    hvm = dtype == 2
    page_size = 1 << page_shift
    out = {"version": version, "domain_type": DOMAIN_TYPES[dtype], "xen": f"{major}.{minor}",
           "records": {}, "order": [], "pages_with_data": 0, "pfns": [], "max_pfn": -1,
           "hvm_params": None, "hvm_context": None, "tsc_info": None, "optional_skipped": 0}
    static_end_seen = False
    memory_seen = False
    pfn_chunks = []
    while True:
        rtype, length, body, rat = cur.record("libxc")
        name = LIBXC_REC.get(rtype)
        if name is None:
            if rtype & 0x80000000:
                out["optional_skipped"] += 1
                continue
            raise SpecError(f"unknown mandatory libxc record 0x{rtype:08x}: restoring must fail",
                            rat)
        out["records"][name] = out["records"].get(name, 0) + 1
        if not out["order"] or out["order"][-1] != name:
            out["order"].append(name)
        if rtype in V3_ONLY and version < 3:
            raise SpecError(f"{name} in a version {version} image", rat)
        if hvm and rtype in PV_ONLY:
            raise SpecError(f"PV record {name} in an HVM image", rat)
        if rtype in NOT_IN_A_SAVE:
            raise SpecError(NOT_IN_A_SAVE[rtype], rat)
        # v3: static data (CPUID/MSR policy) precedes STATIC_DATA_END, which precedes
        # memory and register content.
        if version >= 3 and rtype not in (0x10, 0x11, 0x12, 0x0D) and not static_end_seen:
            raise SpecError(f"{name} before STATIC_DATA_END in a v3 image", rat)
        if rtype in (0x11, 0x12) and static_end_seen:
            raise SpecError(f"{name} after STATIC_DATA_END", rat)

        if name == "END":
            if length:
                raise SpecError("libxc END with a body", rat)
            break
        if name == "STATIC_DATA_END":
            if length or static_end_seen:
                raise SpecError("STATIC_DATA_END with a body or twice", rat)
            static_end_seen = True
        elif name == "PAGE_DATA":
            memory_seen = True
            if length < 8:
                raise SpecError("PAGE_DATA shorter than count/reserved", rat)
            count, reserved = struct.unpack_from("<II", body)
            if count == 0:
                raise SpecError("PAGE_DATA count is 0 (strictly > 0)", rat + 8)
            if reserved:
                raise SpecError("reserved field set in PAGE_DATA", rat + 12)
            if length < 8 + 8 * count:
                raise SpecError(f"PAGE_DATA body too short for {count} pfns", rat)
            words = np.frombuffer(body, dtype="<u8", count=count, offset=8)
            if np.any(words & np.uint64(0x0FF0_0000_0000_0000)):
                raise SpecError("reserved pfn bits 59-52 set", rat + 16)
            types = (words >> np.uint64(60)).astype(np.int64)
            if np.isin(types, list(PAGE_TYPE_RESERVED)).any():
                raise SpecError("reserved page type 0x5-0x8 (restoring shall fail)", rat + 16)
            pfns = (words & np.uint64((1 << 52) - 1)).astype(np.int64)
            with_data = ~np.isin(types, list(PAGE_TYPE_NO_DATA))
            n = int(with_data.sum())
            if length != 8 + 8 * count + page_size * n:
                raise SpecError(f"PAGE_DATA length {length} != 8 + 8*{count} + {page_size}*{n}",
                                rat)
            out["pages_with_data"] += n
            pfn_chunks.append(pfns[with_data])
            out["max_pfn"] = max(out["max_pfn"], int(pfns.max()))
            if collect_pages is not None and n:
                payload = np.frombuffer(body, dtype=np.uint8, offset=8 + 8 * count)
                collect_pages[pfns[with_data]] = payload.reshape(n, page_size)
        elif name == "X86_TSC_INFO":
            if length != 24:
                raise SpecError("TSC_INFO must be 24 octets", rat)
            mode, khz, nsec, incarnation, res = struct.unpack("<IIQII", body)
            if res:
                raise SpecError("reserved field set in TSC_INFO", rat + 28)
            out["tsc_info"] = {"mode": mode, "khz": khz, "nsec": nsec, "incarnation": incarnation}
        elif name == "HVM_PARAMS":
            if out["hvm_context"] is not None:
                raise SpecError("HVM_PARAMS after HVM_CONTEXT (must precede it)", rat)
            if length < 8:
                raise SpecError("HVM_PARAMS shorter than count/reserved", rat)
            count, res = struct.unpack_from("<II", body)
            if res:
                raise SpecError("reserved field set in HVM_PARAMS", rat + 12)
            if length != 8 + 16 * count:
                raise SpecError(f"HVM_PARAMS length {length} != 8 + 16*{count}", rat)
            params = dict(struct.iter_unpack("<QQ", body[8:]))
            out["hvm_params"] = {**(out["hvm_params"] or {}), **params}
        elif name == "HVM_CONTEXT":
            if length == 0:
                raise SpecError("empty HVM_CONTEXT", rat)
            if out["hvm_context"] is not None:
                raise SpecError("a second HVM_CONTEXT", rat)
            out["hvm_context"] = _read_hvm_blob(body, rat + 8)
        elif name == "VERIFY":
            if length:
                raise SpecError("VERIFY with a body", rat)
        elif name == "X86_CPUID_POLICY":
            if length % 24:
                raise SpecError("X86_CPUID_POLICY not a multiple of 24 octets", rat)
        elif name == "X86_MSR_POLICY":
            if length % 16:
                raise SpecError("X86_MSR_POLICY not a multiple of 16 octets", rat)
        else:  # PV records in a PV image: not expected from vmem
            raise SpecError(f"{name} is not part of an x86 HVM image", rat)
    if hvm:
        if out["hvm_context"] is None:
            raise SpecError("x86 HVM image without HVM_CONTEXT", cur.pos)
        if out["hvm_params"] is None:
            raise SpecError("x86 HVM image without HVM_PARAMS", cur.pos)
    if version >= 3 and not static_end_seen:
        raise SpecError("v3 image without STATIC_DATA_END", cur.pos)
    pfns = np.concatenate(pfn_chunks) if pfn_chunks else np.empty(0, np.int64)
    out["pfns"] = pfns
    out["memory_seen"] = memory_seen
    return out


def _read_hvm_blob(blob: memoryview, at: int) -> dict:
    """Walk ``struct hvm_save_descriptor`` entries: HEADER first, END (length 0) last."""
    entries = []
    pos = 0
    header = None
    while True:
        if len(blob) - pos < 8:
            raise SpecError("HVM context ends without an END entry", at + pos)
        code, instance, length = struct.unpack_from("<HHI", blob, pos)
        if length > len(blob) - pos - 8:
            raise SpecError(f"HVM context entry {code} overruns the blob", at + pos)
        data = blob[pos + 8:pos + 8 + length]
        if not entries:
            if code != HVM_CODE_HEADER or length != 24:
                raise SpecError("HVM context does not start with a 24-octet HEADER", at)
            magic, version, changeset, cpuid, khz = struct.unpack("<IIQII", data)
            if magic != HVM_MAGIC or version != 1:
                raise SpecError(f"HVM HEADER magic 0x{magic:08x} version {version}", at + 8)
            header = {"changeset": changeset, "cpuid": cpuid, "gtsc_khz": khz}
        entries.append((code, instance, length))
        pos += 8 + length
        if code == HVM_CODE_END:
            if length:
                raise SpecError("HVM END entry with data", at + pos)
            break
    if pos != len(blob):
        raise SpecError("data after the HVM END entry", at + pos)
    return {"header": header, "entries": entries}


# --- Xen's own checker: verify-stream-v2 ------------------------------------------------
#: scripts/setup.sh unpacks Debian's xen-utils-4.17 package here (``dpkg-deb -x``: no
#: system install, no maintainer scripts); a failed fetch leaves its reason in
#: ``UNAVAILABLE`` beside it.
XEN_UTILS_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "xen-utils"
_DEBIAN_VERIFIER = "usr/lib/xen-*/bin/verify-stream-v2"


def xen_python_path(script: Path) -> Path | None:
    """The folder holding the ``xen`` Python package that ``script`` imports, or None.

    Debian installs ``/usr/lib/xen-4.17/bin/verify-stream-v2`` beside
    ``/usr/lib/xen-4.17/lib/python/xen``; a Xen source tree has
    ``tools/python/scripts/verify-stream-v2`` beside ``tools/python/xen``.
    """
    for folder in (script.parent.parent / "lib" / "python", script.parent.parent):
        if (folder / "xen" / "migration" / "verify.py").is_file():
            return folder
    return None


def find_verify_stream_v2() -> tuple[Path | None, str]:
    """Xen's ``verify-stream-v2`` as ``(script, "")``, or ``(None, why not)``.

    ``VMEM_XEN_VERIFY_STREAM`` (a path, either layout of :func:`xen_python_path`) wins;
    otherwise the copy scripts/setup.sh unpacked into :data:`XEN_UTILS_CACHE`, then a
    system install of Debian's xen-utils-4.17.
    """
    env = os.environ.get("VMEM_XEN_VERIFY_STREAM")
    if env:
        candidates = [Path(env)]
    else:
        candidates = [Path(p) for p in sorted(glob.glob(str(XEN_UTILS_CACHE / _DEBIAN_VERIFIER)))
                      + sorted(glob.glob("/" + _DEBIAN_VERIFIER))]
    for script in candidates:
        if script.is_file() and xen_python_path(script) is not None:
            return script, ""
    if env:
        return None, (f"VMEM_XEN_VERIFY_STREAM={env} is not a verify-stream-v2 with Xen's Python package beside "
                      "it (lib/python/xen or ../xen)")
    why = "Xen's verify-stream-v2 was not found: scripts/setup.sh unpacks Debian's xen-utils-4.17 into .cache/xen-utils"
    try:
        why += f", and it said: {(XEN_UTILS_CACHE / 'UNAVAILABLE').read_text().strip()}"
    except OSError:
        why += " (not run yet?)"
    return None, why + "; or set VMEM_XEN_VERIFY_STREAM to its path"


def run_verify_stream_v2(script: Path, path: Path, fmt: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """Run ``script -v -f fmt -i path``: exit status 0 iff Xen accepts the stream.

    The script is Python 3 (``#!/usr/bin/python3``) and needs only the pure-Python
    ``xen.util`` and ``xen.migration`` modules, so it runs under this interpreter with its
    package on ``PYTHONPATH`` for this one subprocess (Debian's compiled ``xen.lowlevel``
    modules, built for its python3.11, are never imported).
    """
    env = dict(os.environ, PYTHONPATH=str(xen_python_path(script)))
    return subprocess.run([sys.executable, str(script), "-v", "-f", fmt, "-i", str(path)],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
