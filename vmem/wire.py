"""Every wire constant vmem puts on a socket or in a file, in one table.

What travels, and where each number below appears::

    forward channel (source -> destination)
    +--------------------------------------------------------------------------+
    | preamble: "vmem-migrate-v1\\n" | u32 len (LE) | JSON config             |  vmem only
    +--------------------------------------------------------------------------+
    | libxl header (16 octets, BIG-endian): "LibxlFmt" | version | options      |  Xen libxl
    | libxl record LIBXC_CONTEXT (length 0)                                     |
    |   +----------------------------------------------------------------------+
    |   | libxc image header (24 octets, BIG-endian): marker | "XENF" | ver ... |  Xen libxc
    |   | libxc domain header (16 octets, little-endian)                        |
    |   | [v3: X86_{CPUID,MSR}_POLICY ...] [v3: STATIC_DATA_END]                |
    |   | PAGE_DATA ... (vmem post-copy records 0x564D00xx here, later)         |
    |   | END                                                                   |
    |   +----------------------------------------------------------------------+
    | libxl record EMULATOR_CONTEXT (u32 emulator_id, u32 index, guest context) |
    | libxl record END                                                          |
    +--------------------------------------------------------------------------+

    back channel (destination -> source)
    +--------------------------------------------------------------------------+
    | vmem control records: u32 type | u32 length | body | zero pad to 8 (LE)  |  vmem only
    +--------------------------------------------------------------------------+

Every record in both layers of the Xen stream and in the control protocol has the same
frame: ``u32 type, u32 body_length`` (little-endian on x86), the body, then 0-7 zero
octets so that the record ends on an 8-octet boundary.  Only the libxl header and the
libxc image header are big-endian, "regardless of the setting of the endianness bit".

Sources: xen.git ``docs/specs/libxc-migration-stream.pandoc`` (revision 3: stream v2 plus
the v3 additions 0x10-0x12), ``docs/specs/libxl-migration-stream.pandoc`` (revision 1,
plus CHECKPOINT_STATE from libxl), ``xen/include/public/domctl.h`` (XEN_DOMCTL_PFINFO_*),
``tools/libs/guest/xg_sr_stream_format.h`` and the reference readers in
``tools/python/xen/migration``.  The byte-level pictures live in ``docs/stream.md``;
``vmem/stream.py`` encodes and decodes them.

Wire enums are ``enum.IntEnum`` with explicit numbers.  Xen's enums keep Xen's numbers
(and Xen's meaning of 0); vmem's own enums reserve 0 as ``INVALID`` so that a zeroed
buffer never decodes as a meaningful message.
"""
from __future__ import annotations

import enum

__all__ = [
    # sizes
    "PAGE_SHIFT", "PAGE_SIZE", "RECORD_ALIGN", "RECORD_HEADER_BYTES",
    # libxc headers
    "IHDR_MARKER", "IHDR_ID", "IHDR_VERSION_2", "IHDR_VERSION_3", "IHDR_VERSIONS",
    "IHDR_OPT_BIG_ENDIAN", "IHDR_OPT_RESERVED_MASK", "IHDR_BYTES", "DHDR_BYTES",
    "DomainType", "SUPPORTED_DOMAIN_TYPES",
    # libxc records
    "LibxcRecordType", "REC_TYPE_OPTIONAL", "V3_RECORD_TYPES", "STATIC_DATA_RECORD_TYPES",
    "PV_ONLY_RECORD_TYPES",
    "PageType", "PFN_TYPE_SHIFT", "PFN_MASK", "PFN_RESERVED_MASK", "PFN_TYPE_MASK",
    "PAGE_TYPE_KNOWN", "PAGE_TYPE_HAS_DATA",
    "PAGE_DATA_HEADER_BYTES", "X86_TSC_INFO_BYTES", "HVM_PARAMS_HEADER_BYTES",
    "HVM_PARAMS_ENTRY_BYTES", "X86_CPUID_LEAF_BYTES", "X86_MSR_ENTRY_BYTES",
    # libxl
    "LIBXL_IDENT", "LIBXL_VERSION", "LIBXL_OPT_BIG_ENDIAN", "LIBXL_OPT_LEGACY",
    "LIBXL_OPT_RESERVED_MASK", "LIBXL_HDR_BYTES",
    "LibxlRecordType", "EmulatorId", "EMULATOR_HEADER_BYTES", "VMEM_EMULATOR_ID",
    # vmem stream records
    "VMEM_RECORD_BASE", "VMEM_RECORD_MASK", "PostcopyRecordType",
    # vmem control protocol and preamble
    "ControlType", "PREAMBLE_MAGIC", "PREAMBLE_MAGIC_PREFIX", "PREAMBLE_LENGTH_BYTES",
    # limits
    "MAX_PAGES_PER_RECORD", "MAX_PAGE_DATA_BODY_BYTES", "MAX_RECORD_BODY_BYTES",
    "MAX_EMULATOR_CONTEXT_BYTES", "MAX_CONTROL_BODY_BYTES", "MAX_PREAMBLE_CONFIG_BYTES",
    "XEN_REC_LENGTH_MAX",
]

# --------------------------------------------------------------------------------------
# Sizes shared by every layer
# --------------------------------------------------------------------------------------

PAGE_SHIFT = 12
"""log2 of the guest page size; the domain header's ``page_shift``.  Xen's reader and
verifier accept 12 only."""

PAGE_SIZE = 1 << PAGE_SHIFT  # 4096 octets

RECORD_ALIGN = 8
"""Every record (libxc, libxl, vmem control) ends on a multiple of 8 octets."""

RECORD_HEADER_BYTES = 8  # u32 type, u32 body_length

# --------------------------------------------------------------------------------------
# libxc image header and domain header
# --------------------------------------------------------------------------------------
#
#   image header, BIG-endian, 24 octets     domain header, stream endianness, 16 octets
#   +0  u64 marker  0xFFFFFFFFFFFFFFFF       +0  u32 type        (DomainType)
#   +8  u32 id      0x58454E46 "XENF"        +4  u16 page_shift  (12)
#   +12 u32 version 2 or 3                   +6  u16 reserved    (0)
#   +16 u16 options bit 0 = big-endian       +8  u32 xen_major
#   +18 u16 reserved (0)                     +12 u32 xen_minor
#   +20 u32 reserved (0)

IHDR_MARKER = 0xFFFF_FFFF_FFFF_FFFF
"""All ones: legacy (pre-v2) images have at least one zero bit in their first 8 octets."""

IHDR_ID = 0x58454E46  # "XENF" in ASCII
IHDR_VERSION_2 = 2
IHDR_VERSION_3 = 3  # Xen 4.14+: adds STATIC_DATA_END / X86_CPUID_POLICY / X86_MSR_POLICY
IHDR_VERSIONS = (IHDR_VERSION_2, IHDR_VERSION_3)
"""Image versions vmem reads and writes.  Compatibility rule (spec): a tool supporting
version V saves V and restores V and V-1.  Xen 4.17 restores 2 and 3."""

IHDR_OPT_BIG_ENDIAN = 1 << 0  # 0 = little-endian, which the spec mandates for x86 and ARM
IHDR_OPT_RESERVED_MASK = 0xFFFE  # options bits 1-15
IHDR_BYTES = 24
DHDR_BYTES = 16


class DomainType(enum.IntEnum):
    """The domain header's ``type`` field (spec numbering; 0 is "Reserved")."""

    INVALID = 0x0000
    X86_PV = 0x0001
    X86_HVM = 0x0002
    # 3 was PVHv1, which Xen removed; PVHv2 guests (what Xen 4.17 boots) are HVM
    # containers and libxc saves them with type X86_HVM.  Its restorer rejects 3.
    X86_PVH = 0x0003
    ARM = 0x0004  # listed by the spec, but no ARM stream format is specified


SUPPORTED_DOMAIN_TYPES = frozenset({DomainType.X86_HVM})
"""Domain types vmem writes and reads.  vmem guests have no PV page tables or P2M, so
they are described as x86 HVM, the type Xen uses for HVM and PVH guests alike."""

# --------------------------------------------------------------------------------------
# libxc records
# --------------------------------------------------------------------------------------


class LibxcRecordType(enum.IntEnum):
    """libxc record types, with the numbers of the spec (revision 3)."""

    END = 0x0000_0000
    PAGE_DATA = 0x0000_0001
    X86_PV_INFO = 0x0000_0002
    X86_PV_P2M_FRAMES = 0x0000_0003
    X86_PV_VCPU_BASIC = 0x0000_0004
    X86_PV_VCPU_EXTENDED = 0x0000_0005
    X86_PV_VCPU_XSAVE = 0x0000_0006
    SHARED_INFO = 0x0000_0007
    X86_TSC_INFO = 0x0000_0008  # "TSC_INFO" in revision 1 of the spec
    HVM_CONTEXT = 0x0000_0009
    HVM_PARAMS = 0x0000_000A
    TOOLSTACK = 0x0000_000B  # deprecated: "should not be used"
    X86_PV_VCPU_MSRS = 0x0000_000C
    VERIFY = 0x0000_000D
    CHECKPOINT = 0x0000_000E  # Remus/COLO checkpointed streams only
    CHECKPOINT_DIRTY_PFN_LIST = 0x0000_000F  # COLO back channel only
    # --- stream version 3 (Xen 4.14) ---
    STATIC_DATA_END = 0x0000_0010
    X86_CPUID_POLICY = 0x0000_0011
    X86_MSR_POLICY = 0x0000_0012
    # 0x13 - 0x7FFFFFFF: reserved for future *mandatory* upstream records.
    # 0x80000000 - 0xFFFFFFFF: reserved for future *optional* records.


REC_TYPE_OPTIONAL = 0x8000_0000
"""Bit 31 of a libxc record type: set = optional.  A restorer must fail on an unknown
mandatory record and may ignore an unknown optional one (libxc does ignore them)."""

V3_RECORD_TYPES = frozenset({
    LibxcRecordType.STATIC_DATA_END,
    LibxcRecordType.X86_CPUID_POLICY,
    LibxcRecordType.X86_MSR_POLICY,
})
"""Records that exist only from image version 3 on."""

STATIC_DATA_RECORD_TYPES = frozenset({
    LibxcRecordType.X86_CPUID_POLICY,
    LibxcRecordType.X86_MSR_POLICY,
})
"""Records that must precede STATIC_DATA_END (v3: ahead of any memory/register content)."""

PV_ONLY_RECORD_TYPES = frozenset({
    LibxcRecordType.X86_PV_INFO,
    LibxcRecordType.X86_PV_P2M_FRAMES,
    LibxcRecordType.X86_PV_VCPU_BASIC,
    LibxcRecordType.X86_PV_VCPU_EXTENDED,
    LibxcRecordType.X86_PV_VCPU_XSAVE,
    LibxcRecordType.X86_PV_VCPU_MSRS,
    LibxcRecordType.SHARED_INFO,
})

#   PAGE_DATA body (little-endian):
#   +0  u32 count (1..MAX_PAGES_PER_RECORD)   +4 u32 reserved (0)
#   +8  u64 pfn[count]: bits 63-60 PageType, 59-52 reserved (0), 51-0 pfn
#   ... page_data[N]: 4096 octets for each pfn whose type carries data, in pfn[] order

PAGE_DATA_HEADER_BYTES = 8  # count + reserved, before the pfn array
PFN_TYPE_SHIFT = 60  # XEN_DOMCTL_PFINFO_LTAB_SHIFT (28) + 32
PFN_MASK = (1 << 52) - 1
PFN_RESERVED_MASK = ((1 << 60) - 1) & ~PFN_MASK  # bits 52-59
PFN_TYPE_MASK = 0xF << PFN_TYPE_SHIFT


class PageType(enum.IntEnum):
    """XEN_DOMCTL_PFINFO_* page types as stored in bits 63-60 of a PAGE_DATA pfn.

    0x5-0x8 are reserved: "restoring an image with unrecognised page types shall fail".
    """

    NOTAB = 0x0  # normal page; the only type vmem's guests have
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    L1TAB_PIN = 0x9
    L2TAB_PIN = 0xA
    L3TAB_PIN = 0xB
    L4TAB_PIN = 0xC
    BROKEN = 0xD  # no page data
    XALLOC = 0xE  # allocate only; no page data
    XTAB = 0xF  # invalid page (e.g. ballooned out during migration); no page data


# Indexed by the 4-bit type: lookup tables so that a reader classifies 1024 pfns with one
# numpy fancy-index instead of a Python loop.
_PAGE_TYPE_VALUES = frozenset(int(t) for t in PageType)
PAGE_TYPE_KNOWN = tuple(t in _PAGE_TYPE_VALUES for t in range(16))
PAGE_TYPE_HAS_DATA = tuple(
    PAGE_TYPE_KNOWN[t] and t not in (PageType.BROKEN, PageType.XALLOC, PageType.XTAB)
    for t in range(16)
)

X86_TSC_INFO_BYTES = 24  # u32 mode, u32 khz, u64 nsec, u32 incarnation, u32 reserved
HVM_PARAMS_HEADER_BYTES = 8  # u32 count, u32 reserved
HVM_PARAMS_ENTRY_BYTES = 16  # u64 index, u64 value
X86_CPUID_LEAF_BYTES = 24  # xen_cpuid_leaf_t: u32 leaf, subleaf, a, b, c, d
X86_MSR_ENTRY_BYTES = 16  # xen_msr_entry_t: u32 idx, u32 flags, u64 val

# --------------------------------------------------------------------------------------
# libxl header and records
# --------------------------------------------------------------------------------------
#
#   libxl header, BIG-endian, 16 octets
#   +0  u64 ident   0x4C6962786C466D74 "LibxlFmt"
#   +8  u32 version 2
#   +12 u32 options bit 0 = big-endian, bit 1 = converted from a legacy stream

LIBXL_IDENT = 0x4C69_6278_6C46_6D74  # "LibxlFmt" in ASCII
LIBXL_VERSION = 2
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1
LIBXL_OPT_RESERVED_MASK = 0xFFFF_FFFC  # options bits 2-31
LIBXL_HDR_BYTES = 16


class LibxlRecordType(enum.IntEnum):
    """libxl record types (spec revision 1, plus CHECKPOINT_STATE which libxl defines)."""

    END = 0x0000_0000
    LIBXC_CONTEXT = 0x0000_0001  # length 0: "hand the stream to libxc" - libxc stream follows
    EMULATOR_XENSTORE_DATA = 0x0000_0002
    EMULATOR_CONTEXT = 0x0000_0003
    CHECKPOINT_END = 0x0000_0004  # Remus/COLO only
    CHECKPOINT_STATE = 0x0000_0005  # COLO only


class EmulatorId(enum.IntEnum):
    """The ``emulator_id`` of libxl's EMULATOR_* records (0 is Xen's "Unknown")."""

    UNKNOWN = 0x0000_0000
    QEMU_TRADITIONAL = 0x0000_0001
    QEMU_UPSTREAM = 0x0000_0002


EMULATOR_HEADER_BYTES = 8  # u32 emulator_id, u32 index

VMEM_EMULATOR_ID = EmulatorId.UNKNOWN
"""The emulator id vmem writes on the guest-context EMULATOR_CONTEXT record.

Xen's verifier (``verify-stream-v2``) rejects ids other than 0-2, so a vmem-private id
would make a saved vmem stream fail Xen's own check.  Of the three, only UNKNOWN does not
claim the blob is a QEMU device-state image (which it is not).  Note that libxl refuses
EMULATOR_* records for non-HVM domains and hands HVM ones to QEMU, so the planned Xen
backend must leave this record out of streams given to ``xl migrate-receive``."""

# --------------------------------------------------------------------------------------
# vmem's own stream records (post-copy)
# --------------------------------------------------------------------------------------
#
# Why 0x564D00xx:
#  * The 2017 postcopy RFC (xen-devel, Joshua Otto) numbered its records 0x10-0x16.
#    Upstream later allocated 0x10-0x12 to STATIC_DATA_END / X86_CPUID_POLICY /
#    X86_MSR_POLICY (stream v3), and the next free number 0x13 has already been proposed
#    upstream (DOMAIN_CONTEXT).  Upstream allocates sequentially from the bottom of the
#    mandatory range, so any low number will collide again.
#  * They must stay in the *mandatory* range (bit 31 clear).  The spec lets a restorer
#    ignore optional records (bit 31 set), and libxc does ("Ignoring optional record"):
#    a Xen restorer that skipped POSTCOPY_BEGIN would resume a guest with missing RAM.
#    In the mandatory range an unaware restorer fails loudly instead.
#  * 0x564D = "VM" in ASCII: far above anything upstream will reach, easy to spot in a
#    hex dump, and the low 16 bits keep the RFC's number (RFC 0x10 -> 0x564D0010), so the
#    RFC's documentation maps one-to-one.  0x564D0011 (the RFC's POSTCOPY_PFNS_BEGIN) is
#    left unassigned: POSTCOPY_PFNS follows POSTCOPY_BEGIN directly.

VMEM_RECORD_BASE = 0x564D_0000
VMEM_RECORD_MASK = 0xFFFF_0000  # type & VMEM_RECORD_MASK == VMEM_RECORD_BASE: vmem's block


class PostcopyRecordType(enum.IntEnum):
    """vmem post-copy records, carried in the libxc layer (and FAULT on the back channel).

    POSTCOPY PAGE_DATA has the PAGE_DATA body layout.
    """

    BEGIN = VMEM_RECORD_BASE | 0x10
    PFNS = VMEM_RECORD_BASE | 0x12
    TRANSITION = VMEM_RECORD_BASE | 0x13
    PAGE_DATA = VMEM_RECORD_BASE | 0x14
    FAULT = VMEM_RECORD_BASE | 0x15
    COMPLETE = VMEM_RECORD_BASE | 0x16


# --------------------------------------------------------------------------------------
# vmem control protocol (back channel) and preamble (forward channel, before the stream)
# --------------------------------------------------------------------------------------
#
#   control record, little-endian:  +0 u32 type | +4 u32 length | +8 body | zero pad to 8
#   preamble:  "vmem-migrate-v1\n" (16 octets) | u32 length (LE) | JSON object (UTF-8)


class ControlType(enum.IntEnum):
    """vmem control records (the back channel between source and destination).

    The body of each type is defined by the module that sends it; JSON bodies use
    ``vmem.stream.encode_json_control`` / ``decode_json``.
    """

    INVALID = 0  # never sent: a zeroed header must not mean anything
    READY = 1  # destination: guest spawned, RAM mapped, ready to receive the stream
    ERROR = 2  # either side: {"phase", "message", ...}; the migration is over
    RESUMED = 3  # destination: the guest ran its first step at the destination
    DIGESTS = 4  # per-page digests for verification
    COMMIT = 5  # source: the destination owns the guest now
    ROLLBACK = 6  # source: abort; destination discards everything
    DEST_REPORT = 7  # destination: its half of the run report
    SHUTDOWN = 8  # source: close the session
    GUEST_CHECK = 9  # guest invariant check request/result


PREAMBLE_MAGIC = b"vmem-migrate-v1\n"
"""The banner that opens the forward channel, like ``xl migrate``'s.  16 octets."""

PREAMBLE_MAGIC_PREFIX = b"vmem-migrate-v"  # recognises other vmem protocol versions
PREAMBLE_LENGTH_BYTES = 4  # u32 little-endian length of the JSON config that follows

# --------------------------------------------------------------------------------------
# Limits: every length and count read from the wire is checked against these before
# anything is allocated or read ("to prevent DOS attacks", as the loaders we learn from say).
# --------------------------------------------------------------------------------------

MAX_PAGES_PER_RECORD = 1024
"""Pages (pfns) per PAGE_DATA record: libxc's MAX_BATCH_SIZE."""

MAX_PAGE_DATA_BODY_BYTES = (
    PAGE_DATA_HEADER_BYTES + 8 * MAX_PAGES_PER_RECORD + PAGE_SIZE * MAX_PAGES_PER_RECORD
)  # 4,202,504 octets: a full record never needs padding (all parts are multiples of 8)

MAX_RECORD_BODY_BYTES = 16 << 20
"""Body of any other record (HVM_CONTEXT, policies, emulator records ...): 16 MiB.
Tighter than Xen's REC_LENGTH_MAX because nothing vmem sends comes close."""

MAX_EMULATOR_CONTEXT_BYTES = 1 << 20
"""Guest context carried in EMULATOR_CONTEXT, excluding its 8-octet emulator header: the
guest control block's context area is 1 MiB, so a larger blob cannot be restored."""

MAX_CONTROL_BODY_BYTES = 64 << 20
"""Body of one control record: room for one u64 digest per page of a 32 GiB guest."""

MAX_PREAMBLE_CONFIG_BYTES = 1 << 20  # JSON config in the preamble

XEN_REC_LENGTH_MAX = 128 << 20
"""libxc's own REC_LENGTH_MAX ("somewhat arbitrary - 128MB"), for reference."""
