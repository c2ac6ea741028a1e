"""Where things are in a KVM guest's physical memory, and the guest program's parameters.

Guest-physical memory = the RAM memfd, from address 0, in one memslot (slot 0)::

    pages 0 .. L-1          the ledger layout of guests/memory.py (header, ledger, stamped
                            data pages): the host checks it with the process guest's code
    pages L .. L+15         firmware, written by the host at boot and migrated like any RAM:
                            +0,+1 the program (program.bin), +2 the stamp table K,
                            +3 params/state page, +4 stack, +5 PML4, +6 PDPT, +7..+10 PDs
    STATUS_GPA (slot 1)     one page that is not RAM: the guest's status device, the last
                            page of the control block's context area (STATUS_OFFSET); its
                            words sit at the control block header's offsets (STEPS at 0x48...)
                            but the host reads no command field there

L = npages - FIRMWARE_PAGES.  Page tables identity-map the low 4 GiB with 2 MiB pages,
accessed and dirty bits preset (the page walker never writes them).  RAM ends below
MAX_RAM_BYTES so the LAPIC (0xfee00000) and the status page stay outside it.
"""
from __future__ import annotations

import enum
import os

import numpy as np

from guests.control import CONTROL_BYTES
from vmem.pages import PAGE_SIZE

FIRMWARE_PAGES = 16
FW_CODE, FW_K, FW_PARAMS, FW_STACK, FW_PML4, FW_PDPT, FW_PD = 0, 2, 3, 4, 5, 6, 7
CODE_MAX_BYTES = 2 * PAGE_SIZE
STATUS_GPA = 0xF000_0000
MAX_RAM_BYTES = 0xC000_0000  # 3 GiB: one memslot below the PCI hole
RAM_SLOT, STATUS_SLOT = 0, 1
#: the status page's offset in the control block memfd (its last page; a KVM context is ~6 KiB)
STATUS_OFFSET = CONTROL_BYTES - PAGE_SIZE

PROGRAM_BIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "program.bin")
PROGRAM_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "program.S")

PARAMS_MAGIC = int.from_bytes(b"vmemKVM1", "little")


class P(enum.IntEnum):
    """u64 words of the params/state page (program.S ``P_*``)."""

    MAGIC = 0
    PATTERN = 1
    FIRST_DATA = 2
    DATA_PAGES = 3
    TICKS_PER_PAGE = 4
    BATCH = 5
    HOT_PAGES = 6
    HOT_THRESH = 7
    STRIDE = 8
    RNG = 9
    SWEEP_POS = 10
    VSTART = 11
    PACED = 12
    STEPS = 13
    PAGES_WRITTEN = 14
    STOLEN = 15
    IDLE_TICKS = 16
    THROTTLED_NS = 17


#: status-page words beyond guests/control.py's Field (program.S ``S_*``), as u64 indices
S_CLK_TSC_BASE, S_CLK_NS_BASE, S_CLK_MULT, S_GAP_FROM_NS, S_SLEEP_UNTIL_NS, S_ERROR = (
    0x200 // 8, 0x208 // 8, 0x210 // 8, 0x218 // 8, 0x220 // 8, 0x228 // 8)

PORT_SLEEP, PORT_FATAL = 0x10, 0x11

#: workload name -> program.S pattern number
PATTERNS = {"idle": 0, "uniform": 1, "hotcold": 2, "sweep": 3}
#: parameters each workload takes (and their defaults), as the process workloads name them
DEFAULTS = {"rate": 50, "batch": 8, "hot_pages": 0.1, "hot_writes": 0.9, "stride": 1, "fill": True}


def layout_pages(npages: int) -> int:
    """Pages of the ledger layout (the GuestMemory view) in a RAM of ``npages``."""
    return npages - FIRMWARE_PAGES


def firmware_gpa(npages: int, item: int) -> int:
    return (layout_pages(npages) + item) * PAGE_SIZE


def check_size(size_bytes: int) -> None:
    """Raises ValueError naming the limit when a KVM guest cannot have ``size_bytes``."""
    if size_bytes > MAX_RAM_BYTES:
        raise ValueError(f"KVM guests are limited to {MAX_RAM_BYTES >> 20} MiB of RAM here (one memslot below "
                         f"the LAPIC window at 0xfee00000); got {size_bytes >> 20} MiB")
    if size_bytes < (FIRMWARE_PAGES + 64) * PAGE_SIZE:
        raise ValueError(f"a KVM guest needs at least {(FIRMWARE_PAGES + 64) * 4} KiB of RAM")


def program_bytes() -> bytes:
    with open(PROGRAM_BIN, "rb") as f:
        code = f.read()
    if len(code) > CODE_MAX_BYTES:
        raise ValueError(f"program.bin is {len(code)} bytes; the firmware area holds {CODE_MAX_BYTES}")
    return code


def page_tables(npages: int) -> np.ndarray:
    """PML4, PDPT and 4 PDs (6 pages of u64) identity-mapping 4 GiB with 2 MiB pages."""
    tables = np.zeros((6, PAGE_SIZE // 8), np.uint64)
    present_rw_accessed = 0x23
    tables[0, 0] = firmware_gpa(npages, FW_PDPT) | present_rw_accessed
    for i in range(4):
        tables[1, i] = firmware_gpa(npages, FW_PD + i) | present_rw_accessed
        big = np.arange(512, dtype=np.uint64) * np.uint64(2 << 20) + np.uint64(i << 30)
        tables[2 + i] = big | np.uint64(0xE3)  # present, rw, accessed, dirty, 2 MiB page
    return tables


def params_page(npages: int, workload: str, params: dict, seed: int, tsc_hz: int) -> np.ndarray:
    """The params/state page for ``workload`` with ``params``.

    Raises:
        ValueError: unknown workload or parameter, or a value out of range (named).
    """
    if workload not in PATTERNS:
        raise ValueError(f"the KVM guest runs {', '.join(PATTERNS)}; not {workload!r}")
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown KVM workload parameter(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(DEFAULTS)}")
    p = DEFAULTS | params
    layout = layout_pages(npages)
    first_data = 1 + -(-layout * 4 // PAGE_SIZE)
    data_pages = layout - first_data
    rate, batch = float(p["rate"]), int(p["batch"])
    if rate < 0 or not 1 <= batch <= 4096:
        raise ValueError(f"rate must be >= 0 and batch in 1..4096; got rate={rate}, batch={batch}")
    if not 0 < float(p["hot_pages"]) <= 1 or not 0 <= float(p["hot_writes"]) <= 1:
        raise ValueError("hot_pages must be in (0, 1] and hot_writes in [0, 1]")
    page = np.zeros(PAGE_SIZE // 8, np.uint64)
    page[P.MAGIC] = PARAMS_MAGIC
    page[P.PATTERN] = PATTERNS[workload]
    page[P.FIRST_DATA] = first_data
    page[P.DATA_PAGES] = data_pages
    page[P.TICKS_PER_PAGE] = int(tsc_hz / rate) if rate > 0 else 0
    page[P.BATCH] = batch
    page[P.HOT_PAGES] = max(1, int(float(p["hot_pages"]) * data_pages))
    page[P.HOT_THRESH] = min(int(float(p["hot_writes"]) * (1 << 32)), (1 << 32) - 1)
    page[P.STRIDE] = max(1, int(p["stride"])) % data_pages or 1
    page[P.RNG] = (seed * 0x9E3779B97F4A7C15 + 0x1234567) % (1 << 64) or 1
    page[P.IDLE_TICKS] = tsc_hz // 100
    return page


def parse_params(workload: str, items: list[str]) -> dict:
    """``-W key=value`` strings for the KVM guest program, typed like :data:`DEFAULTS`.

    Raises:
        ConfigError: unknown workload, malformed item or unknown key (named).
    """
    from guests.workload import _convert
    from vmem.errors import ConfigError

    if workload not in PATTERNS:
        raise ConfigError("--workload", f"the KVM guest runs {', '.join(PATTERNS)}; not {workload!r}")
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in DEFAULTS:
            raise ConfigError(item, f"expected key=value with key one of {', '.join(DEFAULTS)}")
        out[key] = _convert(key, text, DEFAULTS[key])
    return out
