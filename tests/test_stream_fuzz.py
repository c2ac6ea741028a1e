"""The stream readers under attack: a fast subset of scripts/fuzz_stream.py (hypothesis,
structured mutations), then one test per attack of the issue with an explicit message
check, then the receiving side (DestinationMigration, in-process) serving bad streams one
after another and a good one after them."""
from __future__ import annotations

import importlib.util
import socket
import struct
import sys
import threading
from pathlib import Path

import numpy as np
import pytest


from vmem.format import control, stream

from vmem.format import wire
from vmem.errors import StreamError
from vmem.format.wire import ControlType, LibxcRecordType, LibxlRecordType

_spec = importlib.util.spec_from_file_location(
    "fuzz_stream", Path(__file__).resolve().parent.parent / "scripts" / "fuzz_stream.py")
fz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_stream"] = fz  # dataclasses look their module up there
_spec.loader.exec_module(fz)


def test_fuzz_subset():
    stats = fz.fuzz(400, seed=12345, progress_every=0)
    assert stats.total == 400
    assert stats.ok > 0 and len(stats.outcomes) > 20  # the mutations reach many checks
    assert stats.peak_bytes < 1 << 20


# ----------------------------------------------------------------------------------------
# Helpers: a valid stream as records, a reader over bytes
# ----------------------------------------------------------------------------------------

SEED = fz.SEEDS["stream"][0]  # v2: headers, 2 PAGE_DATA, TSC, HVM_PARAMS, HVM_CONTEXT, END, EMU, END


def idx(name: str, seed=SEED) -> int:
    return next(i for i, c in enumerate(seed) if c.name == name)


def build(seed=SEED, replace: dict | None = None, order: list[int] | None = None) -> bytes:
    chunks = [c.data for c in seed]
    for i, data in (replace or {}).items():
        chunks[i] = data
    return b"".join(chunks[i] for i in (order if order is not None else range(len(chunks))))


def read(data: bytes, target: str = "stream", **opts) -> fz.Source:
    """Parse; returns the source on success (for request-size checks)."""
    opt = fz.Options(**opts)
    outcome, max_request = fz.run_input(target, data, opt)
    if outcome != "ok":
        raise AssertionError("run_input swallowed an error")  # pragma: no cover
    return max_request


def fails(data: bytes, match: str, target: str = "stream", read_past_error: int | None = None,
          **opts) -> StreamError:
    """Expect StreamError matching ``match``; ``read_past_error``: at most this many octets
    were consumed beyond the offset the error names (nothing of an oversized body)."""
    src = fz.Source(data, opts.pop("eof_raises", True))
    opt = fz.Options(**opts)
    with pytest.raises(StreamError, match=match) as info:
        fz.parse_input(target, src, opt)
    assert info.value.offset >= 0
    if read_past_error is not None:
        consumed = src.pos - info.value.offset
        assert consumed <= read_past_error, f"read {consumed} octets past the error"
    return info.value


def rec(rtype: int, body: bytes = b"") -> bytes:
    return fz._join(stream.record(rtype, body))


def test_the_seed_is_valid():
    assert fz.run_input("stream", build(), fz.Options(require_hvm=True, max_pfn=63))[0] == "ok"
    assert fz.run_input("savefile", b"".join(c.data for c in fz.SEEDS["savefile"][0]),
                        fz.Options())[0] == "ok"


# ----------------------------------------------------------------------------------------
# One test per attack
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, cut, match", [
    ("libxl_hdr", 5, "truncated in libxl header"),
    ("PAGE_DATA", 4, "truncated in record header"),
    ("PAGE_DATA", 12, "truncated in PAGE_DATA header"),
    ("PAGE_DATA", 20, "truncated in PAGE_DATA pfns"),
    ("PAGE_DATA", 100, "truncated in PAGE_DATA payload"),
    ("HVM_PARAMS", 30, "truncated in HVM_PARAMS body"),
    ("HVM_CONTEXT", 20, "truncated in HVM_CONTEXT body"),
])
def test_truncated_records(name, cut, match):
    i = next(k for k, c in enumerate(SEED) if c.name == name or c.kind == name)
    data = build()
    start = sum(len(c.data) for c in SEED[:i])
    for eof_raises in (True, False):
        for mode in range(4):
            fails(data[:start + cut], match, eof_raises=eof_raises, mode=mode)
    emu = build()[:-8]  # cut inside the tail: the libxl END is missing
    fails(emu, "truncated in record header")
    fails(fz._join(control.encode_control(ControlType.READY, b"{}"))[:-3], "truncated in READY",
          target="control")
    xl = fz.SEEDS["savefile"][0][0].data
    fails(xl[:40], "truncated in xl save-file header", target="savefile")
    fails(xl[:60], "truncated in xl optional data", target="savefile")


@pytest.mark.parametrize("name, length, match", [
    ("PAGE_DATA", wire.MAX_PAGE_DATA_BODY_BYTES + 8, "exceeds the limit of 4202504"),
    ("HVM_CONTEXT", 0xFFFF_FFF0, "exceeds the limit"),
    ("HVM_PARAMS", 8 + 16 * 100, "exceeds the limit of 1032 octets"),
    ("X86_TSC_INFO", 0x7FFF_FFFF, "must have length 24"),
    ("EMULATOR_CONTEXT", wire.MAX_EMULATOR_CONTEXT_BYTES + 16, "exceeds the limit of 1048584"),
    ("LIBXC_CONTEXT", 8, "LIBXC_CONTEXT must have length 0"),
])
def test_oversized_lengths_are_refused_before_reading(name, length, match):
    i = idx(name)
    data = bytearray(SEED[i].data)
    data[4:8] = struct.pack("<I", length)
    fails(build(replace={i: bytes(data)}), match, read_past_error=8)
    # control records and the xl header: same rule
    fails(struct.pack("<II", ControlType.DIGESTS, 0xFFFF_FFF0), "exceeds the limit", target="control",
          read_past_error=8)
    xl = bytearray(fz.SEEDS["savefile"][0][0].data)
    xl[44:48] = struct.pack("<I", 0xFFFF_FFF0)
    fails(bytes(xl), "optional data length .* exceeds", target="savefile", read_past_error=4)


def test_counts_that_do_not_match_bodies():
    i = idx("PAGE_DATA")
    page = SEED[i].data
    for count, match in [(1, "does not match its count"), (2, "does not match its count"),
                         (0, "count is 0"), (1025, "exceeds the limit of 1024 pages"),
                         (0xFFFF_FFFF, "exceeds the limit of 1024 pages")]:
        fails(build(replace={i: page[:8] + struct.pack("<I", count) + page[12:]}), match,
              read_past_error=16 + 8 * 1024)
    one = rec(LibxcRecordType.PAGE_DATA, stream.page_data_header(np.array([5])) + bytes(4096))
    fails(build(replace={i: one[:8] + struct.pack("<I", 1000) + one[12:]}),
          "too short for 1000 pfns", read_past_error=16)
    j = idx("HVM_PARAMS")
    params = SEED[j].data
    fails(build(replace={j: params[:8] + struct.pack("<I", 3) + params[12:]}),
          "count 3 does not match")
    xl = bytearray(fz.SEEDS["savefile"][0][0].data)
    xl[48:52] = struct.pack("<I", 0x1000)  # config length beyond the optional data
    fails(bytes(xl), "config length 4096 overruns", target="savefile")


def test_records_out_of_order():
    n = len(SEED)
    p, c, e = idx("HVM_PARAMS"), idx("HVM_CONTEXT"), idx("END")
    order = list(range(n))
    order[p], order[c] = order[c], order[p]
    fails(build(order=order), "HVM_PARAMS after HVM_CONTEXT")
    fails(build(order=list(range(c + 1)) + [c] + list(range(c + 1, n))), "a second HVM_CONTEXT")
    pg = idx("PAGE_DATA")
    fails(build(order=[k for k in range(e + 1)] + [pg] + list(range(e + 1, n))),
          "second LIBXC_CONTEXT")  # after libxc END, type 1 is libxl's LIBXC_CONTEXT
    src = fz.Source(build() + SEED[pg].data, True)
    reader = stream.StreamReader(src.recv_exact, src.recv_into)
    fz._drive_stream(reader, src, fz.Options(mode=2))
    with pytest.raises(StreamError, match="ended with the libxl END"):
        reader.next_record()
    fails(build(order=[0, 2, 1] + list(range(3, n))), "must start with LIBXC_CONTEXT")
    no_hvm = [k for k in range(n) if SEED[k].name not in ("HVM_PARAMS", "HVM_CONTEXT")]
    fails(build(order=no_hvm), "ends without HVM_PARAMS and HVM_CONTEXT", require_hvm=True)
    v3 = fz.SEEDS["stream"][1]
    sde = next(k for k, ch in enumerate(v3) if ch.name == "STATIC_DATA_END")
    order = list(range(len(v3)))
    order.insert(sde + 2, order.pop(sde))  # after the first PAGE_DATA
    fails(b"".join(v3[k].data for k in order), "PAGE_DATA before STATIC_DATA_END")


def test_unknown_types():
    pg = idx("PAGE_DATA")
    page = SEED[pg].data
    for rtype, match in [(0x13, "unknown mandatory libxc record type 0x00000013"),
                         (0x7FFF_FFFF, "unknown mandatory"),
                         (0x564D_0099, "unexpected vmem record"),
                         (LibxcRecordType.X86_PV_INFO, "only valid in x86 PV"),
                         (LibxcRecordType.CHECKPOINT, "checkpointed")]:
        fails(build(replace={pg: struct.pack("<I", rtype) + page[4:]}), match)
    # post-copy records where they are not allowed
    fails(build(replace={pg: struct.pack("<I", wire.PostcopyRecordType.PAGE_DATA) + page[4:]}),
          "unexpected vmem post-copy record", allow_postcopy=False)
    # an unknown *optional* libxc record is skipped (spec); libxl has no such mercy
    opt = rec(0x8000_1234, b"whatever")
    assert fz.run_input("stream", build(replace={pg: opt + page}), fz.Options())[0] == "ok"
    e = idx("END")
    fails(build(replace={e: SEED[e].data + rec(0x8000_0000, b"x")}), "unknown libxl record type")
    fails(build(replace={e: SEED[e].data + rec(6)}), "unknown libxl record type 0x00000006")
    fails(struct.pack("<II", 99, 0), "unknown control record type", target="control")
    fails(struct.pack("<II", 0, 0), "unknown control record type", target="control")


def test_nonzero_padding_and_reserved_fields():
    tail = rec(LibxlRecordType.EMULATOR_CONTEXT, struct.pack("<II", 0, 0) + b"abc")
    assert len(tail) == 24
    bad = tail[:-1] + b"\1"
    e = idx("END")
    rest = b"".join(ch.data for ch in SEED[e + 2:])  # the libxl END
    base = b"".join(ch.data for ch in SEED[:e + 1])
    assert fz.run_input("stream", base + tail + rest, fz.Options())[0] == "ok"
    fails(base + bad + rest, "non-zero padding after EMULATOR_CONTEXT body")
    fails(fz._join(control.encode_control(ControlType.READY, b"{}"))[:-1] + b"\7",
          "non-zero padding after READY body", target="control")
    pg = idx("PAGE_DATA")
    page = SEED[pg].data
    fails(build(replace={pg: page[:12] + b"\1" + page[13:]}), "reserved field set in PAGE_DATA")
    fails(build(replace={pg: page[:22] + b"\x10" + page[23:]}), r"reserved bits set in PAGE_DATA pfn\[0\]")
    fails(build(replace={pg: page[:23] + b"\x50" + page[24:]}), "unknown page type 0x5")
    j = idx("HVM_PARAMS")
    fails(build(replace={j: SEED[j].data[:12] + b"\1" + SEED[j].data[13:]}),
          "reserved field set in HVM_PARAMS")
    t = idx("X86_TSC_INFO")
    fails(build(replace={t: SEED[t].data[:28] + b"\1" + SEED[t].data[29:]}),
          "reserved field set in X86_TSC_INFO")
    d = next(k for k, ch in enumerate(SEED) if ch.kind == "dhdr")
    fails(build(replace={d: SEED[d].data[:6] + b"\1" + SEED[d].data[7:]}),
          "reserved field set in the domain header")
    c = idx("HVM_CONTEXT")
    blob = bytearray(SEED[c].data)
    blob[8 + 32 + 4] = 1  # the hvm END entry's length
    fails(build(replace={c: bytes(blob)}), "HVM_CONTEXT entry typecode 0 length 1 runs past|END entry",
          require_hvm=True)


@pytest.mark.parametrize("chunk, at, value, fmt, match", [
    ("libxl_hdr", 8, 3, ">I", "unsupported libxl stream version 3"),
    ("ihdr", 12, 1, ">I", "unsupported libxc image version 1"),
    ("ihdr", 12, 4, ">I", "unsupported libxc image version 4"),
    ("ihdr", 0, 0x7FFF_FFFF, ">I", "bad libxc image marker"),
    ("dhdr", 0, 1, "<I", "unsupported domain type X86_PV"),
    ("dhdr", 4, 13, "<H", "unsupported page size 2\\*\\*13"),
])
def test_wrong_versions(chunk, at, value, fmt, match):
    i = next(k for k, c in enumerate(SEED) if c.kind == chunk)
    data = bytearray(SEED[i].data)
    struct.pack_into(fmt, data, at, value)
    fails(build(replace={i: bytes(data)}), match)


def test_wrong_versions_in_save_headers_and_context():
    xl = fz.SEEDS["savefile"][0][0].data
    fails(xl[:32] + struct.pack(">I", 0x01020304) + xl[36:], "byte order", target="savefile")
    fails(xl[:36] + struct.pack("<I", 1) + xl[40:], "legacy", target="savefile")
    fails(b"vmem-migrate-v2\n" + bytes(8), "another vmem migration protocol", target="preamble")
    with pytest.raises(StreamError, match="another vmem migration protocol"):
        control.read_preamble(fz.Source(b"vmem-migrate-v2\n" + bytes(8), True).recv_exact)
    c = idx("HVM_CONTEXT")
    blob = bytearray(SEED[c].data)
    struct.pack_into("<I", blob, 8 + 8 + 4, 2)  # hvm save header version
    fails(build(replace={c: bytes(blob)}), "unsupported HVM_CONTEXT version 2", require_hvm=True)
    struct.pack_into("<I", blob, 8 + 8 + 4, 1)
    struct.pack_into("<I", blob, 8 + 8, 0x1234)
    fails(build(replace={c: bytes(blob)}), "bad HVM_CONTEXT header magic", require_hvm=True)


def test_json_numbers_beyond_a_double_are_stream_errors():
    # json.loads("1e400") is inf; int(inf) raised OverflowError in callers (fixed in decode_json).
    for body in (b'{"npages": 1e400}', b"-1e999"):
        with pytest.raises(StreamError, match="does not fit a double"):
            control.decode_json(body)


# ----------------------------------------------------------------------------------------
# The receiving side keeps serving: one DestinationMigration after another, in-process
# ----------------------------------------------------------------------------------------


def _serve_once(send: bytes) -> tuple[int, list]:
    """Run one DestinationMigration on a channel pair; feed ``send`` after READY."""
    from transport import channel_pair
    from vmem.migration.destination import DestinationMigration

    src, dst = channel_pair()
    src.settimeout(60)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", DestinationMigration(dst).run()))
    t.start()
    controls = []
    try:
        pre = control.encode_preamble({"guest": {"workload": "idle", "params": {}, "seed": 1},
                                      "npages": 64, "page_size": 4096, "verify": True})
        src.send(pre)
        reader = control.ControlReader(src.recv_exact)
        controls.append(reader.read())
        if controls[0][0] == ControlType.READY:
            src.send(send)
            src.sock.shutdown(socket.SHUT_WR)  # a truncated stream ends here: EOF
            controls.append(reader.read())
    finally:
        t.join(60)
        src.close()
        dst.close()
    return result.get("rc"), controls


@pytest.mark.parametrize("attack", ["truncated", "oversized", "count", "order", "type", "padding", "version"])
def test_destination_answers_every_bad_stream_with_a_stream_error(attack):
    pg, c = idx("PAGE_DATA"), idx("HVM_CONTEXT")
    page = SEED[pg].data
    data = {
        "truncated": build()[:200],
        "oversized": build(replace={c: SEED[c].data[:4] + struct.pack("<I", 0xFFFF_FFF0)}),
        "count": build(replace={pg: page[:8] + struct.pack("<I", 4) + page[12:]}),
        "order": build(order=[0, 2, 1] + list(range(3, len(SEED)))),
        "type": build(replace={pg: struct.pack("<I", 0x13) + page[4:]}),
        "padding": build(replace={pg: page[:12] + b"\1" + page[13:]}),
        "version": build(replace={0: SEED[0].data[:11] + b"\3" + SEED[0].data[12:]}),
    }[attack]
    rc, controls = _serve_once(data)
    assert rc == 1
    ctype, body = controls[-1]
    assert ctype == ControlType.ERROR
    err = control.decode_json(body)
    assert err["type"] == "StreamError" and err["phase"] == "receive", err


@pytest.mark.parametrize("guest", [{"params": {}}, {"workload": "idle", "params": [1, 2]},
                                   {"workload": "idle", "seed": "x"}])
def test_destination_refuses_a_malformed_guest_spec_cleanly(guest):
    from transport import channel_pair
    from vmem.migration.destination import DestinationMigration

    src, dst = channel_pair()
    src.settimeout(10)
    try:
        src.send(control.encode_preamble({"guest": guest, "npages": 64, "page_size": 4096}))
        src.sock.shutdown(socket.SHUT_WR)
        assert DestinationMigration(dst).run() == 1
        ctype, body = control.ControlReader(src.recv_exact).read()
        assert ctype == ControlType.ERROR and control.decode_json(body)["type"] == "StreamError"
    finally:
        src.close()
        dst.close()
