"""Link: one authenticated, sealed WebSocket connection carrying wire Frames.

A link is a SecureChannel over an aiohttp WebSocket. Both ends send with ``send(frame)`` and
read with ``recv()``; sends go through one writer task, in order, so the channel's sequence
numbers match the order on the socket, and an emulated one-way delay (``--emulate-rtt`` / 2)
can be applied per hop without blocking the caller or reordering frames.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

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
        self._out: asyncio.Queue = asyncio.Queue()
        self._writer = asyncio.ensure_future(self._write_loop())
        self.closed_reason: str | None = None

    # ---- setup -----------------------------------------------------------------------------------
    @classmethod
    async def connect(cls, identity: Identity, addr: PeerAddress, delay_s: float = 0.0,
                      timeout: float = 10.0) -> "Link":
        """Dial ``addr`` and run the handshake; AuthError-family errors if it is not who we expect."""
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(f"http://{addr.host}:{addr.port}{WS_PATH}", max_msg_size=MAX_MSG_BYTES,
                                          timeout=aiohttp.ClientWSTimeout(ws_close=timeout), heartbeat=None)
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
        ws = web.WebSocketResponse(max_msg_size=MAX_MSG_BYTES, heartbeat=None)
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
    async def send(self, frame: Frame) -> None:
        if self.closed_reason:
            raise LinkClosed(f"link to {self.peer[:12]}… is closed: {self.closed_reason}")
        data = wire.encode(frame)
        await self._out.put((time.monotonic() + self.delay_s, data))

    async def _write_loop(self) -> None:
        try:
            while True:
                due, data = await self._out.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.ws.send_bytes(bytes(self.channel.seal(data)))
        except asyncio.CancelledError:
            pass
        except Exception as e:  # socket gone: everything after fails at send()
            self.closed_reason = f"send failed: {e or type(e).__name__}"

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
        self._writer.cancel()
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self._session is not None:
            with contextlib.suppress(Exception):
                await self._session.close()
