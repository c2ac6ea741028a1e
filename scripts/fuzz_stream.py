#!/usr/bin/env python3
"""Fuzz vmem's stream readers with structured mutations (hypothesis-driven).

    .venv/bin/python scripts/fuzz_stream.py --count 100000 --seed 1

Targets (each input goes to one of them):

* ``stream``   - :class:`vmem.format.stream.StreamReader` on a libxl/libxc stream (v2, v3, with
  post-copy records), with random reader options and payload consumers;
* ``savefile`` - :func:`vmem.migration.savefile.read_xl_header` then a StreamReader behind it;
* ``control``  - :class:`vmem.format.control.ControlReader` over back-channel records, JSON bodies
  through :func:`vmem.format.control.decode_json`;
* ``preamble`` - :func:`vmem.format.control.read_preamble` then a StreamReader.

Each input is a valid seed (built with vmem's writer, split into its records) plus 1-3
mutations from the attack list of the issue: truncate, oversize a length, make a count
disagree with its body, reorder/duplicate/drop records, unknown or foreign record types,
non-zero padding and reserved fields, wrong versions/magics, and plain byte flips/splices.

Pass criteria, checked for every input:
  1. it ends in success or :class:`vmem.errors.StreamError` - any other exception is a
     bug and stops the run with the reproducing input (hex) and seed;
  2. no read asks for more than the limit declared for it (``MAX_RECORD_BODY_BYTES`` for
     the stream, ``MAX_CONTROL_BODY_BYTES``, ``MAX_XL_OPTIONAL_DATA_BYTES``,
     ``MAX_PREAMBLE_CONFIG_BYTES``): a socket source allocates what is asked for;
  3. tracemalloc peak while parsing stays under ``64 KiB + K * len(input)`` (K = 4; 48 for
     JSON, whose objects outgrow their text): allocation follows the octets actually
     received, never a declared length.

Prints inputs/s, the outcome per error class (message with numbers blanked) and totals.
"""
from __future__ import annotations

import argparse
import os
import re
import struct
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from vmem import _native  # noqa: E402,F401 - loaded before tracemalloc: RamPlacement uses it
from vmem.format import control, stream, wire  # noqa: E402
from vmem.migration import savefile  # noqa: E402
from vmem.errors import StreamError  # noqa: E402
from vmem.format.wire import ControlType, LibxcRecordType, LibxlRecordType, PageType  # noqa: E402

TARGETS = ("stream", "savefile", "control", "preamble")
ALLOC_BASE_BYTES = 64 << 10
ALLOC_FACTOR = {"stream": 4, "savefile": 4, "control": 48, "preamble": 48}
READ_LIMIT = {
    "stream": wire.MAX_RECORD_BODY_BYTES,
    "savefile": max(wire.MAX_RECORD_BODY_BYTES, wire.MAX_XL_OPTIONAL_DATA_BYTES),
    "control": wire.MAX_CONTROL_BODY_BYTES,
    "preamble": max(wire.MAX_RECORD_BODY_BYTES, wire.MAX_PREAMBLE_CONFIG_BYTES),
}
NPAGES = 64  # RAM of the seeds' guest: pfns 0..63


# ======================================================================================
# Seeds: valid inputs, as lists of chunks (headers and whole records)
# ======================================================================================


@dataclass
class Chunk:
    kind: str  # "xl", "preamble", "libxl_hdr", "ihdr", "dhdr", "rec" (a whole record), "ctl"
    data: bytes
    name: str = ""


def _join(parts) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in parts)


class _Collect:
    def __init__(self):
        self.chunks: list[Chunk] = []
        self.libxl = False  # after the libxc END, numbers are libxl record types

    def send_parts(self, parts) -> None:
        data = _join(parts)
        # split whatever the writer sent into headers and records
        pos = 0
        if data.startswith(b"LibxlFmt"):
            self.chunks += [Chunk("libxl_hdr", data[:16]), Chunk("rec", data[16:24], "LIBXC_CONTEXT"),
                            Chunk("ihdr", data[24:48]), Chunk("dhdr", data[48:64])]
            pos = 64
        while pos < len(data):
            rtype, length = struct.unpack_from("<II", data, pos)
            end = pos + 8 + length + (-length % 8)
            name = LibxlRecordType(rtype).name if self.libxl else _name(rtype)
            self.chunks.append(Chunk("rec", data[pos:end], name))
            self.libxl = self.libxl or rtype == LibxcRecordType.END
            pos = end


def _name(rtype: int) -> str:
    for enum in (LibxcRecordType, wire.PostcopyRecordType):
        try:
            return enum(rtype).name
        except ValueError:
            pass
    return f"0x{rtype:x}"


def _stream_seed(version: int, *, postcopy: bool = False, policies: bool = False,
                 xenstore: bool = False) -> list[Chunk]:
    rng = np.random.default_rng(version + 2 * postcopy)
    pages = rng.integers(0, 256, (NPAGES, wire.PAGE_SIZE), dtype=np.uint8)
    c = _Collect()
    w = stream.StreamWriter(c.send_parts)
    w.begin(version)
    if policies:
        w.write_record(LibxcRecordType.X86_CPUID_POLICY, bytes(48))
        w.write_record(LibxcRecordType.X86_MSR_POLICY, bytes(16))
        w.static_data_end()
    w.page_data(np.arange(0, 3), [pages[0:3]])
    types = np.array([PageType.NOTAB, PageType.XTAB, PageType.NOTAB, PageType.XALLOC])
    w.page_data(np.array([10, 11, 12, 13]), [pages[10:11], pages[12:13]], types)
    if postcopy:
        w.write_record(wire.PostcopyRecordType.BEGIN, b"")
        w.write_record(wire.PostcopyRecordType.PFNS, struct.pack("<II", 2, 0) + struct.pack("<QQ", 20, 21))
        w.page_data(np.array([20]), [pages[20:21]], record_type=wire.PostcopyRecordType.PAGE_DATA)
    w.x86_hvm_state(NPAGES, elapsed_ns=123456789)
    w.end_libxc()
    if xenstore:
        w.write_record(LibxlRecordType.EMULATOR_XENSTORE_DATA, struct.pack("<II", 0, 0) + b"k\0v\0")
    w.emulator_context(b'{"runtime": {"steps": 7}}')
    w.end_libxl()
    return c.chunks


def _fix_xl(config: dict) -> bytes:
    return savefile.encode_xl_header(config)


def _control_seed() -> list[Chunk]:
    out = []
    for ctype, body in [(ControlType.READY, b'{"guest_pid":12}'), (ControlType.RESUMED, b'{"a":1.5}'),
                        (ControlType.DIGESTS, bytes(64)), (ControlType.GUEST_CHECK, b'{"ok":true}'),
                        (ControlType.ERROR, b'{"message":"x","phase":"y"}'), (ControlType.COMMIT, b""),
                        (ControlType.SHUTDOWN, b"abc")]:
        out.append(Chunk("ctl", _join(control.encode_control(ctype, body)), ctype.name))
    return out


def build_seeds() -> dict[str, list[list[Chunk]]]:
    streams = [_stream_seed(2), _stream_seed(3), _stream_seed(3, policies=True),
               _stream_seed(2, postcopy=True, xenstore=True)]
    config = {"c_info": {"type": "hvm", "name": "f"},
              "vmem": {"format": 1, "npages": NPAGES, "page_size": 4096, "ram_digest": "x",
                       "guest": {"workload": "idle", "params": {}, "seed": 0}}}
    pre = control.encode_preamble({"npages": NPAGES, "page_size": 4096, "guest": {"workload": "idle"}})
    return {
        "stream": streams,
        "savefile": [[Chunk("xl", _fix_xl(config))] + s for s in streams[:2]],
        "control": [_control_seed()],
        "preamble": [[Chunk("preamble", pre)] + streams[0]],
    }


SEEDS = build_seeds()

# ======================================================================================
# Mutations
# ======================================================================================

LENGTHS = [0, 1, 7, 8, 9, 16, 24, 23, 25, 0x1000, 0x1008, wire.MAX_PAGE_DATA_BODY_BYTES,
           wire.MAX_PAGE_DATA_BODY_BYTES + 8, wire.MAX_RECORD_BODY_BYTES,
           wire.MAX_RECORD_BODY_BYTES + 1, wire.MAX_RECORD_BODY_BYTES + 8,
           wire.MAX_EMULATOR_CONTEXT_BYTES + 9, wire.MAX_CONTROL_BODY_BYTES + 1,
           wire.XEN_REC_LENGTH_MAX, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFF8, 0xFFFF_FFFF]
COUNTS = [0, 1, 2, 3, 4, 5, 63, 64, 1023, 1024, 1025, 0x10000, 0x7FFF_FFFF, 0xFFFF_FFFF]
TYPES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0xA, 0xB, 0xC, 0xD, 0xE, 0xF, 0x10, 0x11, 0x12, 0x13,
         0x14, 0xFF, 0x7FFF_FFFF, 0x8000_0000, 0x8000_0001, 0xFFFF_FFFF,
         *range(0x564D_0010, 0x564D_0018), 0x564D_0000, 0x564D_FFFF] + list(range(1, 11))
VERSIONS = [0, 1, 2, 3, 4, 0xFF, 0x0100_0000, 0xFFFF_FFFF]

# (op, chunk selector, argument); the chunk selector is taken modulo the chunk count.
mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16), st.integers(-9, 9)),
    st.tuples(st.just("oversize"), st.integers(0, 1 << 16), st.sampled_from(LENGTHS)),
    st.tuples(st.just("length_delta"), st.integers(0, 1 << 16), st.integers(-24, 24)),
    st.tuples(st.just("count"), st.integers(0, 1 << 16), st.sampled_from(COUNTS)),
    st.tuples(st.just("count_delta"), st.integers(0, 1 << 16), st.integers(-3, 3)),
    st.tuples(st.just("swap"), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    st.tuples(st.just("move"), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    st.tuples(st.just("duplicate"), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    st.tuples(st.just("drop"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("type"), st.integers(0, 1 << 16), st.sampled_from(TYPES)),
    st.tuples(st.just("type_random"), st.integers(0, 1 << 16), st.integers(0, 0xFFFF_FFFF)),
    st.tuples(st.just("padding"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("reserved"), st.integers(0, 1 << 16), st.integers(1, 255)),
    st.tuples(st.just("version"), st.integers(0, 1 << 16), st.sampled_from(VERSIONS)),
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("splice"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=24)),
)


def _put32(data: bytes, at: int, value: int, fmt: str = "<I") -> bytes:
    if at < 0 or at + 4 > len(data):
        return data
    return data[:at] + struct.pack(fmt, value & 0xFFFF_FFFF) + data[at + 4:]


def _mutate_chunk(c: Chunk, op: str, arg) -> Chunk:
    d = c.data
    if op in ("oversize", "length_delta"):
        if c.kind in ("rec", "ctl") and len(d) >= 8:
            length = struct.unpack_from("<I", d, 4)[0]
            d = _put32(d, 4, arg if op == "oversize" else max(0, length + arg))
        elif c.kind == "xl":
            d = _put32(d, 44 if op == "oversize" else 48, arg if op == "oversize" else len(d) + arg)
        elif c.kind == "preamble":
            d = _put32(d, 16, arg if op == "oversize" else len(d) - 20 + arg)
    elif op in ("count", "count_delta") and c.kind == "rec" and len(d) >= 12:
        count = struct.unpack_from("<I", d, 8)[0]
        d = _put32(d, 8, arg if op == "count" else max(0, count + arg))
    elif op in ("type", "type_random") and c.kind in ("rec", "ctl") and len(d) >= 8:
        d = _put32(d, 0, arg)
    elif op == "padding" and c.kind in ("rec", "ctl") and len(d) >= 8:
        length = struct.unpack_from("<I", d, 4)[0]
        pad = -length % 8
        if pad and len(d) == 8 + length + pad:
            i = len(d) - 1 - (arg % pad)
            d = d[:i] + bytes([arg]) + d[i + 1:]
    elif op == "reserved":
        spots = {"ihdr": [18, 20, 23, 17], "dhdr": [6, 7], "libxl_hdr": [12, 13], "xl": [40, 41]}
        if c.kind == "rec" and c.name in ("PAGE_DATA", "POSTCOPY_PAGE_DATA") and len(d) >= 24:
            spots = [12, 15, 16 + 6, 16 + 7]  # reserved u32, pfn bits 52-59
        elif c.kind == "rec" and c.name in ("HVM_PARAMS", "X86_TSC_INFO") and len(d) >= 32:
            spots = [12] if c.name == "HVM_PARAMS" else [28]
        else:
            spots = spots.get(c.kind, [])
        if spots:
            i = spots[arg % len(spots)]
            if i < len(d):
                d = d[:i] + bytes([d[i] | arg]) + d[i + 1:]
    elif op == "version":
        where = {"libxl_hdr": (8, ">I"), "ihdr": (12, ">I"), "dhdr": (0, "<I"), "xl": (32, "<I"),
                 "preamble": (12, ">I")}
        if c.kind in where:
            at, fmt = where[c.kind]
            d = _put32(d, at, arg, fmt)
        elif c.kind == "rec" and c.name == "HVM_CONTEXT" and len(d) >= 24:
            d = _put32(d, 8 + 8 + 4, arg)  # hvm save header version
    return Chunk(c.kind, d, c.name)


def mutate(chunks: list[Chunk], mutations) -> bytes:
    """Apply structured mutations to a seed; returns the input bytes."""
    chunks = list(chunks)
    tail: list = []  # byte-level ops run after joining
    for op, sel, arg in mutations:
        if not chunks:
            break
        i = sel % len(chunks)
        if op == "swap":
            j = arg % len(chunks)
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif op == "move":
            c = chunks.pop(i)
            chunks.insert(arg % (len(chunks) + 1), c)
        elif op == "duplicate":
            chunks.insert(arg % (len(chunks) + 1), chunks[i])
        elif op == "drop":
            chunks.pop(i)
        elif op in ("truncate", "flip", "splice"):
            tail.append((op, sel, arg))
        else:
            chunks[i] = _mutate_chunk(chunks[i], op, arg)
    data = b"".join(c.data for c in chunks)
    for op, sel, arg in tail:
        if not data:
            break
        if op == "truncate":
            # cut near a chunk boundary (arg = octets around it) or anywhere
            bounds = np.cumsum([len(c.data) for c in chunks]).tolist()
            at = bounds[sel % len(bounds)] + arg if sel % 2 else sel % len(data)
            data = data[:max(0, min(at, len(data) - 1))]
        elif op == "flip":
            at = sel % len(data)
            data = data[:at] + bytes([arg]) + data[at + 1:]
        else:
            at = sel % (len(data) + 1)
            data = data[:at] + arg + data[at:]
    return data


# ======================================================================================
# Running one input
# ======================================================================================


class Source:
    """In-memory byte source; records every request; short only at the end of data."""

    def __init__(self, data: bytes, eof_raises: bool):
        self.data = data
        self.pos = 0
        self.eof_raises = eof_raises
        self.max_request = 0

    def recv_exact(self, n: int) -> bytes:
        self.max_request = max(self.max_request, n)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        if len(out) < n and self.eof_raises:
            raise EOFError
        return out

    def recv_into(self, view) -> int:
        view = memoryview(view).cast("B")
        out = self.recv_exact(view.nbytes)
        view[:len(out)] = out
        return len(out)


@dataclass
class Options:
    """Per-input reader options (drawn by hypothesis)."""

    mode: int = 0  # payload consumer: 0 into buffer, 1 placed in RAM, 2 skip, 3 sink
    require_hvm: bool = False
    allow_postcopy: bool = True
    max_pfn: int | None = None
    eof_raises: bool = True

    def reader_options(self) -> dict:
        """StreamReader keywords.  Placing in RAM (mode 1) bounds pfns by the RAM, as the
        destination and restore do (``max_pfn = npages - 1``)."""
        max_pfn = self.max_pfn
        if self.mode == 1:
            max_pfn = NPAGES - 1 if max_pfn is None else min(max_pfn, NPAGES - 1)
        return dict(max_pfn=max_pfn, allow_postcopy=self.allow_postcopy,
                    require_hvm_state=self.require_hvm)


_PAYLOAD = np.zeros((wire.MAX_PAGES_PER_RECORD, wire.PAGE_SIZE), dtype=np.uint8)
_RAM_FD = os.memfd_create("fuzz-stream-ram", os.MFD_CLOEXEC)
os.ftruncate(_RAM_FD, NPAGES * wire.PAGE_SIZE)
_RAM_DIGESTS = np.zeros(NPAGES, dtype=np.uint64)
# One placement for every input: its 4 MiB staging buffer must not count against an
# input's allocation budget (criterion 3); each input points it at its own source.
_PLACEMENT = savefile.RamPlacement(None, _RAM_FD, _RAM_DIGESTS)


def _drive_stream(reader: stream.StreamReader, src: Source, opt: Options) -> None:
    reader.read_begin()
    _PLACEMENT.source = src
    while not reader.finished:
        rec = reader.next_record()
        if isinstance(rec, stream.PageData):
            if opt.mode == 0:
                reader.read_page_payload_into(_PAYLOAD)
            elif opt.mode == 1:
                reader.read_page_payload(_PLACEMENT)  # the path restore and migration take
            elif opt.mode == 2:
                reader.skip_page_payload()
            else:
                def sink(pfns, nbytes):
                    if src.recv_into(memoryview(_PAYLOAD).cast("B")[:nbytes]) != nbytes:
                        raise EOFError
                reader.read_page_payload(sink)
        elif rec.type is LibxlRecordType.EMULATOR_CONTEXT:
            stream.parse_emulator_record(rec)


def parse_input(target: str, src: Source, opt: Options) -> None:
    """Parse what ``src`` holds as ``target``, to the end; raises what the readers raise."""
    kw = opt.reader_options()
    if target == "stream":
        _drive_stream(stream.StreamReader(src.recv_exact, src.recv_into, **kw), src, opt)
    elif target == "savefile":
        hdr = savefile.read_xl_header(src.recv_exact)
        _drive_stream(stream.StreamReader(src.recv_exact, src.recv_into,
                                          base_offset=hdr.stream_offset, **kw), src, opt)
    elif target == "preamble":
        control.read_preamble(src.recv_exact)
        _drive_stream(stream.StreamReader(src.recv_exact, src.recv_into, **kw), src, opt)
    else:
        reader = control.ControlReader(src.recv_exact)
        while src.pos < len(src.data):
            ctype, body = reader.read()
            if ctype not in (ControlType.DIGESTS, ControlType.SHUTDOWN, ControlType.COMMIT):
                control.decode_json(body)


def run_input(target: str, data: bytes, opt: Options) -> tuple[str, int]:
    """Parse ``data`` as ``target``; returns (outcome, max request).  Outcome is "ok" or
    the StreamError's class; any other exception propagates (a bug)."""
    src = Source(data, opt.eof_raises)
    try:
        parse_input(target, src, opt)
    except StreamError as err:
        return error_class(err), src.max_request
    return "ok", src.max_request


_NUM = re.compile(r"0x[0-9a-fA-F]+|\d+")
_BYTES = re.compile(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\"")
_PAREN = re.compile(r"\s*\([^()]*\)")


def error_class(err: StreamError) -> str:
    msg = str(err).split(" (at stream offset")[0]
    msg = msg.split(": ", 1)[0] if msg.startswith("malformed JSON") else msg
    msg = _BYTES.sub("b'...'", msg)
    msg = _PAREN.sub("", msg)  # hints in parentheses vary with the input
    return _NUM.sub("#", msg)[:90]


def check_input(target: str, data: bytes, opt: Options, stats: "Stats") -> None:
    """Run one input under the three pass criteria; raises AssertionError on a violation."""
    # Traced only around the parse: tracing hypothesis's own generation would cost 10x.
    tracemalloc.start()
    try:
        outcome, max_request = run_input(target, data, opt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = ALLOC_BASE_BYTES + ALLOC_FACTOR[target] * len(data)
    assert max_request <= READ_LIMIT[target], \
        f"{target}: a read of {max_request} octets exceeds the declared limit {READ_LIMIT[target]}"
    assert peak <= bound, f"{target}: allocated {peak} octets for a {len(data)}-octet input (bound {bound})"
    stats.record(target, outcome, peak)


@dataclass
class Stats:
    outcomes: Counter = field(default_factory=Counter)
    per_target: Counter = field(default_factory=Counter)
    ok: int = 0
    total: int = 0
    peak_bytes: int = 0

    def record(self, target: str, outcome: str, peak: int) -> None:
        self.total += 1
        self.per_target[target] += 1
        self.peak_bytes = max(self.peak_bytes, peak)
        if outcome == "ok":
            self.ok += 1
        self.outcomes[outcome] += 1


options = st.builds(Options, mode=st.integers(0, 3), require_hvm=st.booleans(),
                    allow_postcopy=st.booleans(), max_pfn=st.sampled_from([None, NPAGES - 1, 12]),
                    eof_raises=st.booleans())


@st.composite
def fuzz_inputs(draw, targets=TARGETS):
    target = draw(st.sampled_from(targets))
    seed = draw(st.sampled_from(SEEDS[target]))
    muts = draw(st.lists(mutation, min_size=0, max_size=3))
    return target, mutate(seed, muts), draw(options)


def fuzz(count: int, seed: int, targets=TARGETS, progress_every: int = 10000) -> Stats:
    """Run ``count`` hypothesis-generated inputs; raises on the first violation."""
    stats = Stats()
    t0 = time.monotonic()

    @settings(max_examples=count, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(fuzz_inputs(targets))
    def one(case):
        target, data, opt = case
        try:
            check_input(target, data, opt, stats)
        except AssertionError:
            raise
        except Exception as err:
            raise AssertionError(f"{target}: {type(err).__name__} escaped the reader: {err}\n"
                                 f"options {opt}\ninput {data.hex()}") from err
        if progress_every and stats.total % progress_every == 0:
            rate = stats.total / (time.monotonic() - t0)
            print(f"  {stats.total} inputs, {rate:.0f}/s", file=sys.stderr, flush=True)

    from hypothesis import seed as hseed

    hseed(seed)(one)()
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=100_000, help="inputs to run (default 100000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", choices=TARGETS, action="append", help="only these targets")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    try:
        stats = fuzz(args.count, args.seed, tuple(args.target or TARGETS))
    except AssertionError as err:
        print(f"FAIL (seed {args.seed}): {err}", file=sys.stderr)
        return 1
    dt = time.monotonic() - t0
    print(f"{stats.total} inputs in {dt:.1f} s ({stats.total / dt:.0f}/s), seed {args.seed}")
    print("per target: " + ", ".join(f"{t} {n}" for t, n in sorted(stats.per_target.items())))
    print(f"clean successes: {stats.ok}; StreamErrors: {stats.total - stats.ok} in "
          f"{len(stats.outcomes) - ('ok' in stats.outcomes)} classes; other exceptions: 0; "
          f"peak allocation per input: {stats.peak_bytes} octets")
    for outcome, n in stats.outcomes.most_common():
        print(f"  {n:7d}  {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
