"""Node identities, peer addresses, sealed channels and the WebSocket handshake.

Identity
    An ed25519 signing key (pynacl). The public key prints as **unpadded base64url of the 32 raw
    bytes** (43 characters, alphabet ``A-Z a-z 0-9 - _``), so it can sit in ``PUBKEY@host:port``.
    On disk (``Identity.save``) the file is three text lines, mode 0600::

        dllm-identity-v1
        seed <base64url of the 32-byte ed25519 seed>
        public <base64url public key>        (checked against the seed on load)

    ``Identity.load`` *refuses* (IdentityError) a file whose mode grants any group/other bits,
    like ssh does: a key that others could read must be treated as leaked, not silently used.

SecureChannel
    Both nodes turn their ed25519 keys into X25519 keys (``crypto_sign_ed25519_*_to_curve25519``)
    and precompute the NaCl box key once (``crypto_box_beforenm``). A sealed frame is::

        key tag  4 B   keyed blake2b(direction | channel id): "was this sealed for this channel?"
        seq      8 B   u64 little-endian, 0, 1, 2, ... per direction
        box     16 B + n   XSalsa20-Poly1305 (MAC + ciphertext) of the n-byte plaintext

    The 24-byte nonce is never sent; both sides build it as
    ``direction (1 B: 0x01 initiator->responder, 0x02 back) | channel id (15 B) | seq (8 B LE)``,
    so a nonce never repeats under one key pair as long as channel ids are fresh (the handshake
    mixes 16 random bytes from each side into the id). The receiver authenticates first, then
    demands exactly the next seq. Every failure closes the channel for good:

    - a bit flipped anywhere, or a truncated frame  -> AuthError (WrongKeyError if the flip hits the tag)
    - sealed under other keys, on another connection,
      or our own frame reflected back to us          -> WrongKeyError (a subclass of AuthError)
    - authentic, but its seq was already accepted    -> ReplayError
    - authentic, but its seq is ahead of the next    -> ReorderError (.missing = frames skipped; a dropped
                                                        frame and two swapped frames look identical at the
                                                        moment the receiver must decide)
    - any call after a failure or close()            -> ChannelClosedError

    One channel per connection, usable in both directions (independent counters), so a stage
    server holds one per connected peer and each link of the ring coordinator -> stage1 -> ... ->
    stageN -> coordinator is one channel. Not thread-safe: one writer seals *and sends* in order,
    one reader opens in order.

Handshake (three calls, raw bytes on a WebSocket before any frame)::

    client                                   server
    hello, st = client_hello(me, server_pk)  -->  ch, reply = server_accept(me, hello, allowed)
    ch = client_finish(st, reply)            <--  (on any error: close the socket, send nothing)

    hello (142 B) = "DLHS" | ver 1 | type 1 | client pk (32) | nonce (24)
                    | box_{client->server}("dllm-c2s" | server pk | client rand (16) | unix ms u64)
    reply (118 B) = "DLHS" | ver 1 | type 2 | nonce (24)
                    | box_{server->client}("dllm-s2c" | client pk | client rand | server rand (16))

    Only the holder of the client's secret key (or the server itself) can make the hello box; only
    the holder of the expected server key can make a reply the client opens, and the echoed client
    rand ties it to this hello. Channel id = blake2b(client rand | server rand)[:15]: a replayed
    hello yields a fresh id, so it can never make the server reuse a nonce. The hello is refused
    (StaleHelloError) if its clock is > 60 s from the server's, and (NotAllowedError) if the client
    key is not in ``allowed`` when that is given. Handshake nonces start with 0x03 / 0x04, so they
    can never equal a channel nonce (0x01 / 0x02) under the same key pair.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import stat
import struct
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

from dllm.errors import DllmError

try:  # zero-copy path: seal/open straight into the output buffer (2.3x faster at 20 MB)
    from nacl._sodium import ffi as _ffi
    from nacl._sodium import lib as _lib
except ImportError:  # pragma: no cover - pynacl without its cffi module exposed
    _ffi = _lib = None

KEY_BYTES = 32
CHANNEL_ID_BYTES = 15          # 1 direction + 15 channel id + 8 seq = 24-byte nonce
TAG_BYTES = 4
SEQ_BYTES = 8
MAC_BYTES = sodium.crypto_secretbox_MACBYTES  # 16 (crypto_box_afternm is secretbox under the shared key)
SEAL_OVERHEAD = TAG_BYTES + SEQ_BYTES + MAC_BYTES  # 28
MAX_SKEW_S = 60.0

_TO_RESPONDER, _TO_INITIATOR, _HELLO_NONCE, _REPLY_NONCE = b"\x01", b"\x02", b"\x03", b"\x04"
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{43}")
_ID_HEADER = "dllm-identity-v1"


# ---------------------------------------------------------------- errors
class KeyFormatError(DllmError):
    """A public key string is not 43 chars of base64url naming a valid ed25519 point."""


class IdentityError(DllmError):
    """An identity file is missing, malformed, or readable by others."""


class PeerAddressError(DllmError):
    """A ``PUBKEY@host:port`` string is malformed."""


class ChannelError(DllmError):
    """A sealed channel refused a frame or a call; the channel is closed afterwards."""


class AuthError(ChannelError):
    """A frame or handshake message failed authentication (tampered, or the wrong peer)."""


class WrongKeyError(AuthError):
    """A frame was sealed for another key pair, another connection, or the other direction."""


class ReplayError(ChannelError):
    """An authentic frame carried a sequence number the receiver already accepted."""


class ReorderError(ChannelError):
    """An authentic frame arrived ahead of its turn: earlier frames were dropped or swapped."""

    def __init__(self, msg: str, expected: int, got: int):
        super().__init__(msg)
        self.expected, self.got, self.missing = expected, got, got - expected


class ChannelClosedError(ChannelError):
    """The channel was closed (by close() or an earlier failure) and refuses further use."""


class HandshakeError(ChannelError):
    """A hello or reply is malformed, or the handshake state was misused."""


class StaleHelloError(HandshakeError):
    """The hello's timestamp is more than MAX_SKEW_S away from the server's clock."""


class NotAllowedError(HandshakeError):
    """The client's key is not in the server's allow-list."""


# ---------------------------------------------------------------- keys
def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode("ascii")


def encode_public_key(raw: bytes) -> str:
    """32 raw ed25519 public-key bytes -> 43-char unpadded base64url."""
    return _b64(raw)


def decode_public_key(key: str | bytes) -> bytes:
    """Printable key (or 32 raw bytes) -> 32 raw bytes, checked to be a usable ed25519 point."""
    if isinstance(key, (bytes, bytearray)):
        raw = bytes(key)
        if len(raw) != KEY_BYTES:
            raise KeyFormatError(f"raw public key is {len(raw)} bytes, expected {KEY_BYTES}")
    elif isinstance(key, str):
        raw = _b64_key(key, "public key")
    else:
        raise KeyFormatError(f"public key must be str or bytes, got {type(key).__name__}")
    _curve_public(raw)
    return raw


def _b64_key(s: str, what: str) -> bytes:
    if not _KEY_RE.fullmatch(s):
        shown = s if len(s) <= 60 else s[:57] + "..."
        raise KeyFormatError(f"{what} {shown!r} is not 43 characters of unpadded base64url")
    raw = base64.urlsafe_b64decode(s + "=")
    if _b64(raw) != s:  # last char carries 2 unused bits: demand the canonical form
        raise KeyFormatError(f"{what} {s!r} is not canonical base64url (last character)")
    return raw


def _curve_public(raw: bytes) -> bytes:
    try:
        return sodium.crypto_sign_ed25519_pk_to_curve25519(raw)
    except nacl.exceptions.RuntimeError:
        raise KeyFormatError(f"public key {encode_public_key(raw)} is not a valid ed25519 point") from None


def verify(public_key: str | bytes, message: bytes, signature: bytes) -> None:
    """Check a detached ed25519 signature; raise AuthError if it is not valid for this key."""
    try:
        nacl.signing.VerifyKey(decode_public_key(public_key)).verify(bytes(message), bytes(signature))
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        raise AuthError(f"signature is not valid for key {_short(public_key)}") from None


def _short(key: str | bytes) -> str:
    s = key if isinstance(key, str) else encode_public_key(key) if len(key) == KEY_BYTES else repr(key)
    return s[:12] + "..."


# ---------------------------------------------------------------- identity
class Identity:
    """A node's ed25519 key pair. ``repr`` shows only the public key."""

    def __init__(self, signing_key: nacl.signing.SigningKey):
        self._sk = signing_key
        self.public_key_bytes: bytes = bytes(signing_key.verify_key)
        self.public_key: str = encode_public_key(self.public_key_bytes)
        self._curve_sk = bytes(signing_key.to_curve25519_private_key())

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != KEY_BYTES:
            raise IdentityError(f"ed25519 seed is {len(seed)} bytes, expected {KEY_BYTES}")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    def sign(self, message: bytes) -> bytes:
        """64-byte detached ed25519 signature of ``message``."""
        return self._sk.sign(bytes(message)).signature

    def __repr__(self) -> str:
        return f"Identity(public_key={self.public_key!r})"

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the key atomically with mode 0600: the bytes never sit in a looser file."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise IdentityError(f"{path} already exists; refusing to overwrite an identity")
        text = f"{_ID_HEADER}\nseed {_b64(bytes(self._sk))}\npublic {self.public_key}\n".encode("ascii")
        # mkstemp creates with O_EXCL and mode 0600; fchmod guards against an odd platform default.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            _install(tmp, path, overwrite)
        finally:
            if fd >= 0:
                os.close(fd)
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        path = Path(path)
        try:
            st = path.stat()
            text = path.read_text("ascii")
        except FileNotFoundError:
            raise IdentityError(f"identity file {path} does not exist (create one with `dllm keygen`)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise IdentityError(f"cannot read identity file {path}: {e}") from None
        if os.name == "posix" and st.st_mode & 0o077:
            raise IdentityError(f"identity file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others may have "
                                f"read the secret key; run `chmod 600 {path}` if it never left your control")
        return cls._parse(text, path)

    @classmethod
    def _parse(cls, text: str, path: Path) -> Identity:
        lines = text.split("\n")
        fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
        if not lines or lines[0] != _ID_HEADER or "seed" not in fields:
            raise IdentityError(f"{path} is not a dllm identity file (expected first line {_ID_HEADER!r})")
        try:
            ident = cls.from_seed(_b64_key(fields["seed"], "seed"))
        except KeyFormatError as e:
            raise IdentityError(f"{path}: {e}") from None
        if fields.get("public", ident.public_key) != ident.public_key:
            raise IdentityError(f"{path}: public line does not match the seed (file edited or corrupt)")
        return ident


def _install(tmp: str, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # atomic no-clobber
        except FileExistsError:
            raise IdentityError(f"{path} already exists; refusing to overwrite an identity") from None
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------- peer address
class PeerAddress(NamedTuple):
    """``PUBKEY@host:port``; IPv6 hosts are bracketed: ``KEY@[::1]:7000``."""

    public_key: str
    host: str
    port: int

    @classmethod
    def parse(cls, s: str) -> PeerAddress:
        if not isinstance(s, str):
            raise PeerAddressError(f"peer address must be a string, got {type(s).__name__}")
        if s != s.strip() or not s:
            raise PeerAddressError(f"peer address {s!r} is empty or has surrounding whitespace")
        key, at, hostport = s.partition("@")
        if not at:
            raise PeerAddressError(f"peer address {s!r} has no '@': expected PUBKEY@host:port")
        try:
            decode_public_key(key)
        except KeyFormatError as e:
            raise PeerAddressError(f"peer address {s!r}: {e}") from None
        host, port = _split_hostport(s, hostport)
        return cls(key, host, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.public_key}@{host}:{self.port}"


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")  # DNS name or dotted IPv4


def _split_hostport(s: str, hostport: str) -> tuple[str, int]:
    if hostport.startswith("["):
        host, close, rest = hostport[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise PeerAddressError(f"peer address {s!r}: IPv6 host must look like [::1]:port")
        port_s = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise PeerAddressError(f"peer address {s!r}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_s = hostport.rpartition(":")
        if not colon:
            raise PeerAddressError(f"peer address {s!r} has no ':port' after the host")
        if not _HOST_RE.fullmatch(host):
            raise PeerAddressError(f"peer address {s!r}: host {host!r} is not a hostname or IPv4 address")
    if not port_s.isascii() or not port_s.isdigit() or not 1 <= int(port_s) <= 65535 or port_s != str(int(port_s)):
        raise PeerAddressError(f"peer address {s!r}: port {port_s!r} is not an integer in 1..65535")
    return host, int(port_s)


# ---------------------------------------------------------------- secure channel
class SecureChannel:
    """A NaCl box between two identities with deterministic, strictly sequenced nonces."""

    def __init__(self, identity: Identity, peer_public_key: str | bytes, channel_id: bytes, initiator: bool):
        peer = decode_public_key(peer_public_key)
        if not isinstance(channel_id, (bytes, bytearray)) or len(channel_id) != CHANNEL_ID_BYTES:
            raise ChannelError(f"channel id must be {CHANNEL_ID_BYTES} bytes, got {channel_id!r:.40}")
        self.peer_public_key = encode_public_key(peer)
        self.channel_id = bytes(channel_id)
        self.initiator = bool(initiator)
        self._k = sodium.crypto_box_beforenm(_curve_public(peer), identity._curve_sk)
        out_dir, in_dir = (_TO_RESPONDER, _TO_INITIATOR) if initiator else (_TO_INITIATOR, _TO_RESPONDER)
        self._out_prefix, self._in_prefix = out_dir + self.channel_id, in_dir + self.channel_id
        self._out_tag, self._in_tag = _key_tag(self._k, self._out_prefix), _key_tag(self._k, self._in_prefix)
        self.send_seq = 0   # next seq we seal
        self.recv_seq = 0   # next seq we accept
        self.closed_reason: str | None = None

    def __repr__(self) -> str:
        state = f"closed: {self.closed_reason}" if self.closed_reason else "open"
        return (f"SecureChannel(peer={_short(self.peer_public_key)}, id={self.channel_id.hex()[:8]}, "
                f"sent={self.send_seq}, received={self.recv_seq}, {state})")

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def close(self, reason: str = "closed by owner") -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            self._k = b""  # drop the key material reference

    def seal(self, plaintext: bytes) -> bytearray:
        """Seal the next outgoing frame: ``tag | seq | MAC | ciphertext`` (len(plaintext) + 28 B)."""
        self._check_open()
        try:
            plain = memoryview(plaintext).cast("B")
        except TypeError:
            raise ChannelError(f"seal() needs a contiguous bytes-like object, got {type(plaintext).__name__}") from None
        if self.send_seq >= 2**64 - 1:
            self.close("send sequence exhausted")
            raise ChannelError("send sequence number exhausted after 2^64-1 frames; open a new channel")
        seq = struct.pack("<Q", self.send_seq)
        self.send_seq += 1
        out = _seal(plain, self._out_prefix + seq, self._k, SEAL_OVERHEAD - MAC_BYTES)
        out[:TAG_BYTES] = self._out_tag
        out[TAG_BYTES:TAG_BYTES + SEQ_BYTES] = seq
        return out

    def open(self, frame: bytes) -> bytearray:
        """Authenticate and decrypt the next incoming frame. Returns a writable bytearray."""
        self._check_open()
        try:
            return self._open(frame)
        except ChannelError as e:
            self.close(f"{type(e).__name__}: {e}")
            raise

    def _open(self, frame: bytes) -> bytearray:
        try:
            mv = memoryview(frame).cast("B")
        except TypeError:
            raise AuthError(f"sealed frame must be bytes-like, got {type(frame).__name__}") from None
        if len(mv) < SEAL_OVERHEAD:
            raise AuthError(f"sealed frame is {len(mv)} bytes, shorter than the {SEAL_OVERHEAD}-byte minimum "
                            f"(truncated)")
        if mv[:TAG_BYTES] != self._in_tag:
            raise WrongKeyError(f"frame from {_short(self.peer_public_key)} was not sealed for this channel: "
                                f"wrong key pair, another connection, or our own frame reflected back")
        seq_b = bytes(mv[TAG_BYTES:TAG_BYTES + SEQ_BYTES])
        seq = struct.unpack("<Q", seq_b)[0]
        plain = _open(mv, TAG_BYTES + SEQ_BYTES, self._in_prefix + seq_b, self._k)
        if plain is None:
            raise AuthError(f"frame claiming seq {seq} from {_short(self.peer_public_key)} failed authentication: "
                            f"modified in transit")
        self._check_seq(seq)
        self.recv_seq += 1
        return plain

    def _check_seq(self, seq: int) -> None:
        if seq < self.recv_seq:
            raise ReplayError(f"replayed frame: seq {seq} was already accepted (expected {self.recv_seq})")
        if seq > self.recv_seq:
            raise ReorderError(f"out-of-order frame: expected seq {self.recv_seq}, got {seq} "
                               f"({seq - self.recv_seq} frame(s) dropped or reordered)", self.recv_seq, seq)

    def _check_open(self) -> None:
        if self.closed_reason is not None:
            raise ChannelClosedError(f"channel to {_short(self.peer_public_key)} is closed ({self.closed_reason})")


def _key_tag(k: bytes, prefix: bytes) -> bytes:
    return hashlib.blake2b(prefix, key=k, digest_size=TAG_BYTES, person=b"dllm-keytag").digest()


def _seal(plain: memoryview, nonce: bytes, k: bytes, head: int) -> bytearray:
    """``head`` zero bytes followed by MAC | ciphertext of ``plain``."""
    if _lib is None:
        return bytearray(head) + sodium.crypto_box_easy_afternm(bytes(plain), nonce, k)
    out = bytearray(head + MAC_BYTES + len(plain))
    rc = _lib.crypto_box_easy_afternm(_ffi.from_buffer(out) + head, _ffi.from_buffer(plain), len(plain), nonce, k)
    if rc != 0:  # pragma: no cover - libsodium only fails on absurd lengths
        raise ChannelError(f"libsodium failed to seal a {len(plain)}-byte frame")
    return out


def _open(frame: memoryview, start: int, nonce: bytes, k: bytes) -> bytearray | None:
    """Plaintext of ``frame[start:]`` (MAC | ciphertext), or None if authentication fails."""
    if _lib is None:
        try:
            return bytearray(sodium.crypto_box_open_easy_afternm(bytes(frame[start:]), nonce, k))
        except nacl.exceptions.CryptoError:
            return None
    clen = len(frame) - start
    out = bytearray(clen - MAC_BYTES)
    rc = _lib.crypto_box_open_easy_afternm(_ffi.from_buffer(out), _ffi.from_buffer(frame) + start, clen, nonce, k)
    return out if rc == 0 else None


# ---------------------------------------------------------------- handshake
_HS_MAGIC, _HS_VERSION, _T_HELLO, _T_REPLY = b"DLHS", 1, 1, 2
_C2S, _S2C = b"dllm-c2s", b"dllm-s2c"
_RAND = 16
_HELLO_PLAIN = len(_C2S) + KEY_BYTES + _RAND + 8                 # 64
_REPLY_PLAIN = len(_S2C) + KEY_BYTES + 2 * _RAND                 # 72
HELLO_BYTES = 6 + KEY_BYTES + 24 + MAC_BYTES + _HELLO_PLAIN      # 142
REPLY_BYTES = 6 + 24 + MAC_BYTES + _REPLY_PLAIN                  # 118


@dataclass
class HandshakeState:
    """What the client remembers between client_hello and client_finish (single use)."""

    identity: Identity
    server_public_key: bytes
    client_rand: bytes
    used: bool = field(default=False)


def client_hello(identity: Identity, server_public_key: str | bytes, *, now: float | None = None
                 ) -> tuple[bytes, HandshakeState]:
    """Build the hello for a server we expect to hold ``server_public_key``."""
    server = decode_public_key(server_public_key)
    rand = os.urandom(_RAND)
    ts_ms = int((time.time() if now is None else now) * 1000)
    plain = _C2S + server + rand + struct.pack("<Q", ts_ms)
    nonce = _HELLO_NONCE + os.urandom(23)
    k = sodium.crypto_box_beforenm(_curve_public(server), identity._curve_sk)
    box = sodium.crypto_box_easy_afternm(plain, nonce, k)
    hello = _HS_MAGIC + bytes([_HS_VERSION, _T_HELLO]) + identity.public_key_bytes + nonce + box
    return hello, HandshakeState(identity, server, rand)


def server_accept(identity: Identity, hello: bytes, allowed: Iterable[str | bytes] | None = None, *,
                  now: float | None = None, max_skew_s: float = MAX_SKEW_S) -> tuple[SecureChannel, bytes]:
    """Check a hello; return our end of the channel and the reply to send.

    On any error the caller must close the connection without sending anything back.
    """
    hello = _hs_bytes(hello, HELLO_BYTES, _T_HELLO, "hello")
    client = hello[6:6 + KEY_BYTES]
    try:
        client_curve = _curve_public(client)
    except KeyFormatError as e:
        raise HandshakeError(f"hello carries an unusable client key: {e}") from None
    client_s = encode_public_key(client)
    if allowed is not None and client_s not in {encode_public_key(decode_public_key(a)) for a in allowed}:
        raise NotAllowedError(f"client {client_s} is not in this server's allow-list")
    k = sodium.crypto_box_beforenm(client_curve, identity._curve_sk)
    nonce, box = hello[6 + KEY_BYTES:6 + KEY_BYTES + 24], hello[6 + KEY_BYTES + 24:]
    plain = _hs_open(box, nonce, k, f"hello was not sealed by the holder of client key {client_s}")
    if plain[:8] != _C2S or plain[8:40] != identity.public_key_bytes:
        raise AuthError(f"hello from {_short(client_s)} is not addressed to this server")
    skew = abs(struct.unpack("<Q", plain[56:64])[0] / 1000 - (time.time() if now is None else now))
    if skew > max_skew_s:
        raise StaleHelloError(f"hello from {_short(client_s)} is {skew:.1f} s off the server clock "
                              f"(limit {max_skew_s:.0f} s): stale/replayed hello or a wrong clock")
    client_rand, server_rand = plain[40:56], os.urandom(_RAND)
    channel = SecureChannel(identity, client, _channel_id(client_rand, server_rand), initiator=False)
    reply_nonce = _REPLY_NONCE + os.urandom(23)
    reply_box = sodium.crypto_box_easy_afternm(_S2C + client + client_rand + server_rand, reply_nonce, k)
    return channel, _HS_MAGIC + bytes([_HS_VERSION, _T_REPLY]) + reply_nonce + reply_box


def client_finish(state: HandshakeState, reply: bytes) -> SecureChannel:
    """Check the server's reply; return our end of the channel (AuthError if the server is not who we expected)."""
    if state.used:
        raise HandshakeError("handshake state already used: start a new handshake (reuse would repeat nonces)")
    state.used = True
    reply = _hs_bytes(reply, REPLY_BYTES, _T_REPLY, "reply")
    server_s = encode_public_key(state.server_public_key)
    k = sodium.crypto_box_beforenm(_curve_public(state.server_public_key), state.identity._curve_sk)
    plain = _hs_open(reply[30:], reply[6:30], k,
                     f"server reply was not sealed by the expected server key {server_s}: "
                     f"wrong server (impersonation?) or tampered")
    if plain[:8] != _S2C or plain[8:40] != state.identity.public_key_bytes or plain[40:56] != state.client_rand:
        raise AuthError(f"server reply from {_short(server_s)} does not answer this hello (replayed reply)")
    cid = _channel_id(state.client_rand, plain[56:72])
    return SecureChannel(state.identity, state.server_public_key, cid, initiator=True)


def _hs_bytes(msg: bytes, size: int, kind: int, what: str) -> bytes:
    try:
        msg = bytes(memoryview(msg).cast("B"))
    except TypeError:
        raise HandshakeError(f"handshake {what} must be bytes-like, got {type(msg).__name__}") from None
    if len(msg) != size:
        raise HandshakeError(f"handshake {what} is {len(msg)} bytes, expected {size}")
    if msg[:4] != _HS_MAGIC or msg[4] != _HS_VERSION or msg[5] != kind:
        raise HandshakeError(f"handshake {what} has a wrong header {msg[:6]!r} "
                             f"(expected {_HS_MAGIC!r}, version {_HS_VERSION}, type {kind})")
    return msg


def _hs_open(box: bytes, nonce: bytes, k: bytes, msg: str) -> bytes:
    try:
        return sodium.crypto_box_open_easy_afternm(box, nonce, k)
    except nacl.exceptions.CryptoError:
        raise AuthError(msg) from None


def _channel_id(client_rand: bytes, server_rand: bytes) -> bytes:
    return hashlib.blake2b(client_rand + server_rand, digest_size=CHANNEL_ID_BYTES, person=b"dllm-channel").digest()
