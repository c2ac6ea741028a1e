"""Tests for vmem.format.stream and vmem.format.wire: exact bytes against the Xen specs, round trips
through an in-memory pipe, and a bounded reader that fails only with StreamError."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xen_spec_reader as spec
from vmem.errors import StreamError
from vmem.format import stream, wire
from vmem.format.control import (
    ControlReader, decode_json, encode_control, encode_json_control, encode_preamble,
    read_preamble,
)
from vmem.format.stream import PageData, Record, StreamReader, StreamWriter
from vmem.migration.savefile import RamPlacement
from vmem.format.wire import (
    MAX_RECORD_BODY_BYTES, PAGE_SIZE, ControlType, EmulatorId, LibxcRecordType,
    LibxlRecordType, PageType, PostcopyRecordType,
)

# The most any reader may ask for in one call: the body limit of a non-page record.
READ_BOUND = MAX_RECORD_BODY_BYTES


class Pipe:
    """An in-memory byte pipe: the writer's send_parts on one end, recv_exact/recv_into on
    the other.  Records every read size, and refuses reads beyond READ_BOUND."""

    def __init__(self, data: bytes = b"", *, short_reads: bool = False):
        self.buf = bytearray(data)
        self.pos = 0
        self.short_reads = short_reads  # end of data: return short instead of EOFError
        self.requests: list[int] = []
        self.some_requests: list[int] = []
        self.some_max = 1 << 30
        self.sent_parts: list = []

    def send_parts(self, parts) -> None:
        self.sent_parts.append(list(parts))
        for part in parts:
            self.buf += memoryview(part).cast("B")

    def _take(self, n: int) -> bytes:
        self.requests.append(n)
        assert n <= READ_BOUND, f"reader asked for {n} octets at once"
        data = bytes(self.buf[self.pos:self.pos + n])
        self.pos += len(data)
        if len(data) < n and not self.short_reads:
            raise EOFError
        return data

    def recv_exact(self, n: int) -> bytes:
        return self._take(n)

    def recv_into(self, view: memoryview) -> int:
        data = self._take(view.nbytes)
        view[:len(data)] = data
        return len(data)

    def recv_some(self, n: int) -> bytes:
        """1..n octets (at most ``some_max``, to cut what was sent at odd places); b"" at the end."""
        self.some_requests.append(n)
        data = bytes(self.buf[self.pos:self.pos + min(n, self.some_max)])
        self.pos += len(data)
        return data

    def reader(self, **kw) -> StreamReader:
        return StreamReader(self.recv_exact, self.recv_into, recv_some=self.recv_some, **kw)


def ram(npages: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (npages, PAGE_SIZE), dtype=np.uint8)


class MemfdRam:
    """Guest RAM as a memfd, filled through the destination's own placement path
    (:class:`~vmem.migration.savefile.RamPlacement`: staging, digest, pwrite by runs)."""

    def __init__(self, npages: int):
        self.npages = npages
        self.fd = os.memfd_create("test-stream-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, npages * PAGE_SIZE)
        self.digests = np.zeros(npages, dtype=np.uint64)

    def placement(self, source) -> RamPlacement:
        return RamPlacement(source, self.fd, self.digests)

    def pages(self) -> np.ndarray:
        data = os.pread(self.fd, self.npages * PAGE_SIZE, 0)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.npages, PAGE_SIZE)

    def close(self) -> None:
        os.close(self.fd)


def read_all(reader: StreamReader) -> list:
    """Drive a reader to the end; PAGE_DATA payloads go into fresh (bounded) buffers."""
    out = [reader.read_begin()]
    while not reader.finished:
        item = reader.next_record()
        if isinstance(item, PageData):
            buf = bytearray(item.payload_bytes)
            reader.read_page_payload_into(buf)
            out.append((item, bytes(buf)))
        else:
            out.append(item)
    return out


def write_stream(pipe: Pipe, version: int = 2, pages: np.ndarray | None = None,
                 context: bytes = b"guest context") -> StreamWriter:
    writer = StreamWriter(pipe.send_parts)
    writer.begin(version)
    if pages is not None:
        for first in range(0, pages.shape[0], wire.MAX_PAGES_PER_RECORD):
            chunk = pages[first:first + wire.MAX_PAGES_PER_RECORD]
            writer.page_data(np.arange(first, first + chunk.shape[0]), [chunk])
    writer.end_libxc()
    writer.emulator_context(context)
    writer.end_libxl()
    return writer


def head(version: int = 2, **dhdr) -> bytes:
    """libxl header + LIBXC_CONTEXT + image header + domain header, by the encoder."""
    return (stream.libxl_header() + stream.libxc_context_record()
            + stream.libxc_image_header(version) + stream.domain_header(**dhdr))


def rec(rtype: int, body: bytes = b"") -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in stream.record(rtype, body))


def page_rec(pfns, types=None, rtype=LibxcRecordType.PAGE_DATA, data=None) -> bytes:
    hdr = stream.page_data_header(np.asarray(pfns), types)
    if data is None:
        t = np.broadcast_to(PageType.NOTAB if types is None else np.asarray(types), (len(pfns),))
        data = bytes(PAGE_SIZE * int(np.asarray(wire.PAGE_TYPE_HAS_DATA)[t].sum()))
    return rec(rtype, hdr + data)


TAIL = (rec(LibxcRecordType.END) + b"".join(
    bytes(memoryview(p).cast("B")) for p in stream.emulator_context_record(b"ctx"))
    + stream.libxl_end_record())


def expect_error(data: bytes, match: str | None = None, **kw) -> StreamError:
    pipe = Pipe(data)
    with pytest.raises(StreamError, match=match) as info:
        read_all(pipe.reader(**kw))
    return info.value


# ----------------------------------------------------------------------------------------
# Exact bytes, written out by hand from the specs (a byte-order slip fails these)
# ----------------------------------------------------------------------------------------


def test_libxl_header_bytes_match_spec():
    assert stream.libxl_header() == bytes([
        0x4C, 0x69, 0x62, 0x78, 0x6C, 0x46, 0x6D, 0x74,  # ident "LibxlFmt", big-endian
        0x00, 0x00, 0x00, 0x02,                          # version 2, big-endian
        0x00, 0x00, 0x00, 0x00,                          # options: little-endian, not legacy
    ])
    assert stream.libxc_context_record() == bytes([1, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("version", [2, 3])
def test_image_header_bytes_match_spec(version):
    assert stream.libxc_image_header(version) == bytes([
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,  # marker
        0x58, 0x45, 0x4E, 0x46,                          # id "XENF", big-endian
        0x00, 0x00, 0x00, version,                       # version, big-endian
        0x00, 0x00,                                      # options: little-endian
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00,              # reserved
    ])


def test_domain_header_bytes_match_spec():
    assert stream.domain_header() == bytes([
        0x02, 0x00, 0x00, 0x00,  # type X86_HVM, little-endian u32
        0x0C, 0x00,              # page_shift 12, u16
        0x00, 0x00,              # reserved
        0x04, 0x00, 0x00, 0x00,  # xen_major 4
        0x11, 0x00, 0x00, 0x00,  # xen_minor 17
    ])


def test_begin_writes_the_four_headers_in_libxl_order():
    pipe = Pipe()
    writer = StreamWriter(pipe.send_parts)
    writer.begin()
    assert bytes(pipe.buf) == head()
    assert len(pipe.buf) == 64 and writer.bytes_written == 64 and writer.records_written == 1


def test_end_records_are_eight_zero_octets():
    assert stream.end_record() == bytes(8)
    assert stream.libxl_end_record() == bytes(8)
    assert stream.static_data_end_record() == bytes([0x10, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("size", range(0, 17))
def test_record_is_padded_with_zeros_to_eight(size):
    body = b"\xAA" * size
    data = rec(0x1234, body)
    assert data[:8] == struct.pack("<II", 0x1234, size)
    assert data[8:8 + size] == body
    assert len(data) % 8 == 0 and len(data) - 8 - size < 8
    assert set(data[8 + size:]) <= {0}


def test_record_rejects_a_lone_bytes_object_as_ints_and_oversized_bodies():
    assert rec(5, b"ab")[8:10] == b"ab"  # a bytes body is one part, not a list of ints
    with pytest.raises(ValueError):
        stream.record(5, [bytes(MAX_RECORD_BODY_BYTES + 1)])


def test_page_data_header_bytes_with_type_bits():
    hdr = stream.page_data_header(np.array([5, 7]), np.array([PageType.NOTAB, PageType.XTAB]))
    assert hdr == bytes([
        0x02, 0x00, 0x00, 0x00,  0x00, 0x00, 0x00, 0x00,  # count 2, reserved
        0x05, 0x00, 0x00, 0x00,  0x00, 0x00, 0x00, 0x00,  # pfn 5, NOTAB
        0x07, 0x00, 0x00, 0x00,  0x00, 0x00, 0x00, 0xF0,  # pfn 7, XTAB in bits 63-60
    ])


def test_page_data_record_bytes_for_one_page():
    pipe = Pipe()
    writer = StreamWriter(pipe.send_parts)
    writer.begin()
    page = np.full((1, PAGE_SIZE), 0x5A, dtype=np.uint8)
    writer.page_data(np.array([0x123456789]), [page])
    data = bytes(pipe.buf[64:])
    assert data[:24] == bytes([
        0x01, 0x00, 0x00, 0x00,  0x10, 0x10, 0x00, 0x00,  # PAGE_DATA, length 4112 = 0x1010
        0x01, 0x00, 0x00, 0x00,  0x00, 0x00, 0x00, 0x00,  # count 1, reserved
        0x89, 0x67, 0x45, 0x23,  0x01, 0x00, 0x00, 0x00,  # pfn 0x123456789, little-endian
    ])
    assert data[24:] == b"\x5A" * PAGE_SIZE


def test_emulator_context_record_bytes():
    data = b"".join(bytes(memoryview(p).cast("B"))
                    for p in stream.emulator_context_record(b"abc", EmulatorId.QEMU_UPSTREAM, 1))
    assert data == bytes([
        0x03, 0x00, 0x00, 0x00,  0x0B, 0x00, 0x00, 0x00,  # EMULATOR_CONTEXT, length 11
        0x02, 0x00, 0x00, 0x00,  0x01, 0x00, 0x00, 0x00,  # emulator_id 2, index 1
        0x61, 0x62, 0x63, 0x00,  0x00, 0x00, 0x00, 0x00,  # "abc", 5 octets of padding
    ])


def test_wire_numbers_do_not_collide():
    upstream = {int(t) for t in LibxcRecordType}
    vmem_types = {int(t) for t in PostcopyRecordType}
    assert not upstream & vmem_types
    assert all(t & wire.VMEM_RECORD_MASK == wire.VMEM_RECORD_BASE for t in vmem_types)
    assert all(not t & wire.REC_TYPE_OPTIONAL for t in vmem_types)  # mandatory range
    assert max(upstream) == 0x12  # upstream v3's STATIC_DATA_END..X86_MSR_POLICY
    assert ControlType.INVALID == 0 and len({int(t) for t in ControlType}) == len(ControlType)
    assert len(wire.PREAMBLE_MAGIC) == 16


# ----------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("npages", [1, 1024, 1500])
@pytest.mark.parametrize("version", [2, 3])
def test_round_trip_page_data(npages, version):
    pages = ram(npages, seed=npages)
    pipe = Pipe()
    writer = write_stream(pipe, version, pages, b"ctx-blob")
    items = read_all(pipe.reader(max_pfn=npages - 1))
    info = items[0]
    assert (info.version, info.domain_type, info.page_shift) == (version, wire.DomainType.X86_HVM, 12)
    page_items = [i for i in items[1:] if isinstance(i, tuple)]
    got = np.concatenate([np.frombuffer(buf, np.uint8).reshape(-1, PAGE_SIZE)
                          for _, buf in page_items])
    assert np.array_equal(got, pages)
    assert np.array_equal(np.concatenate([pd.pfns for pd, _ in page_items]), np.arange(npages))
    records = [i for i in items[1:] if isinstance(i, Record)]
    kinds = [r.type for r in records]
    if version == 3:
        assert kinds[0] is LibxcRecordType.STATIC_DATA_END
        kinds = kinds[1:]
    assert kinds == [LibxcRecordType.END, LibxlRecordType.EMULATOR_CONTEXT, LibxlRecordType.END]
    assert [r.layer for r in records[-3:]] == ["libxc", "libxl", "libxl"]
    emu = stream.parse_emulator_record(records[-2])
    assert (emu.emulator_id, emu.index, bytes(emu.data)) == (EmulatorId.UNKNOWN, 0, b"ctx-blob")
    assert writer.bytes_written == len(pipe.buf) == pipe.pos
    assert writer.pages_written == npages
    assert writer.records_written == len(records) + len(page_items) + 1  # + LIBXC_CONTEXT


def test_payload_placed_in_ram_and_through_a_sink():
    pages = ram(64, seed=3)
    pfns = np.array([3, 4, 5, 9, 10, 40, 63, 0])  # runs and singles, out of order
    types = np.array([0, 0, PageType.XTAB, 0, 0, PageType.BROKEN, 0, 0])
    carried = pfns[types == 0]
    pipe = Pipe()
    writer = StreamWriter(pipe.send_parts)
    writer.begin()
    writer.page_data(pfns, [pages[p] for p in carried], types)
    writer.page_data(pfns, [pages[p] for p in carried], types)
    writer.end_libxc()
    writer.end_libxl()

    reader = pipe.reader(max_pfn=63)
    reader.read_begin()
    pd = reader.next_record()
    assert pd.count == 8 and pd.npages_with_data == 6
    assert np.array_equal(pd.pfns, pfns) and np.array_equal(pd.types, types)
    assert np.array_equal(pd.pfns_with_data, carried)
    memfd = MemfdRam(pages.shape[0])
    assert reader.read_page_payload(memfd.placement(pipe)) == 6 * PAGE_SIZE
    dest = memfd.pages()
    memfd.close()
    assert np.array_equal(dest[carried], pages[carried])
    assert not dest[[5, 40]].any()  # types without data: nothing written

    pd = reader.next_record()
    seen = {}

    def sink(pfns_with_data, nbytes):
        seen["pfns"] = pfns_with_data.copy()
        for pfn in pfns_with_data:  # a test sink; real ones recv_into RAM by runs
            seen[int(pfn)] = pipe.recv_exact(PAGE_SIZE)
        assert nbytes == len(pfns_with_data) * PAGE_SIZE

    reader.read_page_payload(sink)
    assert np.array_equal(seen["pfns"], carried)
    assert all(seen[int(p)] == pages[p].tobytes() for p in carried)
    assert reader.next_record().type is LibxcRecordType.END
    assert reader.next_record().type is LibxlRecordType.END and reader.finished
    assert reader.offset == len(pipe.buf)


def test_all_pages_without_data_and_skip():
    pipe = Pipe(head() + page_rec([1, 2], [PageType.XTAB, PageType.XALLOC])
                + page_rec([3]) + TAIL)
    reader = pipe.reader()
    reader.read_begin()
    pd = reader.next_record()
    assert pd.npages_with_data == 0 and pd.payload_bytes == 0
    assert reader.read_page_payload(lambda *a: pytest.fail("sink called for 0 octets")) == 0
    reader.next_record()
    assert reader.skip_page_payload() == PAGE_SIZE
    assert reader.next_record().type is LibxcRecordType.END


def test_writer_passes_page_buffers_uncopied():
    pages = ram(4)
    pipe = Pipe()
    writer = StreamWriter(pipe.send_parts)
    writer.begin()
    bufs = [pages[0:2], pages[2:4]]
    writer.page_data(np.arange(4), bufs)
    last = pipe.sent_parts[-1]
    assert last[-2] is bufs[0] and last[-1] is bufs[1]


def test_writer_argument_and_order_checks():
    pipe = Pipe()
    writer = StreamWriter(pipe.send_parts)
    with pytest.raises(RuntimeError):
        writer.page_data(np.arange(1), [bytes(PAGE_SIZE)])  # before begin()
    writer.begin()
    with pytest.raises(ValueError):
        writer.page_data(np.arange(2), [bytes(PAGE_SIZE)])  # 2 pages need 8192 octets
    with pytest.raises(ValueError):
        writer.page_data(np.arange(1025), [bytes(PAGE_SIZE * 1025)])
    with pytest.raises(ValueError):
        writer.page_data(np.array([1 << 52]), [bytes(PAGE_SIZE)])
    with pytest.raises(ValueError):
        writer.page_data(np.array([1]), [bytes(PAGE_SIZE)], types=5)  # reserved type
    with pytest.raises(ValueError):
        writer.write_record(LibxcRecordType.X86_CPUID_POLICY, bytes(24))  # v3 record in v2
    with pytest.raises(ValueError):
        writer.write_record(LibxcRecordType.X86_PV_INFO, bytes(8))
    with pytest.raises(ValueError):
        writer.write_record(LibxcRecordType.END)
    with pytest.raises(RuntimeError):
        writer.emulator_context(b"x")  # libxl layer only
    writer.end_libxc()
    with pytest.raises(RuntimeError):
        writer.page_data(np.arange(1), [bytes(PAGE_SIZE)])
    with pytest.raises(ValueError):
        writer.emulator_context(bytes(wire.MAX_EMULATOR_CONTEXT_BYTES + 1))
    writer.end_libxl()
    assert writer.finished
    assert bytes(pipe.buf) == head() + rec(LibxcRecordType.END) + stream.libxl_end_record()


def test_writer_failure_is_sticky():
    def broken(parts):
        raise BrokenPipeError("peer went away")

    writer = StreamWriter(broken)
    with pytest.raises(BrokenPipeError):
        writer.begin()
    with pytest.raises(RuntimeError, match="earlier send failed"):
        writer.begin()
    assert writer.bytes_written == 0


def test_prepare_pause_is_a_vmem_record_and_the_rehearsal_reads_its_own_tail():
    pipe = Pipe()
    writer = StreamWriter(pipe.send_parts)
    writer.begin()
    writer.write_record(wire.VmemRecordType.PREPARE_PAUSE)
    writer.x86_hvm_state(64)
    writer.end_libxc()
    writer.emulator_context(b"ctx")
    writer.end_libxl()
    records = [i for i in read_all(pipe.reader(max_pfn=63))[1:] if isinstance(i, Record)]
    assert records[0].type is wire.VmemRecordType.PREPARE_PAUSE and records[0].body == b""
    with pytest.raises(StreamError, match="vmem record"):
        read_all(Pipe(bytes(pipe.buf)).reader(max_pfn=63, allow_postcopy=False))
    stream.rehearse_tail(1 << 18, b'{"runtime": {}}')  # in memory only; raises on any mismatch


def test_end_of_stream_is_the_four_closing_calls_in_one_send():
    """The tail a stop-and-copy sends in one call is byte for byte what x86_hvm_state,
    end_libxc, emulator_context and end_libxl send, and ends the writer as they do."""
    context = b'{"runtime": {"steps": 7}}'
    apart, together = Pipe(), Pipe()
    for pipe in (apart, together):
        w = StreamWriter(pipe.send_parts)
        w.begin()
        w.page_data(np.arange(2), [ram(2)])
        if pipe is apart:
            w.x86_hvm_state(1 << 18, elapsed_ns=123_456)
            w.end_libxc()
            w.emulator_context(context)
            w.end_libxl()
        else:
            w.end_of_stream(1 << 18, context, elapsed_ns=123_456)
        assert w.finished and w.records_written == 8 and w.bytes_written == len(pipe.buf)
    assert bytes(together.buf) == bytes(apart.buf)
    assert len(together.sent_parts) == len(apart.sent_parts) - 3  # one send instead of four
    items = read_all(together.reader(max_pfn=(1 << 18) - 1, require_hvm_state=True))
    assert stream.parse_emulator_record(items[-2]).data == context


def test_end_of_stream_refuses_before_sending_anything():
    pipe = Pipe()
    w = StreamWriter(pipe.send_parts)
    with pytest.raises(RuntimeError, match="end_of_stream"):
        w.end_of_stream(64, b"ctx")  # before begin()
    w.begin()
    sent = len(pipe.buf)
    with pytest.raises(ValueError, match="MAX_EMULATOR_CONTEXT_BYTES"):
        w.end_of_stream(64, bytes(wire.MAX_EMULATOR_CONTEXT_BYTES + 1))
    with pytest.raises(ValueError, match="special pages"):
        w.end_of_stream(0, b"ctx")
    assert len(pipe.buf) == sent  # nothing went out; the writer is still usable
    w.x86_hvm_state(64)
    with pytest.raises(ValueError):  # the HVM state was sent already
        w.end_of_stream(64, b"ctx")


def _records_and_offsets(reader: StreamReader) -> list:
    out = [(reader.read_begin(), reader.offset)]
    while not reader.finished:
        item = reader.next_record()
        if isinstance(item, PageData):
            buf = bytearray(item.payload_bytes)
            reader.read_page_payload_into(buf)
            item = (item.count, item.pfns.tolist(), item.types.tolist(), item.offset, bytes(buf))
        out.append((item, reader.offset))
    return out


@pytest.mark.parametrize("some_max", [1, 5, 4096 + 3, 1 << 30])
def test_read_ahead_serves_the_same_octets_at_the_same_offsets(some_max):
    """A stream read with read-ahead (small reads from one receive of up to
    READ_AHEAD_BYTES, page payloads partly from it) yields what a plain read yields, record
    for record and offset for offset, however the receives are cut -- with fewer receives."""
    pages = ram(5, seed=3)
    pipe = Pipe()
    w = StreamWriter(pipe.send_parts)
    w.begin()
    w.page_data(np.arange(3), [pages[:3]])
    w.page_data(np.array([4, 3]), [pages[4:5], pages[3:4]])
    w.end_of_stream(5, b"context", elapsed_ns=1)
    data = bytes(pipe.buf)
    plain = _records_and_offsets(Pipe(data).reader(max_pfn=4))
    ahead_pipe = Pipe(data)
    ahead_pipe.some_max = some_max
    reader = ahead_pipe.reader(max_pfn=4)
    reader.read_ahead(True)
    ahead = _records_and_offsets(reader)
    assert ahead == plain
    assert reader.buffered_bytes == 0 and ahead[-1][1] == len(data)
    if some_max == 1 << 30:
        assert len(ahead_pipe.some_requests) == 1 and not ahead_pipe.requests  # one receive in all


def test_read_ahead_truncation_offsets_and_guards():
    pipe = Pipe()
    w = StreamWriter(pipe.send_parts)
    w.begin()
    w.page_data(np.arange(2), [ram(2)])
    w.end_of_stream(2, b"context")
    data = bytes(pipe.buf)
    for cut in range(len(data)):
        p = Pipe(data[:cut])
        reader = p.reader(max_pfn=1)
        reader.read_ahead(True)
        with pytest.raises(StreamError, match="truncated") as info:
            _records_and_offsets(reader)
        assert 0 <= info.value.offset <= cut
    # Without recv_some there is no read-ahead.
    with pytest.raises(RuntimeError, match="recv_some"):
        StreamReader(Pipe(data).recv_exact).read_ahead(True)
    # A sink reads from the source itself: refused while payload octets sit in the buffer.
    reader = Pipe(data).reader(max_pfn=1)
    reader.read_begin()
    reader.read_ahead(True)
    assert isinstance(reader.next_record(), PageData) and reader.buffered_bytes > 0
    with pytest.raises(RuntimeError, match="read ahead"):
        reader.read_page_payload(lambda pfns, nbytes: None)
    # Turned off, what was read ahead is still served first, then the source directly.
    reader.read_ahead(False)
    buf = bytearray(2 * PAGE_SIZE)
    reader.read_page_payload_into(buf)
    assert bytes(buf) == ram(2).tobytes()
    while not reader.finished:
        reader.next_record()
    assert reader.offset == len(data) and reader.buffered_bytes == 0


def test_v3_static_data_then_records():
    pipe = Pipe()
    writer = StreamWriter(pipe.send_parts)
    writer.begin(3)
    writer.write_record(LibxcRecordType.X86_CPUID_POLICY, bytes(24 * 2))
    writer.write_record(LibxcRecordType.X86_MSR_POLICY, bytes(16))
    writer.write_record(LibxcRecordType.X86_TSC_INFO, struct.pack("<IIQII", 0, 10**6, 5, 1, 0))
    with pytest.raises(ValueError):  # static data after the (automatic) STATIC_DATA_END
        writer.write_record(LibxcRecordType.X86_MSR_POLICY, bytes(16))
    writer.write_record(LibxcRecordType.HVM_PARAMS, struct.pack("<IIQQ", 1, 0, 12, 34))
    writer.write_record(LibxcRecordType.HVM_CONTEXT, b"hvm")
    writer.write_record(PostcopyRecordType.BEGIN)
    writer.end_libxc()
    writer.write_record(LibxlRecordType.EMULATOR_XENSTORE_DATA, struct.pack("<II", 0, 0) + b"k\0v\0")
    writer.end_libxl()
    types = [r.type for r in read_all(pipe.reader())[1:]]
    assert types == [LibxcRecordType.X86_CPUID_POLICY, LibxcRecordType.X86_MSR_POLICY,
                     LibxcRecordType.STATIC_DATA_END, LibxcRecordType.X86_TSC_INFO,
                     LibxcRecordType.HVM_PARAMS, LibxcRecordType.HVM_CONTEXT,
                     PostcopyRecordType.BEGIN, LibxcRecordType.END,
                     LibxlRecordType.EMULATOR_XENSTORE_DATA, LibxlRecordType.END]


def test_postcopy_page_data_has_the_page_data_layout():
    pages = ram(2)
    pipe = Pipe()
    writer = StreamWriter(pipe.send_parts)
    writer.begin()
    writer.page_data(np.array([0, 1]), [pages], record_type=PostcopyRecordType.PAGE_DATA)
    writer.end_libxc()
    writer.end_libxl()
    items = read_all(pipe.reader())
    pd, payload = items[1]
    assert pd.type is PostcopyRecordType.PAGE_DATA and payload == pages.tobytes()
    err = expect_error(bytes(pipe.buf), "post-copy", allow_postcopy=False)
    assert err.offset == 64


def test_unknown_optional_libxc_record_is_skipped():
    pipe = Pipe(head() + rec(0x8000_0042, b"ignored") + page_rec([1]) + TAIL)
    reader = pipe.reader()
    read_all(reader)
    assert reader.optional_records_skipped == 1


def test_legacy_flag_and_zero_length_hvm_params_are_accepted():
    data = bytearray(head() + rec(LibxcRecordType.HVM_PARAMS) + TAIL)
    data[15] = wire.LIBXL_OPT_LEGACY
    info = read_all(Pipe(bytes(data)).reader())[0]
    assert info.legacy


# ----------------------------------------------------------------------------------------
# Malformed input: StreamError, with offset, and never a read beyond bounds
# ----------------------------------------------------------------------------------------


def small_stream() -> bytes:
    types = [PageType.NOTAB, PageType.XTAB, PageType.NOTAB]
    return (head() + page_rec([1, 2, 3], types) + page_rec([7])
            + rec(LibxcRecordType.X86_TSC_INFO, struct.pack("<IIQII", 0, 1, 2, 3, 0))
            + rec(LibxcRecordType.HVM_CONTEXT, b"abc") + TAIL)


@pytest.mark.parametrize("short_reads", [False, True])
def test_truncated_at_every_offset(short_reads):
    data = small_stream()
    read_all(Pipe(data).reader())  # the whole thing is valid
    for cut in range(len(data)):
        pipe = Pipe(data[:cut], short_reads=short_reads)
        with pytest.raises(StreamError, match="truncated") as info:
            read_all(pipe.reader())
        assert 0 <= info.value.offset <= cut


@pytest.mark.parametrize("body", [
    pytest.param(lambda: head() + struct.pack("<II", LibxcRecordType.HVM_CONTEXT, 0xFFFFFFF0),
                 id="HVM_CONTEXT"),
    pytest.param(lambda: head() + struct.pack("<II", LibxcRecordType.PAGE_DATA, 0xFFFFFFF0),
                 id="PAGE_DATA"),
    pytest.param(lambda: head() + struct.pack("<II", 0x8000_0001, 0xFFFFFFF0), id="optional"),
    pytest.param(lambda: head() + struct.pack("<II", PostcopyRecordType.PFNS, 0xFFFFFFF0),
                 id="postcopy"),
    pytest.param(lambda: head() + rec(LibxcRecordType.END)
                 + struct.pack("<II", LibxlRecordType.EMULATOR_CONTEXT, 0xFFFFFFF0),
                 id="EMULATOR_CONTEXT"),
    pytest.param(lambda: head() + rec(LibxcRecordType.END)
                 + struct.pack("<II", LibxlRecordType.EMULATOR_CONTEXT,
                               8 + wire.MAX_EMULATOR_CONTEXT_BYTES + 1),
                 id="EMULATOR_CONTEXT-just-over"),
])
def test_oversized_length_is_rejected_before_reading(body):
    data = body() + bytes(64)
    pipe = Pipe(data)
    with pytest.raises(StreamError, match="exceeds the limit") as info:
        read_all(pipe.reader())
    assert max(pipe.requests) <= 24  # headers only: the body was never requested
    assert info.value.offset == len(data) - 64 - 8  # the offending record header


def test_page_data_count_must_match_body():
    good = page_rec([1, 2])
    # Claim one page more than is present: length says 3 pages of data.
    bad = struct.pack("<II", LibxcRecordType.PAGE_DATA, 8 + 16 + 3 * PAGE_SIZE) + good[8:]
    pipe = Pipe(head() + bad + bytes(PAGE_SIZE) + TAIL)
    with pytest.raises(StreamError, match="does not match its count"):
        read_all(pipe.reader())
    assert max(pipe.requests) <= 24  # refused before the payload


def test_page_data_count_limits():
    over = struct.pack("<II", 1025, 0) + struct.pack("<Q", PageType.XTAB << 60) * 1025
    expect_error(head() + rec(LibxcRecordType.PAGE_DATA, over) + TAIL, "exceeds the limit of 1024")
    zero = struct.pack("<II", 0, 0) + bytes(8)
    expect_error(head() + rec(LibxcRecordType.PAGE_DATA, zero) + TAIL, "count is 0")
    short = struct.pack("<II", 4, 0) + bytes(8)
    expect_error(head() + rec(LibxcRecordType.PAGE_DATA, short) + TAIL, "too short for 4 pfns")


def test_page_data_pfn_checks():
    err = expect_error(head() + page_rec([1, 2, 300]) + TAIL, "beyond max_pfn", max_pfn=255)
    assert err.offset == 64 + 8 + 8 + 2 * 8  # the offending pfn word
    bad_type = bytearray(page_rec([1]))
    bad_type[23] = 0x50  # page type 5: reserved
    expect_error(head() + bytes(bad_type) + TAIL, "unknown page type 0x5")
    reserved = bytearray(page_rec([1]))
    reserved[22] = 0x10  # bit 52
    expect_error(head() + bytes(reserved) + TAIL, "reserved bits set")


def test_unknown_record_types():
    expect_error(head() + rec(0x13, b"x") + TAIL, "unknown mandatory libxc record type 0x00000013")
    expect_error(head() + rec(LibxcRecordType.END) + rec(0x42) + stream.libxl_end_record(),
                 "unknown libxl record type")
    expect_error(head() + rec(0x564D_0099) + TAIL, "vmem record")


def test_nonzero_padding():
    data = bytearray(head() + rec(LibxcRecordType.HVM_CONTEXT, b"abc") + TAIL)
    data[64 + 8 + 3 + 2] = 1
    err = expect_error(bytes(data), "non-zero padding")
    assert err.offset == 64 + 8 + 3


@pytest.mark.parametrize("offset, value, match", [
    (0, 0x4D, "bad libxl header ident"),
    (11, 3, "unsupported libxl stream version 3"),
    (15, 1, "big-endian libxl"),
    (14, 1, "reserved bits set in libxl"),
    (16, 2, "must start with LIBXC_CONTEXT"),
    (24 + 3, 0x7F, "bad libxc image marker"),
    (24 + 8, 0x59, "bad libxc image id"),
    (24 + 15, 4, "unsupported libxc image version 4"),
    (24 + 15, 1, "unsupported libxc image version 1"),
    (24 + 17, 1, "big-endian libxc"),
    (24 + 22, 1, "reserved bits set in libxc image header"),
    (48, 3, "unsupported domain type X86_PVH.*PVH guests as X86_HVM"),
    (48, 4, "unsupported domain type ARM"),
    (52, 13, "unsupported page size 2\\*\\*13"),
    (54, 1, "reserved field set in the domain header"),
])
def test_bad_headers(offset, value, match):
    data = bytearray(small_stream())
    data[offset] = value
    expect_error(bytes(data), match)


def test_records_out_of_order():
    # PAGE_DATA where the domain header belongs.
    no_dhdr = head()[:48] + page_rec([1]) + TAIL
    expect_error(no_dhdr, "domain header.*PAGE_DATA record header")
    # After the libxc END, PAGE_DATA's number means LIBXC_CONTEXT: a second one.
    expect_error(head() + rec(LibxcRecordType.END) + page_rec([1]) + stream.libxl_end_record(),
                 "second LIBXC_CONTEXT")
    # Nothing after the libxl END.
    pipe = Pipe(small_stream() + page_rec([1]))
    reader = pipe.reader()
    read_all(reader)
    with pytest.raises(StreamError, match="ended with the libxl END"):
        reader.next_record()
    # v3: memory before STATIC_DATA_END, a second STATIC_DATA_END, static data after it.
    expect_error(head(3) + page_rec([1]) + TAIL, "before STATIC_DATA_END")
    sde = rec(LibxcRecordType.STATIC_DATA_END)
    expect_error(head(3) + sde + sde + TAIL, "second STATIC_DATA_END")
    expect_error(head(3) + sde + rec(LibxcRecordType.X86_MSR_POLICY, bytes(16)) + TAIL,
                 "X86_MSR_POLICY after STATIC_DATA_END")
    # v3 records in a v2 stream.
    expect_error(head(2) + sde + TAIL, "does not exist in stream version 2")
    # PV, checkpoint and deprecated records.
    expect_error(head() + rec(LibxcRecordType.X86_PV_INFO, bytes(8)) + TAIL, "only valid in x86 PV")
    expect_error(head() + rec(LibxcRecordType.CHECKPOINT) + TAIL, "checkpointed")
    expect_error(head() + rec(LibxcRecordType.TOOLSTACK, b"x") + TAIL, "deprecated")
    expect_error(small_stream()[:-8] + rec(LibxlRecordType.CHECKPOINT_END), "checkpointed")


def test_record_layout_rules():
    expect_error(head() + rec(LibxcRecordType.END, b"x") + TAIL, "must have length 0")
    expect_error(head() + rec(LibxcRecordType.X86_TSC_INFO, bytes(16)) + TAIL, "length 24")
    expect_error(head() + rec(LibxcRecordType.X86_TSC_INFO, bytes(20) + b"\1\0\0\0") + TAIL,
                 "reserved field set in X86_TSC_INFO")
    expect_error(head() + rec(LibxcRecordType.HVM_PARAMS, struct.pack("<II", 2, 0) + bytes(16))
                 + TAIL, "count 2 does not match")
    expect_error(head() + rec(LibxcRecordType.HVM_CONTEXT) + TAIL, "zero length")
    expect_error(head() + rec(LibxcRecordType.END) + rec(LibxlRecordType.EMULATOR_CONTEXT, b"abc")
                 + stream.libxl_end_record(), "too short for the 8-octet emulator header")
    expect_error(head() + rec(LibxcRecordType.END)
                 + rec(LibxlRecordType.EMULATOR_CONTEXT, struct.pack("<II", 7, 0))
                 + stream.libxl_end_record(), "unknown emulator id")


def test_reader_errors_are_sticky_and_misuse_is_runtime_error():
    pipe = Pipe(head() + page_rec([1]) + rec(0x13) + TAIL)
    reader = pipe.reader()
    with pytest.raises(RuntimeError):
        reader.next_record()  # before read_begin
    reader.read_begin()
    reader.next_record()
    with pytest.raises(RuntimeError):
        reader.next_record()  # payload pending
    with pytest.raises(ValueError):
        reader.read_page_payload_into(bytearray(10))  # too small: still pending
    reader.skip_page_payload()
    with pytest.raises(StreamError, match="unknown mandatory"):
        reader.next_record()
    with pytest.raises(StreamError, match="unusable after an earlier error"):
        reader.next_record()


def test_transport_errors_propagate_unless_declared_truncation():
    class Broken(Exception):
        pass

    def recv(n):
        raise Broken

    with pytest.raises(Broken):
        StreamReader(recv).read_begin()
    with pytest.raises(StreamError, match="truncated"):
        StreamReader(recv, truncation_errors=(Broken,)).read_begin()


# ----------------------------------------------------------------------------------------
# Random mutations: StreamError or success, nothing else, reads always bounded
# ----------------------------------------------------------------------------------------

BASE = small_stream()
# Structural offsets (headers, record headers, counts, pfns) where mutations matter most.
_STRUCT = sorted({*range(0, 64), *range(64, 64 + 48), *(len(BASE) - n for n in range(1, 80))})
_INTERESTING_U32 = [0, 1, 2, 3, 7, 8, 12, 0x10, 0x13, 1023, 1024, 1025, 4096, 4112,
                    0x0100_0000, 0x564D_0014, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFF0, 0xFFFF_FFFF]

mutation = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, len(BASE) - 1), st.integers(0, 255)),
    st.tuples(st.just("byte"), st.sampled_from(_STRUCT), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.sampled_from(_STRUCT), st.sampled_from(_INTERESTING_U32)),
    st.tuples(st.just("insert"), st.sampled_from(_STRUCT), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.sampled_from(_STRUCT), st.integers(1, 16)),
    st.tuples(st.just("cut"), st.integers(0, len(BASE)), st.just(0)),
)


def _mutate(data: bytes, mutations) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg in mutations:
        pos = min(pos, len(buf))
        if kind == "byte" and pos < len(buf):
            buf[pos] = arg
        elif kind == "u32":
            buf[pos:pos + 4] = struct.pack("<I", arg)
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos:pos + arg]
        elif kind == "cut":
            del buf[pos:]
    return bytes(buf)


_MUTATION_RAM = MemfdRam(4096)  # the readers below accept pfns up to 4095


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutation, min_size=1, max_size=4), st.booleans(), st.booleans())
def test_mutated_streams_raise_only_stream_error(mutations, short_reads, via_pages):
    data = _mutate(BASE, mutations)
    pipe = Pipe(data, short_reads=short_reads)
    reader = pipe.reader(max_pfn=4095)
    try:
        reader.read_begin()
        while not reader.finished:
            item = reader.next_record()
            if isinstance(item, PageData):
                if via_pages:
                    reader.read_page_payload(_MUTATION_RAM.placement(pipe))
                else:
                    reader.read_page_payload_into(bytearray(item.payload_bytes))
    except StreamError as err:
        assert err.offset >= 0
    assert not pipe.requests or max(pipe.requests) <= READ_BOUND


# ----------------------------------------------------------------------------------------
# Control protocol and preamble
# ----------------------------------------------------------------------------------------


def _control_bytes(parts) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in parts)


def test_control_round_trip_and_bytes():
    data = _control_bytes(encode_control(ControlType.READY, b"abc"))
    assert data == bytes([1, 0, 0, 0, 3, 0, 0, 0, 0x61, 0x62, 0x63, 0, 0, 0, 0, 0])
    pipe = Pipe(data + _control_bytes(encode_json_control(ControlType.DEST_REPORT, {"b": 1, "a": [1.5]}))
                + _control_bytes(encode_control(ControlType.SHUTDOWN)))
    reader = ControlReader(pipe.recv_exact)
    assert reader.read() == (ControlType.READY, b"abc")
    ctype, body = reader.read()
    assert ctype is ControlType.DEST_REPORT and decode_json(body) == {"a": [1.5], "b": 1}
    assert body == b'{"a":[1.5],"b":1}'
    assert reader.read() == (ControlType.SHUTDOWN, b"")
    assert reader.offset == len(pipe.buf) and reader.records_read == 3


def test_control_errors():
    with pytest.raises(ValueError):
        encode_control(ControlType.INVALID)
    with pytest.raises(ValueError):
        encode_json_control(ControlType.ERROR, {"x": float("nan")})
    for data, match in [
        (struct.pack("<II", 0, 0), "unknown control record type"),
        (struct.pack("<II", 99, 0), "unknown control record type"),
        (struct.pack("<II", ControlType.DIGESTS, 0xFFFF_FFF0), "exceeds the limit"),
        (struct.pack("<II", ControlType.READY, 1) + b"x\0\0\1\0\0\0\0", "non-zero padding"),
        (struct.pack("<II", ControlType.READY, 8) + b"1234", "truncated"),
    ]:
        pipe = Pipe(data)
        with pytest.raises(StreamError, match=match):
            ControlReader(pipe.recv_exact).read()
        assert max(pipe.requests) <= 8
    pipe = Pipe(struct.pack("<II", ControlType.DIGESTS, 100))
    with pytest.raises(StreamError, match="exceeds the limit of 64"):
        ControlReader(pipe.recv_exact, max_body_bytes=64).read()
    for body in (b"\xff", b"{", b"NaN", b"[" * 100000):
        with pytest.raises(StreamError, match="malformed JSON"):
            decode_json(body)


def test_preamble_round_trip():
    config = {"guest_pages": 4096, "workload": "counter", "nested": {"x": [1, 2]}}
    data = encode_preamble(config)
    assert data[:16] == b"vmem-migrate-v1\n"
    assert struct.unpack("<I", data[16:20])[0] == len(data) - 20
    pipe = Pipe(data + small_stream())
    assert read_preamble(pipe.recv_exact) == config
    read_all(pipe.reader())  # the stream follows directly


@pytest.mark.parametrize("data, match", [
    (b"vmem-migrate-v2\n" + bytes(8), "another vmem migration protocol"),
    (stream.libxl_header() + bytes(8), "bare libxl stream"),
    (stream.libxc_image_header() + bytes(8), "bare libxc stream"),
    (b"Xen saved domain, xl format\n \0 \r", "xl save image"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "does not speak vmem-migrate-v1"),
    (b"vmem-mig", "truncated"),
    (b"vmem-migrate-v1\n" + struct.pack("<I", 0xFFFF_FFF0), "exceeds the limit"),
    (b"vmem-migrate-v1\n" + struct.pack("<I", 2) + b"[]", "must be a JSON object"),
    (b"vmem-migrate-v1\n" + struct.pack("<I", 2) + b"{x", "malformed JSON"),
])
def test_preamble_rejects_other_peers(data, match):
    pipe = Pipe(data)
    with pytest.raises(StreamError, match=match):
        read_preamble(pipe.recv_exact)
    assert max(pipe.requests) <= 16


def test_encode_preamble_needs_a_dict():
    with pytest.raises(TypeError):
        encode_preamble([1, 2])
    assert json.loads(encode_preamble({"a": 1})[20:]) == {"a": 1}


# ----------------------------------------------------------------------------------------
# Xen's own verifier, where installed (Debian: xen-utils-4.17)
# ----------------------------------------------------------------------------------------


XEN_VERIFIER, XEN_VERIFIER_MISSING = spec.find_verify_stream_v2()


@pytest.mark.parametrize("layout", ["usr/lib/xen-4.17/bin", "tools/python/scripts"])
def test_xen_verifier_is_found_in_the_debian_and_the_upstream_layout(tmp_path, monkeypatch, layout):
    """Debian's package puts the ``xen`` package in ../lib/python, a Xen source tree in ..;
    a script without it beside is refused with the reason."""
    script = tmp_path / layout / "verify-stream-v2"
    script.parent.mkdir(parents=True)
    script.write_text("")
    monkeypatch.setenv("VMEM_XEN_VERIFY_STREAM", str(script))
    assert spec.find_verify_stream_v2()[0] is None and "Python package" in spec.find_verify_stream_v2()[1]
    package = script.parent.parent / ("lib/python" if layout.startswith("usr") else "") / "xen" / "migration"
    package.mkdir(parents=True)
    (package / "verify.py").write_text("")
    assert spec.find_verify_stream_v2() == (script, "")
    assert spec.xen_python_path(script) == package.parent.parent


def xen_test_stream(version: int) -> bytes:
    """A small stream with every record kind vmem writes for an x86 HVM save."""
    pipe = Pipe()
    writer = StreamWriter(pipe.send_parts)
    writer.begin(version)
    pages = ram(1100)
    writer.page_data(np.arange(1024), [pages[:1024]])
    writer.page_data(np.arange(1024, 1100), [pages[1024:1050], pages[1051:1100]],
                     np.where(np.arange(1024, 1100) == 1050, PageType.XTAB, PageType.NOTAB))
    writer.write_record(LibxcRecordType.X86_TSC_INFO, struct.pack("<IIQII", 0, 10**6, 5, 1, 0))
    writer.write_record(LibxcRecordType.HVM_PARAMS, struct.pack("<IIQQ", 1, 0, 12, 34))
    writer.write_record(LibxcRecordType.HVM_CONTEXT, b"hvm context")
    writer.end_libxc()
    writer.emulator_context(b"guest context")
    writer.end_libxl()
    return bytes(pipe.buf)


@pytest.mark.skipif(XEN_VERIFIER is None, reason=XEN_VERIFIER_MISSING)
@pytest.mark.parametrize("version", [2, 3])
def test_xen_verify_stream_v2_accepts_vmem_streams(tmp_path, version):
    path = tmp_path / f"vmem-{os.getpid()}-v{version}.stream"
    path.write_bytes(xen_test_stream(version))
    result = spec.run_verify_stream_v2(XEN_VERIFIER, path, "libxl")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Libxl Record: End" in result.stdout


@pytest.mark.skipif(XEN_VERIFIER is None, reason=XEN_VERIFIER_MISSING)
def test_xen_verify_stream_v2_rejects_a_stream_cut_before_its_end(tmp_path):
    """The check above can fail: the same stream without its last record (the libxl END:
    type and length, 8 octets) is refused."""
    path = tmp_path / f"vmem-{os.getpid()}-cut.stream"
    path.write_bytes(xen_test_stream(2)[:-8])
    result = spec.run_verify_stream_v2(XEN_VERIFIER, path, "libxl")
    assert result.returncode != 0 and "Libxl Record: End" not in result.stdout, result.stdout
