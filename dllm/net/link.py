"""Link: one authenticated, sealed WebSocket connection carrying wire Frames.

A link is a SecureChannel over an aiohttp WebSocket (no compression: hidden states do not
deflate, and deflate costs time on every hop). Both ends send with ``send(frame)`` and read with
``recv()``. Without an emulated delay a frame is sealed and written to the socket inside
``send`` (sealing and the transport write happen with no await between them, so sequence
numbers match the order on the socket). With ``--emulate-rtt`` each frame is due at its send
time + RTT/2 and one writer task puts frames on the socket in order as they fall due, so a
delay never blocks the caller or reorders frames, and later frames do not wait for earlier
timers beyond their own due time.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib

import aiohttp
from aiohttp import web

from dllm.errors import DllmError
from dllm.net import wire
from dllm.net.crypto import (HandshakeError, Identity, PeerAddress, SecureChannel, client_finish, client_hello,
                             server_accept)
from dllm.net.wire import Frame

WS_PATH = "/dllm"
MAX_MSG_BYTES = 300 << 20  # above wire's 256 MiB frame cap plus sealing overhead


class LinkClosed(DllmError):
    """The peer went away or the link failed authentication; the message says which."""


class Link:
    def __init__(self, ws, channel: SecureChannel, delay_s: float = 0.0, session: aiohttp.ClientSession | None = None):
        self.ws = ws
        self.channel = channel
        self.peer = channel.peer_public_key
        self.delay_s = delay_s
        self._session = session
        self._due: collections.deque = collections.deque()  # (due time, encoded frame), delayed sends
        self._writer: asyncio.Task | None = None
        self.closed_reason: str | None = None

    # ---- setup -----------------------------------------------------------------------------------
    @classmethod
    async def connect(cls, identity: Identity, addr: PeerAddress, delay_s: float = 0.0,
                      timeout: float = 10.0) -> "Link":
        """Dial ``addr`` and run the handshake; AuthError-family errors if it is not who we expect."""
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(f"http://{addr.host}:{addr.port}{WS_PATH}", max_msg_size=MAX_MSG_BYTES,
                                          timeout=aiohttp.ClientWSTimeout(ws_close=timeout), heartbeat=None,
                                          compress=0)
            hello, state = client_hello(identity, addr.public_key)
            await ws.send_bytes(hello)
            msg = await asyncio.wait_for(ws.receive(), timeout)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise LinkClosed(f"{addr} refused the handshake (closed the connection: wrong key, not allowed, "
                                 f"or stale clock)")
            channel = client_finish(state, msg.data)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            await session.close()
            raise LinkClosed(f"cannot reach {addr}: {e or type(e).__name__}") from None
        except BaseException:
            await session.close()
            raise
        return cls(ws, channel, delay_s, session)

    @classmethod
    async def accept(cls, request: web.Request, identity: Identity, allowed=None, delay_s: float = 0.0,
                     timeout: float = 10.0) -> "Link | None":
        """Server side of the handshake; returns None (connection closed, nothing sent) on refusal."""
        ws = web.WebSocketResponse(max_msg_size=MAX_MSG_BYTES, heartbeat=None, compress=False)
        await ws.prepare(request)
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise HandshakeError("first message is not a binary hello")
            channel, reply = server_accept(identity, msg.data, allowed)
        except (HandshakeError, asyncio.TimeoutError, DllmError):
            await ws.close()
            return None
        await ws.send_bytes(reply)
        return cls(ws, channel, delay_s)

    # ---- traffic ---------------------------------------------------------------------------------
    async def send(self, frame: Frame, *, delay: bool = True) -> None:
        """Seal and send ``frame`` (after the emulated one-way delay, unless ``delay`` is False
        and nothing is waiting: for frames nobody waits on, such as CLOSE_SESSION).
        LinkClosed if the link is closed or the socket fails."""
        if self.closed_reason:
            raise LinkClosed(f"link to {self.peer[:12]}… is closed: {self.closed_reason}")
        data = wire.encode(frame)
        if (self.delay_s <= 0 or not delay) and not self._due:
            await self._write(data)
            return
        loop = asyncio.get_running_loop()
        self._due.append((loop.time() + self.delay_s, data))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_due())

    async def _write(self, data: bytes) -> None:
        try:
            await self.ws.send_bytes(self.channel.seal(data))
        except Exception as e:  # socket gone, or the channel closed: everything after fails too
            self.closed_reason = self.closed_reason or f"send failed: {e or type(e).__name__}"
            raise LinkClosed(f"link to {self.peer[:12]}… failed to send: {self.closed_reason}") from None

    async def _write_due(self) -> None:
        """Put delayed frames on the socket in order, each at its due time."""
        loop = asyncio.get_running_loop()
        try:
            while self._due:
                wait = self._due[0][0] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._write(self._due.popleft()[1])
        except (LinkClosed, asyncio.CancelledError):
            self._due.clear()

    async def recv(self) -> Frame:
        """Next frame; LinkClosed when the socket ends or a frame fails authentication."""
        msg = await self.ws.receive()
        if msg.type != aiohttp.WSMsgType.BINARY:
            self.closed_reason = self.closed_reason or f"peer closed ({msg.type.name})"
            raise LinkClosed(f"link to {self.peer[:12]}… closed: {self.closed_reason}")
        try:
            return wire.decode(self.channel.open(msg.data))
        except DllmError as e:
            self.closed_reason = f"{type(e).__name__}: {e}"
            await self.close()
            raise LinkClosed(f"link to {self.peer[:12]}… rejected a frame and closed: {e}") from None

    async def __aiter__(self):
        while True:
            try:
                yield await self.recv()
            except LinkClosed:
                return

    @property
    def is_open(self) -> bool:
        return self.closed_reason is None and not self.ws.closed

    async def close(self) -> None:
        self.closed_reason = self.closed_reason or "closed"
        if self._writer is not None:
            self._writer.cancel()
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
