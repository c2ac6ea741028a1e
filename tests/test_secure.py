"""Tests for transport.secure: key files, mutual authentication, MacChannel, TLS.

MacChannel and TlsChannel run the channel conformance suite of tests/test_transport.py.
TLS tests make a throwaway CA and certificates with the ``openssl`` CLI in a temporary
directory that is removed afterwards (skipped if ``openssl`` is missing).
"""
from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import tempfile
import threading

import pytest

import test_transport as conformance
from test_transport import Worker
from transport import channel_pair
from transport.secure import AUTH_PROTOCOL_VERSION, AuthError, authenticate_client, authenticate_server
from transport.secure import KeyFileError, generate_key, load_key
from transport.secure import MAX_FRAME_PAYLOAD_BYTES, MacChannel
from transport.secure import TlsChannel, client_tls_context, server_tls_context
from transport.secure import tls_client_channel, tls_server_channel
from transport.tcp import accept_channel, connect_tcp, listen_tcp

JOIN_TIMEOUT_S = 60.0
KEY = bytes(range(32))


@pytest.fixture
def tmpdir_clean():
    """A temporary directory removed after the test whatever happens."""
    with tempfile.TemporaryDirectory(prefix=f"vmem-secure-{os.getpid()}-") as path:
        yield path


# -- key files ----------------------------------------------------------------------------

def test_generate_and_load_key(tmpdir_clean):
    path = os.path.join(tmpdir_clean, "key")
    key = generate_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(path) == key
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key(path)  # O_EXCL: never overwrite
    assert load_key(path) == key


def test_load_key_refuses_a_group_readable_file(tmpdir_clean):
    path = os.path.join(tmpdir_clean, "key")
    generate_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError) as info:
        load_key(path)
    assert f"chmod 600 {path}" in str(info.value)
    assert info.value.path == path


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty"),
    (b"\n  \n", "empty"),
    (b"not hex at all", "not a hex key"),
    (b"abcd", "at least 16"),
    (b"00" * 5000, "larger than"),
])
def test_load_key_refuses_bad_content(tmpdir_clean, content, fragment):
    path = os.path.join(tmpdir_clean, "key")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(KeyFileError, match=fragment):
        load_key(path)


def test_load_key_missing_file(tmpdir_clean):
    path = os.path.join(tmpdir_clean, "nope")
    with pytest.raises(KeyFileError, match="does not exist") as info:
        load_key(path)
    assert path in str(info.value)


# -- authentication -----------------------------------------------------------------------

def _handshake(client_key=KEY, server_key=KEY, purpose="control"):
    a, b = channel_pair()
    server = Worker(authenticate_server, b, server_key, timeout_s=10)
    try:
        client_result = authenticate_client(a, client_key, purpose, timeout_s=10)
        client_error = None
    except AuthError as err:
        client_result, client_error = None, err
    try:
        server_result = server.result()
        server_error = None
    except AuthError as err:
        server_result, server_error = None, err
    a.close()
    b.close()
    return client_result, client_error, server_result, server_error


def test_auth_success_gives_both_sides_the_same_fresh_session_key():
    session_key, c_err, server_result, s_err = _handshake(purpose="data-3")
    assert c_err is None and s_err is None
    purpose, server_session_key = server_result
    assert purpose == "data-3"
    assert session_key == server_session_key and len(session_key) == 32
    assert KEY not in session_key
    again, *_ = _handshake(purpose="data-3")
    assert again != session_key  # fresh nonces: a new key per connection


def test_auth_wrong_key_fails_on_both_sides():
    _r, client_error, _s, server_error = _handshake(server_key=bytes(32))
    assert client_error is not None and server_error is not None
    assert "key" in client_error.reason and "key" in server_error.reason


def test_auth_garbage_client():
    a, b = channel_pair()
    with a, b:
        a.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(AuthError, match="does not speak the vmem auth protocol"):
            authenticate_server(b, KEY, timeout_s=5)


def test_auth_garbage_server():
    a, b = channel_pair()
    with a, b:
        b.send(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(100))
        with pytest.raises(AuthError, match="does not speak the vmem auth protocol"):
            authenticate_client(a, KEY, "control", timeout_s=5)


def test_auth_huge_purpose_length_is_refused_without_allocating():
    a, b = channel_pair()
    with a, b:
        a.send(struct.pack("<4sBBH", b"VMAU", AUTH_PROTOCOL_VERSION, 1, 65535) + bytes(32))
        with pytest.raises(AuthError, match="malformed hello"):
            authenticate_server(b, KEY, timeout_s=5)


def test_auth_version_mismatch_is_reported_on_both_sides():
    # A client of a future version talks to us (the server) ...
    a, b = channel_pair()
    with a, b:
        a.send(struct.pack("<4sBBH", b"VMAU", AUTH_PROTOCOL_VERSION + 1, 1, 0) + bytes(32))
        with pytest.raises(AuthError, match="version mismatch") as info:
            authenticate_server(b, KEY, timeout_s=5)
        assert f"version {AUTH_PROTOCOL_VERSION + 1}" in str(info.value)
        # ... and gets an answer in our version with status BAD_VERSION (1).
        magic, version, kind, status = struct.unpack("<4sBBH", a.recv_exact(8))
        assert (magic, version, kind, status) == (b"VMAU", AUTH_PROTOCOL_VERSION, 2, 1)
    # We (the client) talk to a server of a future version.
    a, b = channel_pair()
    with a, b:
        b.send(struct.pack("<4sBBH", b"VMAU", AUTH_PROTOCOL_VERSION + 1, 2, 1) + bytes(64))
        with pytest.raises(AuthError, match="version mismatch"):
            authenticate_client(a, KEY, "control", timeout_s=5)


def test_auth_silent_peer_times_out():
    a, b = channel_pair()
    with a, b:
        with pytest.raises(AuthError, match="no answer"):
            authenticate_server(b, KEY, timeout_s=0.05)
        assert b.gettimeout() is None  # restored


def test_auth_peer_that_hangs_up():
    a, b = channel_pair()
    with b:
        a.close()
        with pytest.raises(AuthError, match="closed"):
            authenticate_client(b, KEY, "control", timeout_s=5)


def test_auth_argument_checks():
    a, b = channel_pair()
    with a, b:
        with pytest.raises(ValueError):
            authenticate_client(a, b"short", "control")
        with pytest.raises(ValueError):
            authenticate_client(a, KEY, "x" * 65)


# -- MacChannel ---------------------------------------------------------------------------

SESSION = bytes(range(100, 132))


def make_mac_pair():
    a, b = channel_pair()
    return MacChannel(a, SESSION, "client"), MacChannel(b, SESSION, "server")


def make_mac_tcp_pair():
    from test_tcp import make_tcp_pair

    a, b = make_tcp_pair()
    return MacChannel(a, SESSION, "client"), MacChannel(b, SESSION, "server")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("maker", [make_mac_pair, make_mac_tcp_pair], ids=["unix", "tcp"])
@pytest.mark.parametrize("check", conformance.CHANNEL_CHECKS,
                         ids=[c.__name__.removeprefix("check_")
                              for c in conformance.CHANNEL_CHECKS])
def test_mac_channel_conformance(maker, check):
    check(maker)


def _frames(*payloads: bytes) -> list[bytes]:
    """The wire bytes of each payload sent through a client MacChannel, frame by frame."""
    a, b = channel_pair()
    with MacChannel(a, SESSION, "client") as sender, b:
        out = []
        for payload in payloads:
            sender.send(payload)
            out.append(b.recv_exact(4 + len(payload) + 16))
        return out


def _receive(wire: bytes, n_bytes: int, *, close: bool = True, role: str = "server",
             session: bytes = SESSION) -> bytes:
    a, b = channel_pair()
    with a, MacChannel(b, session, role) as receiver:
        a.send(wire)
        if close:
            a.close()
        return receiver.recv_exact(n_bytes)


def test_mac_frames_verify_untouched():
    f0, f1 = _frames(b"hello", b"world!")
    assert _receive(f0 + f1, 11) == b"helloworld!"


@pytest.mark.parametrize("where", ["payload", "tag", "length"])
def test_mac_tampered_byte_detected(where):
    (frame,) = _frames(b"precious page data")
    index = {"payload": 6, "tag": len(frame) - 1, "length": 0}[where]
    tampered = bytearray(frame)
    tampered[index] ^= 0x01
    with pytest.raises(AuthError, match="integrity check failed"):
        _receive(bytes(tampered), 18)


def test_mac_replayed_and_reordered_frames_detected():
    f0, f1 = _frames(b"first", b"second")
    with pytest.raises(AuthError, match="integrity check failed"):
        _receive(f0 + f0, 10)
    with pytest.raises(AuthError, match="integrity check failed"):
        _receive(f1 + f0, 11)


def test_mac_truncated_frame_detected_and_sticky():
    (frame,) = _frames(b"x" * 1000)
    a, b = channel_pair()
    with a, MacChannel(b, SESSION, "server") as receiver:
        a.send(frame[:500])
        a.close()
        with pytest.raises(AuthError, match="truncated"):
            receiver.recv_exact(1000)
        with pytest.raises(AuthError, match="truncated"):  # sticky
            receiver.recv_exact(1)
        with pytest.raises(AuthError):
            receiver.recv_some(1)


@pytest.mark.parametrize("room", [4096, 100], ids=["frame-fits-the-buffer", "buffer-smaller-than-the-frame"])
def test_mac_hands_out_nothing_of_a_bad_frame(room):
    """A tampered frame: the receive raises, counts nothing, and stays failed.  A frame
    that fits the caller's buffer is verified where it landed (its bytes are there, but
    no call returns them); a smaller buffer gets not a single unverified byte."""
    (frame,) = _frames(b"A" * 4096)
    tampered = bytearray(frame)
    tampered[-1] ^= 0xFF
    a, b = channel_pair()
    with a, MacChannel(b, SESSION, "server") as receiver:
        a.send(bytes(tampered))
        buf = bytearray(room)
        with pytest.raises(AuthError, match="tag mismatch"):
            receiver.recv_into(buf)
        if room < 4096:
            assert buf == bytearray(room)  # verified in the internal buffer: nothing copied out
        assert receiver.bytes_received == 0
        with pytest.raises(AuthError):  # sticky: the frame's bytes are never handed out
            receiver.recv_some(1)


def test_mac_frames_land_in_the_callers_buffer_verified():
    """Frames that fit the caller's buffer are received there (no copy) and verified;
    ones split across receives go through the internal buffer; both hand out the same bytes."""
    data = bytes(range(256)) * 40000  # 10,240,000 bytes: ten full frames and a tail
    a, b = channel_pair()
    with MacChannel(a, SESSION, "client") as sender, MacChannel(b, SESSION, "server") as receiver:
        t = threading.Thread(target=sender.send, args=(data,))
        t.start()
        big = bytearray(len(data) - 5000)          # whole frames land in place, the last one split
        receiver.recv_into(big)
        tail = receiver.recv_exact(5000)           # the rest of the split frame, from the internal buffer
        t.join()
    assert bytes(big) + tail == data and receiver.bytes_received == len(data)


def test_page_data_after_a_header_arrives_in_whole_frames_verified_in_place():
    """A small header then a large buffer (a PAGE_DATA record): the header travels in a frame
    of its own, so every frame of the buffer fits the receiver's buffer for it and none
    goes through the internal verify buffer (counted)."""
    data = bytes(range(256)) * 16384  # 4 MiB: four whole frames
    a, b = channel_pair()
    with MacChannel(a, SESSION, "client") as sender, MacChannel(b, SESSION, "server") as receiver:
        buffered = []
        through_buffer = receiver._buffered
        receiver._buffered = lambda n: (buffered.append(n), through_buffer(n))
        t = threading.Thread(target=sender.send_parts, args=([b"hdr", data],))
        t.start()
        head = receiver.recv_exact(3)
        body = bytearray(len(data))
        receiver.recv_into(body)
        t.join()
    assert head == b"hdr" and bytes(body) == data
    assert buffered == [], f"frames copied through the verify buffer: {buffered}"


def test_mac_wrong_session_key_or_reflected_role_fails():
    (frame,) = _frames(b"data")
    with pytest.raises(AuthError):
        _receive(frame, 4, session=bytes(32))
    with pytest.raises(AuthError):
        _receive(frame, 4, role="client")  # our own frames sent back to us


def test_mac_oversized_length_refused_before_reading():
    header = struct.pack("<I", MAX_FRAME_PAYLOAD_BYTES + 1)
    with pytest.raises(AuthError, match="out of range"):
        _receive(header + bytes(64), 1)


def test_mac_frames_are_at_most_1_MiB():
    payload = os.urandom(MAX_FRAME_PAYLOAD_BYTES * 2 + 5)
    a, b = channel_pair()
    with MacChannel(a, SESSION, "client") as sender, MacChannel(b, SESSION, "server") as rx:
        receiver = Worker(rx.recv_exact, len(payload))
        sender.send(payload)
        assert receiver.result() == payload
        assert sender.wire_bytes_sent == len(payload) + 3 * 20  # three frames
        assert sender.bytes_sent == len(payload)


class _WriteDuringSend:
    """An inner channel that changes the caller's buffer just before the bytes go out: what
    a guest writing its RAM between MacChannel's tag and its send looks like."""

    def __init__(self, inner, victim):
        self._inner = inner
        self._victim = victim

    def send_parts(self, parts):
        self._victim[:] += 1
        self._inner.send_parts(parts)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_mac_buffer_changed_between_tag_and_send_still_verifies():
    """The bytes MACed are the bytes sent: MacChannel sends its own copy of the frame."""
    import numpy as np

    pages = np.zeros((600, 4096), dtype=np.uint8)  # 2.3 MiB: three frames, after the header's own
    a, b = channel_pair()
    with MacChannel(_WriteDuringSend(a, pages), SESSION, "client") as sender, \
            MacChannel(b, SESSION, "server") as rx:
        receiver = Worker(rx.recv_exact, pages.nbytes + 3)
        sender.send_parts([b"hdr", pages])
        got = receiver.result()  # AuthError ("tag mismatch") if tag and payload disagreed
        assert got[:3] == b"hdr" and len(got) == pages.nbytes + 3
        assert (pages == 4).all()  # the buffer really changed under each of the 4 frames


def test_mac_buffer_written_concurrently_still_verifies():
    """A thread keeps writing the buffer being sent (live guest RAM): every frame verifies."""
    import numpy as np

    pages = np.zeros((1024, 4096), dtype=np.uint8)
    stop = threading.Event()

    def scribble():
        value = 0
        while not stop.is_set():
            value = (value + 1) % 251
            pages[value::7, value] = value

    a, b = channel_pair()
    writer = threading.Thread(target=scribble, daemon=True)
    writer.start()
    try:
        with MacChannel(a, SESSION, "client") as sender, MacChannel(b, SESSION, "server") as rx:
            receiver = Worker(lambda: [rx.recv_exact(pages.nbytes) for _ in range(16)])
            for _ in range(16):
                sender.send(pages)
            assert len(receiver.result()) == 16
    finally:
        stop.set()
        writer.join(JOIN_TIMEOUT_S)


def test_mac_over_authenticated_tcp():
    listener = listen_tcp("127.0.0.1", 0)
    with listener:
        port = listener.getsockname()[1]

        def serve():
            channel, _peer = accept_channel(listener, 10)
            purpose, session_key = authenticate_server(channel, KEY)
            with MacChannel(channel, session_key, "server") as mac:
                data = mac.recv_exact(3 << 20)
                mac.send(purpose.encode() + bytes([sum(data) % 251]))

        server = Worker(serve)
        client = connect_tcp("127.0.0.1", port)
        session_key = authenticate_client(client, KEY, "control")
        with MacChannel(client, session_key, "client") as mac:
            data = os.urandom(3 << 20)
            mac.send(data)
            assert mac.recv_exact(8) == b"control" + bytes([sum(data) % 251])
        server.result()


# -- TLS ----------------------------------------------------------------------------------

def _openssl(*args: str, cwd: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"openssl {' '.join(args)}: {result.stderr}"


def _make_ca(cwd: str, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)


def _make_cert(cwd: str, name: str, ca: str, san: str) -> None:
    with open(os.path.join(cwd, f"{name}.ext"), "w") as ext:
        ext.write(f"subjectAltName={san}\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def tls_dir():
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an
    unrelated CA, in a temporary directory removed afterwards."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed (needed to make test certificates)")
    with tempfile.TemporaryDirectory(prefix=f"vmem-tls-{os.getpid()}-") as path:
        _make_ca(path, "ca")
        _make_ca(path, "otherca")
        _make_cert(path, "server", "ca", "IP:127.0.0.1,DNS:localhost")
        _make_cert(path, "client", "ca", "DNS:vmem-client")
        yield path


def _tls_pair(tls_dir: str, *, client_ca: str = "ca", mutual: bool = False):
    p = lambda name: os.path.join(tls_dir, name)  # noqa: E731
    server_ctx = server_tls_context(p("server.pem"), p("server.key"),
                                    cafile=p("ca.pem") if mutual else None)
    if mutual:
        client_ctx = client_tls_context(p(f"{client_ca}.pem"), p("client.pem"),
                                        p("client.key"))
    else:
        client_ctx = client_tls_context(p(f"{client_ca}.pem"))
    from test_tcp import make_tcp_pair

    a, b = make_tcp_pair()
    server = Worker(tls_server_channel, b, server_ctx, timeout_s=10)
    try:
        client = tls_client_channel(a, client_ctx, "127.0.0.1", timeout_s=10)
    except BaseException:
        try:
            server.result().close()
        except BaseException:
            pass
        raise
    return client, server.result()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("check", conformance.CHANNEL_CHECKS,
                         ids=[c.__name__.removeprefix("check_")
                              for c in conformance.CHANNEL_CHECKS])
def test_tls_channel_conformance(tls_dir, check):
    check(lambda: _tls_pair(tls_dir))


def test_tls_round_trip_mutual(tls_dir):
    client, server = _tls_pair(tls_dir, mutual=True)
    with client, server:
        assert isinstance(client, TlsChannel) and isinstance(server, TlsChannel)
        data = os.urandom(5 << 20)
        receiver = Worker(server.recv_exact, len(data))
        client.send_parts([data[:7], data[7:1000], memoryview(data)[1000:]])
        assert receiver.result() == data
        server.send(b"bye")
        assert client.recv_exact(3) == b"bye"
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")


def test_tls_untrusted_server_is_refused(tls_dir):
    with pytest.raises(AuthError, match="not trusted|handshake failed"):
        client, server = _tls_pair(tls_dir, client_ca="otherca")
        client.close()
        server.close()


def test_tls_missing_files_are_named(tls_dir):
    with pytest.raises(AuthError, match="nope.pem"):
        client_tls_context(os.path.join(tls_dir, "nope.pem"))
    with pytest.raises(AuthError, match="nope.pem"):
        server_tls_context(os.path.join(tls_dir, "nope.pem"), os.path.join(tls_dir, "x.key"))



def test_tls_one_thread_receives_while_another_sends(tls_dir):
    """Full duplex on one TlsChannel from two threads (a destination receives pages while
    its placer thread sends PLACED records): OpenSSL forbids concurrent calls on one SSL
    object, so TlsChannel serialises them; both streams must arrive whole and in order.
    Without the serialisation this failed at once here (a spurious EOF mid-stream)."""
    client, server = _tls_pair(tls_dir)
    with client, server:
        # timeouts, as the agents set them: Python then runs the socket non-blocking, and
        # an unserialised SSL_write clears the retry state of a concurrent SSL_read's
        # EAGAIN, which then reads as an EOF
        client.settimeout(60)
        server.settimeout(60)
        bulk = os.urandom(1 << 20)
        end = bytes(len(bulk))  # all zeros: the bulk's end
        small = [i.to_bytes(4, "little") * 4 for i in range(20000)]
        done = threading.Event()

        def serve_bulk():  # server: one thread receives the bulk...
            count = 0
            while True:
                got = server.recv_exact(len(bulk))
                if got == end:
                    return count
                assert got == bulk, f"bulk message {count} arrived changed"
                count += 1

        def serve_small():  # ...while another sends the small records
            for m in small:
                server.send(m)

        def client_small():
            try:
                return [client.recv_exact(16) for _ in small]
            finally:
                done.set()

        got_bulk = Worker(serve_bulk)
        sent_small = Worker(serve_small)
        got_small = Worker(client_small)
        sent = 0
        while not done.is_set() and sent < 4096:  # bounded: at most 4 GiB
            client.send(bulk)
            sent += 1
        client.send(end)
        assert got_bulk.result() == sent
        sent_small.result()
        assert got_small.result() == small


def test_a_large_view_starts_a_frame_of_its_own():
    """MacChannel's frames: small views are packed together, a large one (page data) starts
    a frame, so it is cut at whole frames from its own start (received in place)."""
    from transport.channel import _cut_views

    small, large = memoryview(bytes(100)), memoryview(bytes(2 * 1024 + 50))
    plain = [n for _, n in _cut_views([small, large, small], 1024)]
    assert plain == [1024, 1024, 250]
    split = [(len(g), n) for g, n in _cut_views([small, large, small], 1024, 512)]
    assert split == [(1, 100), (1, 1024), (1, 1024), (2, 150)]
    # a large view that fits in the frame being filled is not split off; a small one never is
    assert [n for _, n in _cut_views([small, memoryview(bytes(600))], 1024, 512)] == [700]
    assert [n for _, n in _cut_views([small] * 12, 1024, 512)] == [1024, 176]


# -- sealed frames (transport.seal: a TLS link's urgent connection, spoken natively) -------


def _sealed_wire(*payloads: bytes, key: bytes = SESSION) -> list[bytes]:
    """The frames a SealedChannel client puts on the wire for ``payloads`` (one each)."""
    from transport.seal import SealedChannel

    a, b = channel_pair()
    with b, SealedChannel(a, key, "client") as sender:
        for p in payloads:
            sender.send(p)
        return [b.recv_exact(4 + len(p) + 16) for p in payloads]


@pytest.mark.parametrize("fault", [None, "payload", "tag", "replay", "other-key", "mac-peer"])
def test_sealed_frames_are_encrypted_and_checked(fault):
    """SealedChannel: the payload is not on the wire in the clear; a receiver with the
    session key gets it back; a flipped ciphertext or tag byte, a replayed frame, another
    session's key, or a MacChannel peer (same framing, tag only) is refused with the
    integrity error, and nothing of it is handed out."""
    from transport.seal import SealedChannel

    secret = b"confidential guest page " * 100
    f0, f1 = _sealed_wire(secret, b"second")
    assert secret[:24] not in f0 + f1
    wire, key = f0 + f1, SESSION
    if fault == "payload":
        wire = bytes([*wire[:10], wire[10] ^ 1, *wire[11:]])
    elif fault == "tag":
        wire = wire[:len(f0) - 1] + bytes([wire[len(f0) - 1] ^ 1]) + wire[len(f0):]
    elif fault == "replay":
        wire = f0 + f0
    elif fault == "other-key":
        key = bytes(range(1, 33))
    elif fault == "mac-peer":
        a, b = channel_pair()
        with b, MacChannel(a, SESSION, "client") as mac_sender:
            mac_sender.send(secret)
            mac_sender.send(b"second")
            wire = b.recv_exact(len(f0) + len(f1))
        assert secret[:24] in wire  # a MacChannel frame carries it in the clear
    a, b = channel_pair()
    with a, SealedChannel(b, key, "server") as receiver:
        a.send(wire)
        a.close()
        if fault is None:
            assert receiver.recv_exact(len(secret) + 6) == secret + b"second"
            return
        with pytest.raises(AuthError, match="integrity check failed"):
            receiver.recv_exact(len(secret) + 6)
        assert receiver.bytes_received == (len(secret) if fault == "replay" else 0)
