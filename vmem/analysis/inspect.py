"""Take a migration stream apart (``vmem inspect FILE``) -- an ``xl save`` file, a stream
``xl migrate`` wrote, or one of vmem's own -- and show its records, the pages of each
round and a page map.  Real Xen streams become teaching material.

Rounds are not marked in a libxc stream.  libxc sends every round in ascending pfn order
(``send_all_pages`` first, then each dirty bitmap scanned from pfn 0), so a PAGE_DATA
record whose first pfn is not above the previous record's last pfn starts a new round.
The last round before the register records (X86_TSC_INFO / HVM_CONTEXT) is the one
libxc sent with the guest paused: the stop-and-copy.  This is an inference from how
libxc writes, stated as such in the output.

The page map (``--pagemap DIR``) is :mod:`vmem.migration.pagemap`'s format, drawn by
:mod:`vmem.analysis.pagemap`: each round's pages as "sent", the next round's as what the
guest dirtied meanwhile; times are round numbers (a file carries no clock).

The command line, ``vmem inspect``, is :mod:`vmem.cli.inspect_cmd`.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from vmem.errors import StreamError
from vmem.format.hvm import parse_hvm_params
from vmem.format.stream import StreamReader
from vmem.format.wire import HvmParam, LibxcRecordType, PageType
from vmem.format.xl import XL_MAGIC, parse_xl_header

__all__ = ["inspect_stream", "print_inspection", "write_pagemap"]

_PAGE_TYPES_WITHOUT_DATA = (PageType.BROKEN, PageType.XALLOC, PageType.XTAB)


class _Rounds:
    """Groups PAGE_DATA records into rounds (see the module doc) and keeps their pfns."""

    def __init__(self):
        self.rounds: list[dict] = []
        self._pfns: list[list[np.ndarray]] = []
        self._last_pfn = -1

    def add(self, pfns: np.ndarray, types: np.ndarray, offset: int) -> None:
        if not len(pfns):
            return
        first = int(pfns[0])
        if not self.rounds or first <= self._last_pfn:
            self.rounds.append({"round": len(self.rounds), "records": 0, "pfns": 0, "pages_with_data": 0,
                                "pages_without_data": 0, "first_offset": offset, "min_pfn": first, "max_pfn": first})
            self._pfns.append([])
        r = self.rounds[-1]
        nodata = np.isin(types, [int(t) for t in _PAGE_TYPES_WITHOUT_DATA])
        r["records"] += 1
        r["pfns"] += len(pfns)
        r["pages_with_data"] += int((~nodata).sum())
        r["pages_without_data"] += int(nodata.sum())
        r["min_pfn"] = min(r["min_pfn"], int(pfns.min()))
        r["max_pfn"] = max(r["max_pfn"], int(pfns.max()))
        self._pfns[-1].append(pfns[~nodata].astype(np.int64))
        self._last_pfn = int(pfns[-1])

    def pfns(self, i: int) -> np.ndarray:
        parts = self._pfns[i]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def inspect_stream(path: str) -> dict:
    """Read the whole stream in ``path``; return what :func:`print_inspection` shows.

    Keys: ``file``, ``bytes``, ``xl`` (the xl header's flags and the domain config, or
    None for a bare libxl stream), ``stream`` (versions, domain type), ``records`` (one
    entry per non-page record, consecutive PAGE_DATA records collapsed into one entry
    with a count), ``rounds`` (per round: records, pfns, pages with/without data, pfn
    range), ``hvm_params`` (by name), ``page_data_bytes``, ``last_round_is_stop_and_copy``
    and the private ``_round_pfns`` (arrays, for the page map).

    Raises:
        StreamError: the stream is malformed (with the offset).
        OSError: the file cannot be read.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(len(XL_MAGIC))
        f.seek(0)
        xl = None
        base = 0
        if magic == XL_MAGIC:
            hdr = parse_xl_header(f.read)
            base = hdr.nbytes
            xl = {"mandatory_flags": hdr.mandatory_flags, "optional_flags": hdr.optional_flags,
                  "header_bytes": hdr.nbytes, "config": hdr.config}
        reader = StreamReader(f.read, f.readinto, base_offset=base, xen_record_order=True)
        info = reader.read_begin()
        records: list[dict] = []
        rounds = _Rounds()
        page_bytes = 0
        hvm_params: dict[str, int] = {}
        registers_at_round = None
        while not reader.finished:
            rec = reader.next_record()
            if hasattr(rec, "pfns"):
                rounds.add(rec.pfns, rec.types, rec.offset)
                page_bytes += rec.payload_bytes
                reader.skip_page_payload()
                if records and records[-1]["type"] == rec.type.name and records[-1]["layer"] == "libxc":
                    records[-1]["count"] += 1
                    records[-1]["pages"] += rec.npages_with_data
                else:
                    records.append({"offset": rec.offset, "layer": "libxc", "type": rec.type.name, "count": 1,
                                    "pages": rec.npages_with_data})
                continue
            entry = {"offset": rec.offset, "layer": rec.layer, "type": rec.type.name, "length": len(rec.body)}
            if rec.type is LibxcRecordType.HVM_PARAMS and rec.layer == "libxc":
                params = parse_hvm_params(rec.body, rec.offset)
                hvm_params = {_param_name(k): v for k, v in sorted(params.items())}
                entry["params"] = len(params)
            if rec.layer == "libxc" and rec.type in (LibxcRecordType.X86_TSC_INFO, LibxcRecordType.HVM_CONTEXT) \
                    and registers_at_round is None:
                registers_at_round = len(rounds.rounds)
            records.append(entry)
    return {
        "file": path, "bytes": size, "xl": xl,
        "stream": {"libxl_version": info.libxl_version, "libxc_version": info.version,
                   "domain_type": info.domain_type.name, "page_size": info.page_size,
                   "xen": f"{info.xen_major}.{info.xen_minor}", "stream_offset": base},
        "records": records, "rounds": rounds.rounds, "hvm_params": hvm_params, "page_data_bytes": page_bytes,
        "last_round_is_stop_and_copy": len(rounds.rounds) > 1 and registers_at_round == len(rounds.rounds),
        "_round_pfns": [rounds.pfns(i) for i in range(len(rounds.rounds))],
    }


def _param_name(index: int) -> str:
    try:
        return HvmParam(index).name
    except ValueError:
        return f"param_{index}"


def write_pagemap(result: dict, out_dir: str) -> list[str]:
    """The page map of an inspected stream into ``out_dir`` (``pagemap.npz``, ``.png``,
    ``.html``).  Pages span pfn 0 to the largest pfn that carried data."""
    from vmem.analysis.pagemap import render_pagemap
    from vmem.migration.pagemap import PagemapRecorder

    per_round = result["_round_pfns"]
    if not per_round:
        raise StreamError("the stream carries no page data: no page map to draw", -1)
    npages = int(max((int(p.max()) for p in per_round if len(p)), default=0)) + 1
    rec = PagemapRecorder(npages, t0=0.0)
    rec.data_pages(np.unique(np.concatenate(per_round)))
    sc = result["last_round_is_stop_and_copy"]
    n_pre = len(per_round) - 1 if sc else len(per_round)
    empty = np.empty(0, dtype=np.int64)
    for i in range(n_pre):
        rec.precopy_round(per_round[i], per_round[i + 1] if i + 1 < len(per_round) else empty, float(i), float(i + 1))
    if sc:
        rec.stop_and_copy(per_round[-1], float(n_pre), float(n_pre + 1))
    os.makedirs(out_dir, exist_ok=True)
    npz = rec.save(os.path.join(out_dir, "pagemap.npz"))
    name = (result.get("xl") or {}).get("config", {}) or {}
    title = f"page map of {os.path.basename(result['file'])}" + \
        (f" (domain {name.get('c_info', {}).get('name')})" if name.get("c_info") else "")
    out = render_pagemap(npz, out_dir, name="pagemap", title=title)
    return [npz, out["png"], out["html"]]


def print_inspection(r: dict, out=None) -> None:
    """A plain-text report of :func:`inspect_stream`'s result."""
    out = out or sys.stdout
    w = out.write
    w(f"{r['file']}: {r['bytes']:,} bytes\n")
    if r["xl"]:
        c = r["xl"]["config"] or {}
        ci = c.get("c_info", {})
        bi = c.get("b_info", {})
        w(f"xl save-file header: {r['xl']['header_bytes']} bytes, mandatory flags 0x{r['xl']['mandatory_flags']:x}; "
          f"domain {ci.get('name')!r} type {ci.get('type')}, {bi.get('max_memkb', 0) // 1024} MiB, "
          f"{bi.get('max_vcpus')} vCPU\n")
    else:
        w("no xl header: a bare libxl stream\n")
    s = r["stream"]
    w(f"libxl stream v{s['libxl_version']} at offset {s['stream_offset']}; libxc image v{s['libxc_version']}, "
      f"{s['domain_type']}, Xen {s['xen']}, page size {s['page_size']}\n\nrecords:\n")
    w(f"  {'offset':>12}  layer  {'type':<20} detail\n")
    for e in r["records"]:
        if "count" in e:
            detail = f"{e['count']} records, {e['pages']:,} pages of data"
        else:
            detail = f"{e['length']} bytes" + (f", {e['params']} params" if "params" in e else "")
        w(f"  {e['offset']:>12}  {e['layer']:<5}  {e['type']:<20} {detail}\n")
    w("\nrounds (inferred: each round is sent in ascending pfn order):\n")
    w(f"  {'round':>5} {'records':>8} {'pfns':>9} {'with data':>10} {'no data':>9}  pfn range\n")
    for i, rd in enumerate(r["rounds"]):
        tag = "  <- stop-and-copy (guest paused)" if r["last_round_is_stop_and_copy"] and i == len(r["rounds"]) - 1 else ""
        w(f"  {rd['round']:>5} {rd['records']:>8} {rd['pfns']:>9,} {rd['pages_with_data']:>10,} "
          f"{rd['pages_without_data']:>9,}  {rd['min_pfn']:#x}-{rd['max_pfn']:#x}{tag}\n")
    if r["hvm_params"]:
        w("\nHVM params: " + ", ".join(f"{k}={v:#x}" for k, v in r["hvm_params"].items()) + "\n")
    w(f"\npage data: {r['page_data_bytes']:,} bytes in {sum(x['pages_with_data'] for x in r['rounds']):,} pages\n")
