"""Identities, peer addresses, sealed channels and the handshake: every refusal has its own test."""
import asyncio
import os
import stat
import time

import aiohttp
import pytest
from aiohttp import web

from dllm.net import crypto
from dllm.net.crypto import (
    AuthError,
    ChannelClosedError,
    ChannelError,
    HandshakeError,
    Identity,
    IdentityError,
    KeyFormatError,
    NotAllowedError,
    PeerAddress,
    PeerAddressError,
    ReorderError,
    ReplayError,
    SecureChannel,
    StaleHelloError,
    WrongKeyError,
    client_finish,
    client_hello,
    decode_public_key,
    server_accept,
    verify,
)

A, B, C = (Identity.from_seed(bytes([i]) * 32) for i in (1, 2, 3))
CID = bytes(range(15))


def pair(a=A, b=B, cid=CID):
    """(initiator end held by a, responder end held by b) on one channel id."""
    return SecureChannel(a, b.public_key, cid, True), SecureChannel(b, a.public_key, cid, False)


def handshake(client=A, server=B, allowed=None):
    hello, st = client_hello(client, server.public_key)
    srv, reply = server_accept(server, hello, allowed)
    return client_finish(st, reply), srv


# ---------------------------------------------------------------- identity
def test_identity_save_load_roundtrip_mode_0600(tmp_path):
    path = tmp_path / "node.key"
    A.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    back = Identity.load(path)
    assert back.public_key == A.public_key
    verify(A.public_key, b"msg", back.sign(b"msg"))


def test_identity_never_looser_than_0600_even_while_writing(tmp_path, monkeypatch):
    modes, real_write = [], os.write

    def spy(fd, data):
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    old = os.umask(0)  # the most permissive umask must not loosen the file
    try:
        monkeypatch.setattr(os, "write", spy)
        A.save(tmp_path / "k")
    finally:
        os.umask(old)
    assert modes and all(m == 0o600 for m in modes)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["k"]  # no temp file left behind


def test_identity_refuses_overwrite_unless_asked(tmp_path):
    path = tmp_path / "k"
    A.save(path)
    with pytest.raises(IdentityError, match="already exists"):
        B.save(path)
    B.save(path, overwrite=True)
    assert Identity.load(path).public_key == B.public_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_identity_load_refuses_loose_mode(tmp_path, mode):
    path = tmp_path / "k"
    A.save(path)
    path.chmod(mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.parametrize("text, match", [
    ("", "not a dllm identity"),
    ("hello\nseed x\n", "not a dllm identity"),
    ("dllm-identity-v1\npublic abc\n", "not a dllm identity"),
    ("dllm-identity-v1\nseed short\n", "base64url"),
    (f"dllm-identity-v1\nseed {'A' * 43}\npublic {B.public_key}\n", "does not match"),
])
def test_identity_load_rejects_corrupt_files(tmp_path, text, match):
    path = tmp_path / "k"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match=match):
        Identity.load(path)


def test_identity_load_missing_file(tmp_path):
    with pytest.raises(IdentityError, match="does not exist"):
        Identity.load(tmp_path / "nope")


def test_identity_repr_hides_secret():
    assert repr(A) == f"Identity(public_key={A.public_key!r})"


def test_sign_verify():
    sig = A.sign(b"hello")
    assert len(sig) == 64
    verify(A.public_key, b"hello", sig)
    verify(A.public_key_bytes, b"hello", sig)
    with pytest.raises(AuthError):
        verify(A.public_key, b"hellO", sig)
    with pytest.raises(AuthError):
        verify(B.public_key, b"hello", sig)
    with pytest.raises(AuthError):
        verify(A.public_key, b"hello", sig[:-1])


# ---------------------------------------------------------------- keys and addresses
def test_public_key_is_43_char_base64url():
    for ident in (A, B, C, Identity.generate()):
        assert len(ident.public_key) == 43
        assert set(ident.public_key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert decode_public_key(ident.public_key) == ident.public_key_bytes


@pytest.mark.parametrize("key", ["", "abc", A.public_key + "A", A.public_key[:-1] + "+", A.public_key[:-1] + "=",
                                 "A" * 43, b"\x00" * 31, b"\x00" * 32, 42])
def test_decode_public_key_rejects(key):
    with pytest.raises(KeyFormatError):
        decode_public_key(key)


def test_decode_public_key_rejects_non_canonical_last_char():
    last = A.public_key[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    sibling = alphabet[alphabet.index(last) ^ 1]  # same 6-bit prefix, unused low bit set differently
    with pytest.raises(KeyFormatError, match="canonical|base64url|point"):
        decode_public_key(A.public_key[:-1] + sibling)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "node-1.example.org", "::1", "fe80::1"])
def test_peer_address_roundtrip(host):
    shown = f"[{host}]" if ":" in host else host
    s = f"{A.public_key}@{shown}:7000"
    addr = PeerAddress.parse(s)
    key, h, port = addr
    assert (key, h, port) == (A.public_key, host, 7000)
    assert str(addr) == s
    assert PeerAddress.parse(str(addr)) == addr


@pytest.mark.parametrize("s, match", [
    ("", "empty"),
    (f" {A.public_key}@h:1", "whitespace"),
    (f"{A.public_key}h:1", "no '@'"),
    ("@h:1", "43 characters"),
    (f"{A.public_key[:-2]}@h:1", "43 characters"),
    (f"{'A' * 43}@h:1", "point"),
    (f"{A.public_key}@h", "no ':port'"),
    (f"{A.public_key}@:1", "host"),
    (f"{A.public_key}@h h:1", "host"),
    (f"{A.public_key}@a@b:1", "host"),
    (f"{A.public_key}@-bad-:1", "host"),
    (f"{A.public_key}@h:0", "port"),
    (f"{A.public_key}@h:65536", "port"),
    (f"{A.public_key}@h:http", "port"),
    (f"{A.public_key}@h:+80", "port"),
    (f"{A.public_key}@h:080", "port"),
    (f"{A.public_key}@h:", "port"),
    (f"{A.public_key}@h:１２", "port"),
    (f"{A.public_key}@::1:80", "host"),
    (f"{A.public_key}@[::1:80", "IPv6"),
    (f"{A.public_key}@[::1]80", "IPv6"),
    (f"{A.public_key}@[nothex]:80", "not an IPv6"),
])
def test_peer_address_malformed(s, match):
    with pytest.raises(PeerAddressError, match=match):
        PeerAddress.parse(s)


def test_peer_address_not_a_string():
    with pytest.raises(PeerAddressError, match="string"):
        PeerAddress.parse(b"x@y:1")


# ---------------------------------------------------------------- secure channel
def test_channel_roundtrip_both_directions():
    a, b = pair()
    for i in range(50):
        msg = os.urandom(i * 37)
        assert b.open(a.seal(msg)) == msg
        assert a.open(b.seal(msg[::-1])) == msg[::-1]
    assert (a.send_seq, a.recv_seq, b.send_seq, b.recv_seq) == (50, 50, 50, 50)
    assert isinstance(b.open(a.seal(bytearray(b"x"))), bytearray)  # writable: zero-copy decode is safe
    assert b.open(a.seal(memoryview(b"yz"))) == b"yz"


def test_sealed_layout_and_overhead():
    a, _ = pair()
    f0, f1 = a.seal(b"abc"), a.seal(b"abc")
    assert len(f0) == 3 + crypto.SEAL_OVERHEAD == 31
    assert f0[:4] == f1[:4] and f0[4:12] == (0).to_bytes(8, "little") and f1[4:12] == (1).to_bytes(8, "little")
    assert f0[12:] != f1[12:]  # nonce differs per seq


def test_directions_use_distinct_nonces():
    a, b = pair()
    fa, fb = a.seal(b"same"), b.seal(b"same")
    assert fa[4:12] == fb[4:12] and fa[12:] != fb[12:]


def expect_closed(ch, frame):
    assert ch.closed
    with pytest.raises(ChannelClosedError, match="closed"):
        ch.open(frame)
    with pytest.raises(ChannelClosedError):
        ch.seal(b"more")


def test_tamper_any_bit_fails_authentication():
    a, _ = pair()
    a.seal(b"first")
    good = bytes(a.seal(b"hidden state bytes " * 2))
    for bit in range(len(good) * 8):
        _, b = pair()
        b.recv_seq = 1  # the frame under test is seq 1
        bad = bytearray(good)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(AuthError) as e:
            b.open(bad)
        assert type(e.value) is (WrongKeyError if bit < 32 else AuthError), bit
        expect_closed(b, good)


def test_tamper_survives_copied_tag():
    """A third party that copies a valid tag from the wire still cannot forge a frame."""
    a, b = pair()
    c, _ = pair(C, B)
    forged = c.seal(b"evil")
    forged[:4] = a.seal(b"x")[:4]
    with pytest.raises(AuthError, match="failed authentication") as e:
        b.open(forged)
    assert type(e.value) is AuthError


def test_truncated_frame():
    a, b = pair()
    frame = a.seal(b"payload")
    for cut in (0, 1, 12, 27, 28, len(frame) - 1):
        _, b = pair()
        with pytest.raises(AuthError):
            b.open(frame[:cut])
        assert b.closed


def test_open_rejects_non_bytes():
    _, b = pair()
    with pytest.raises(AuthError, match="bytes-like"):
        b.open("text")


def test_replay():
    a, b = pair()
    f0 = a.seal(b"zero")
    assert b.open(f0) == b"zero"
    with pytest.raises(ReplayError, match="seq 0 was already accepted"):
        b.open(f0)
    expect_closed(b, a.seal(b"one"))


def test_swap_two_frames():
    a, b = pair()
    f0, f1 = a.seal(b"zero"), a.seal(b"one")
    with pytest.raises(ReorderError, match="expected seq 0, got 1") as e:
        b.open(f1)
    assert (e.value.expected, e.value.got, e.value.missing) == (0, 1, 1)
    expect_closed(b, f0)


def test_drop_one_frame():
    a, b = pair()
    f0, _f1, f2 = a.seal(b"0"), a.seal(b"1"), a.seal(b"2")
    assert b.open(f0) == b"0"
    with pytest.raises(ReorderError, match="1 frame\\(s\\) dropped or reordered") as e:
        b.open(f2)
    assert e.value.missing == 1
    expect_closed(b, _f1)


def test_wrong_key():
    a, _ = pair()
    frame = a.seal(b"for B only")
    c_end = SecureChannel(C, A.public_key, CID, False)  # C pretends to be B
    with pytest.raises(WrongKeyError, match="not sealed for this channel"):
        c_end.open(frame)
    expect_closed(c_end, frame)


def test_replay_from_another_connection():
    a1, _ = pair(cid=b"\x01" * 15)
    _, b2 = pair(cid=b"\x02" * 15)
    with pytest.raises(WrongKeyError):
        b2.open(a1.seal(b"old connection"))


def test_reflected_frame():
    a, _ = pair()
    frame = a.seal(b"to B")
    with pytest.raises(WrongKeyError):
        a.open(frame)


def test_close_then_use():
    a, _ = pair()
    a.close()
    with pytest.raises(ChannelClosedError, match="closed by owner"):
        a.seal(b"x")
    assert "closed" in repr(a)


def test_bad_channel_id_and_peer_key():
    with pytest.raises(ChannelError, match="15 bytes"):
        SecureChannel(A, B.public_key, b"short", True)
    with pytest.raises(KeyFormatError):
        SecureChannel(A, "not-a-key", CID, True)


def test_seal_rejects_non_bytes():
    a, _ = pair()
    with pytest.raises(ChannelError, match="bytes-like"):
        a.seal("text")


def test_send_sequence_exhaustion():
    a, _ = pair()
    a.send_seq = 2**64 - 1
    with pytest.raises(ChannelError, match="exhausted"):
        a.seal(b"x")
    assert a.closed


def test_pure_pynacl_fallback_interoperates(monkeypatch):
    """Without pynacl's private cffi module the public bindings give the same bytes and errors."""
    a, b = pair()
    fast = [a.seal(b"fast %d" % i) for i in range(2)]
    monkeypatch.setattr(crypto, "_lib", None)
    slow = [a.seal(b"slow %d" % i) for i in range(2)]
    assert b.open(fast[0]) == b"fast 0" and b.open(fast[1]) == b"fast 1"  # opened by the slow path
    monkeypatch.undo()
    assert b.open(slow[0]) == b"slow 0"                                  # opened by the fast path
    monkeypatch.setattr(crypto, "_lib", None)
    bad = bytearray(slow[1])
    bad[-1] ^= 1
    with pytest.raises(AuthError, match="failed authentication"):
        b.open(bad)


# ---------------------------------------------------------------- handshake
def test_handshake_gives_matching_channels():
    cli, srv = handshake()
    assert cli.channel_id == srv.channel_id and len(cli.channel_id) == 15
    assert cli.initiator and not srv.initiator
    assert cli.peer_public_key == B.public_key and srv.peer_public_key == A.public_key
    assert srv.open(cli.seal(b"ping")) == b"ping"
    assert cli.open(srv.seal(b"pong")) == b"pong"


def test_each_handshake_gets_a_fresh_channel_id():
    ids = {handshake()[0].channel_id for _ in range(20)}
    assert len(ids) == 20


def test_allowed_list():
    handshake(allowed=[A.public_key, C.public_key])
    handshake(allowed={A.public_key_bytes})
    with pytest.raises(NotAllowedError, match="not in this server's allow-list"):
        handshake(allowed=[C.public_key])
    with pytest.raises(NotAllowedError):
        handshake(allowed=[])


@pytest.mark.parametrize("skew", [61.0, -61.0, 3600.0])
def test_stale_hello(skew):
    hello, _ = client_hello(A, B.public_key, now=time.time() + skew)
    with pytest.raises(StaleHelloError, match="off the server clock"):
        server_accept(B, hello)


def test_hello_within_skew_is_fine():
    hello, st = client_hello(A, B.public_key, now=1_000_000.0)
    srv, reply = server_accept(B, hello, now=1_000_059.0)
    assert client_finish(st, reply).channel_id == srv.channel_id


def test_impersonated_server_is_refused_by_client():
    """C answers a client that expected B: C cannot open the hello, and its own reply fails."""
    hello, st = client_hello(A, B.public_key)
    with pytest.raises(AuthError):
        server_accept(C, hello)  # C cannot read a hello meant for B
    _, c_reply = server_accept(C, client_hello(A, C.public_key)[0])
    with pytest.raises(AuthError, match="not sealed by the expected server key"):
        client_finish(st, c_reply)


def test_replayed_reply_is_refused():
    old_hello, _ = client_hello(A, B.public_key)
    _, old_reply = server_accept(B, old_hello)
    _, st = client_hello(A, B.public_key)
    with pytest.raises(AuthError, match="does not answer this hello"):
        client_finish(st, old_reply)


def test_tampered_reply():
    hello, st = client_hello(A, B.public_key)
    _, reply = server_accept(B, hello)
    bad = bytearray(reply)
    bad[-1] ^= 0x80
    with pytest.raises(AuthError):
        client_finish(st, bytes(bad))


def test_tampered_hello_any_byte():
    hello, _ = client_hello(A, B.public_key)
    for i in range(len(hello)):
        bad = bytearray(hello)
        bad[i] ^= 0x01
        with pytest.raises(ChannelError):
            server_accept(B, bytes(bad))


def test_forged_hello_with_someone_elses_key():
    """C puts A's public key in a hello it seals with its own secret: the box does not open."""
    hello, _ = client_hello(C, B.public_key)
    forged = hello[:6] + A.public_key_bytes + hello[38:]
    with pytest.raises(AuthError, match="not sealed by the holder of client key"):
        server_accept(B, forged, allowed=[A.public_key])


def test_replayed_hello_yields_new_channel_and_old_frames_fail():
    hello, st = client_hello(A, B.public_key)
    srv1, reply = server_accept(B, hello)
    cli = client_finish(st, reply)
    srv2, _ = server_accept(B, hello)  # attacker replays the hello within the skew window
    assert srv2.channel_id != srv1.channel_id
    with pytest.raises(WrongKeyError):
        srv2.open(cli.seal(b"request"))


@pytest.mark.parametrize("msg", [b"", b"DLHS", b"x" * 142, b"x" * 141, "str"])
def test_malformed_hello(msg):
    with pytest.raises(HandshakeError):
        server_accept(B, msg)


def test_hello_with_invalid_client_point():
    hello, _ = client_hello(A, B.public_key)
    with pytest.raises(HandshakeError, match="unusable client key"):
        server_accept(B, hello[:6] + b"\x00" * 32 + hello[38:])


def test_malformed_reply_and_state_reuse():
    hello, st = client_hello(A, B.public_key)
    _, reply = server_accept(B, hello)
    with pytest.raises(HandshakeError, match="bytes"):
        client_finish(st, reply[:-1])
    with pytest.raises(HandshakeError, match="already used"):
        client_finish(st, reply)  # a state is single-use even after a failure
    hello, st = client_hello(A, B.public_key)
    with pytest.raises(HandshakeError, match="wrong header"):
        client_finish(st, hello[:118])


# ---------------------------------------------------------------- over a real WebSocket
async def _ws_session(client: Identity, allowed: list[str]) -> tuple[list, bytes | None]:
    """A tiny stage server on loopback: handshake, then echo sealed frames. Returns what the client saw."""
    async def stage(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        try:
            ch, reply = server_accept(B, await ws.receive_bytes(), allowed)
        except ChannelError:
            await ws.close(code=1008)  # policy violation: the refused client gets no bytes at all
            return ws
        await ws.send_bytes(reply)
        async for msg in ws:
            await ws.send_bytes(ch.seal(ch.open(msg.data)))
        return ws

    app = web.Application()
    app.router.add_get("/", stage)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    seen, echoed = [], None
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/") as ws:
            hello, st = client_hello(client, B.public_key)
            await ws.send_bytes(hello)
            msg = await ws.receive()
            seen.append(msg.type)
            if msg.type == aiohttp.WSMsgType.BINARY:
                ch = client_finish(st, msg.data)
                await ws.send_bytes(ch.seal(b"hidden row"))
                echoed = bytes(ch.open(await ws.receive_bytes()))
    finally:
        await runner.cleanup()
    return seen, echoed


def test_handshake_and_frames_over_aiohttp_websocket():
    seen, echoed = asyncio.run(_ws_session(A, [A.public_key]))
    assert seen == [aiohttp.WSMsgType.BINARY] and echoed == b"hidden row"
    seen, echoed = asyncio.run(_ws_session(C, [A.public_key]))  # C is not allowed
    assert seen == [aiohttp.WSMsgType.CLOSE] and echoed is None
