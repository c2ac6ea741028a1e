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
    |   | X86_TSC_INFO | HVM_PARAMS | HVM_CONTEXT  (x86 HVM state, spec order)  |
    |   | END                                                                   |
    |   +----------------------------------------------------------------------+
    | libxl record EMULATOR_CONTEXT (u32 emulator_id, u32 index, guest context) |
    | libxl record END                                                          |
    +--------------------------------------------------------------------------+

    xl save file (vmem save / xl save): xl header (48 octets) | u32 config_len |
    JSON config, NUL-terminated | the libxl stream above, from "LibxlFmt" to libxl END

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

from vmem.pages import PAGE_SHIFT, PAGE_SIZE  # re-exported: the format's page size

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
    "VMEM_RECORD_BASE", "VMEM_RECORD_MASK", "PostcopyRecordType", "VmemRecordType",
    # vmem control protocol and preamble
    "ControlType", "PREAMBLE_MAGIC", "PREAMBLE_MAGIC_PREFIX", "PREAMBLE_LENGTH_BYTES",
    # limits
    "MAX_PAGES_PER_RECORD", "MAX_PAGE_DATA_BODY_BYTES", "MAX_RECORD_BODY_BYTES",
    "MAX_EMULATOR_CONTEXT_BYTES", "MAX_CONTROL_BODY_BYTES", "MAX_PREAMBLE_CONFIG_BYTES",
    "XEN_REC_LENGTH_MAX",
    # x86 HVM state: TSC_INFO, HVM_PARAMS, HVM_CONTEXT (hvm save format)
    "TSC_MODE_DEFAULT", "HvmParam", "HvmSpecialPage", "X86_HVM_END_SPECIAL_REGION",
    "X86_HVM_NR_SPECIAL_PAGES", "HvmSaveCode", "HVM_SAVE_CODE_MAX", "HVM_FILE_MAGIC",
    "HVM_FILE_VERSION", "HVM_SAVE_DESCRIPTOR_BYTES", "HVM_SAVE_HEADER_BYTES",
    "MAX_HVM_PARAMS",
    # xl save file
    "XL_SAVEFILE_MAGIC", "XL_BYTEORDER_VALUE", "XL_MANDATORY_FLAG_JSON",
    "XL_MANDATORY_FLAG_STREAMV2", "XL_MANDATORY_FLAGS_KNOWN", "XL_HEADER_BYTES",
    "MAX_XL_OPTIONAL_DATA_BYTES",
]

# --------------------------------------------------------------------------------------
# Sizes shared by every layer
# --------------------------------------------------------------------------------------

# PAGE_SHIFT / PAGE_SIZE (imported above from vmem.pages, where they are defined once): the
# domain header's ``page_shift`` carries PAGE_SHIFT; Xen's reader and verifier accept 12 only.

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


class VmemRecordType(enum.IntEnum):
    """vmem's other records in the libxc layer, sent only to a destination that announced
    them in READY (a reader takes them where it takes the post-copy records)."""

    #: source: the guest is about to be paused; rehearse the stop-and-copy's tail and the
    #: guest's restore once, then answer PREPARED.  Empty body.
    PREPARE_PAUSE = VMEM_RECORD_BASE | 0x20


# --------------------------------------------------------------------------------------
# vmem control protocol (back channel) and preamble (forward channel, before the stream)
# --------------------------------------------------------------------------------------
#
#   control record, little-endian:  +0 u32 type | +4 u32 length | +8 body | zero pad to 8
#   preamble:  "vmem-migrate-v1\n" (16 octets) | u32 length (LE) | JSON object (UTF-8)


class ControlType(enum.IntEnum):
    """vmem control records (the back channel between source and destination).

    The body of each type is defined by the module that sends it; JSON bodies use
    ``vmem.format.stream.encode_json_control`` / ``decode_json``.
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
    POSTCOPY_STATUS = 10  # destination: every post-copy page is placed; its fault statistics (JSON)
    POSTCOPY_RESUME = 11  # destination, after a broken link: the pages it still lacks (u64 LE pfns)
    #: destination, before any post-copy switch, when the source asked for it (preamble
    #: ``placed_acks``): it has caught up -- every page received so far is in RAM.  JSON
    #: {"pages": pages placed so far}.  Lets the source pause the guest only once the
    #: destination's backlog is placed, so that backlog stays out of the downtime.
    PLACED = 12
    #: destination, after a PREPARE_PAUSE record: it and its guest rehearsed what follows the
    #: pause.  JSON {"ms": its rehearsal's duration, "guest": whether the guest took part}.
    PREPARED = 13
    #: destination: pages the guest faulted on and still waits for.  Body: u32 count,
    #: u32 reserved (0), u64 pfn[count].  Numbered as the post-copy FAULT record it is.
    POSTCOPY_FAULT = 0x564D0015


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

# --------------------------------------------------------------------------------------
# x86 HVM state records: X86_TSC_INFO, HVM_PARAMS, HVM_CONTEXT
# --------------------------------------------------------------------------------------
#
# The spec's layout for an x86 HVM image: [v3: X86_CPUID_POLICY, X86_MSR_POLICY,
# STATIC_DATA_END], many PAGE_DATA, X86_TSC_INFO, HVM_PARAMS, HVM_CONTEXT, END; and
# "HVM_PARAMS must precede HVM_CONTEXT, as certain parameters can affect the validity of
# architectural state in the context".  libxc's restorer fails without HVM_CONTEXT (it
# hands the blob to XEN_DOMCTL_sethvmcontext).
#
#   X86_TSC_INFO body (24 octets)       HVM_PARAMS body (8 + 16 * count octets)
#   +0  u32 mode  (TSC_MODE_*)          +0  u32 count          +4 u32 reserved (0)
#   +4  u32 khz   (0 = the host's)      +8  u64 index[0]       +16 u64 value[0]
#   +8  u64 nsec  (elapsed time)        ... count entries, no padding needed
#   +16 u32 incarnation +20 u32 reserved (0)

TSC_MODE_DEFAULT = 0  # xen/include/public/domctl.h / asm-x86/time.h: TSC_MODE_DEFAULT


class HvmParam(enum.IntEnum):
    """HVM_PARAM_* indices (xen/include/public/hvm/params.h) that vmem writes or names.

    These are the ones libxc's ``write_hvm_params()`` saves (it sends only non-zero ones).
    Values are pfns, except IDENT_PT and VM_GENERATION_ID_ADDR which are guest physical
    addresses.
    """

    STORE_PFN = 1
    IOREQ_PFN = 5
    BUFIOREQ_PFN = 6
    VIRIDIAN = 9
    IDENT_PT = 12  # a guest physical *address* (the special pfn << 12)
    CONSOLE_PFN = 17
    ACPI_IOPORTS_LOCATION = 19
    PAGING_RING_PFN = 27
    MONITOR_RING_PFN = 28
    SHARING_RING_PFN = 29
    IOREQ_SERVER_PFN = 32
    NR_IOREQ_SERVER_PAGES = 33
    VM_GENERATION_ID_ADDR = 34
    X87_FIP_WIDTH = 36
    VM86_TSS_SIZED = 37
    MCA_CAP = 38


class HvmSpecialPage(enum.IntEnum):
    """libxc's x86 HVM "special pages" (xg_dom_x86.c SPECIALPAGE_*): offsets into the
    8-page special region that ends at pfn ``X86_HVM_END_SPECIAL_REGION``."""

    PAGING = 0
    ACCESS = 1  # the monitor (mem_access) ring
    SHARING = 2
    BUFIOREQ = 3
    XENSTORE = 4
    IOREQ = 5
    IDENT_PT = 6
    CONSOLE = 7


X86_HVM_END_SPECIAL_REGION = 0xFF000  # pfn: the special region ends 16 MiB below 4 GiB
X86_HVM_NR_SPECIAL_PAGES = 8
MAX_HVM_PARAMS = 64
"""HVM_PARAMS entries vmem accepts (HVM_NR_PARAMS is 39 in Xen 4.17; the body limit
would allow a million)."""

#   HVM_CONTEXT body: Xen's hvm save format (xen/include/public/hvm/save.h,
#   arch-x86/hvm/save.h), a chain of entries, little-endian:
#   +0 u16 typecode | +2 u16 instance | +4 u32 length (of the data, excluding this
#   descriptor) | data ... ; the first entry is HEADER, the last is END (length 0).
#
#   HEADER data (24 octets): u32 magic 0x54381286 | u32 version 1 | u64 changeset |
#                            u32 cpuid (CPUID[1].eax of the saving host) | u32 gtsc_khz


class HvmSaveCode(enum.IntEnum):
    """HVM save record type codes (x86, Xen 4.17: HVM_SAVE_CODE_MAX = 20)."""

    END = 0
    HEADER = 1
    CPU = 2
    PIC = 3
    IOAPIC = 4
    LAPIC = 5
    LAPIC_REGS = 6
    PCI_IRQ = 7
    ISA_IRQ = 8
    PCI_LINK = 9
    PIT = 10
    RTC = 11
    HPET = 12
    PMTIMER = 13
    MTRR = 14
    VIRIDIAN_DOMAIN = 15
    CPU_XSAVE = 16
    VIRIDIAN_VCPU = 17
    VMCE_VCPU = 18
    TSC_ADJUST = 19
    CPU_MSR = 20


HVM_SAVE_CODE_MAX = 20
HVM_FILE_MAGIC = 0x5438_1286
HVM_FILE_VERSION = 1
HVM_SAVE_DESCRIPTOR_BYTES = 8  # u16 typecode, u16 instance, u32 length
HVM_SAVE_HEADER_BYTES = 24

# --------------------------------------------------------------------------------------
# xl save file (``xl save`` / ``xl restore``): xl's header, then the libxl stream
# --------------------------------------------------------------------------------------
#
#   +0  char magic[32] "Xen saved domain, xl format\n \0 \r"
#   +32 u32 byteorder 0x01020304 (in the domain's byte order: 04 03 02 01 on x86)
#   +36 u32 mandatory_flags  bit 0 JSON config, bit 1 stream v2 (unknown bits: reject)
#   +40 u32 optional_flags   (unknown bits: reject; xl writes 0)
#   +44 u32 optional_data_len
#   +48 optional data: u32 config_len | config (JSON text, NUL-terminated; config_len
#       counts the NUL) ... anything after the config within optional_data_len is skipped
#   +48+optional_data_len: the libxl stream ("LibxlFmt" ...), up to its END record
#
# Source: tools/xl/xl_utils.h / xl_saverestore.c (struct save_file_header).

XL_SAVEFILE_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER_VALUE = 0x0102_0304
XL_MANDATORY_FLAG_JSON = 1 << 0
XL_MANDATORY_FLAG_STREAMV2 = 1 << 1
XL_MANDATORY_FLAGS_KNOWN = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2
XL_HEADER_BYTES = 48
MAX_XL_OPTIONAL_DATA_BYTES = 1 << 20
"""Optional data (the domain config) vmem accepts in an xl header."""

assert len(XL_SAVEFILE_MAGIC) == 32
