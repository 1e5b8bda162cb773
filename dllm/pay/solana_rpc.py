"""A small async Solana JSON-RPC client: only the methods payments call, over one aiohttp session.

Reads (getTransaction, getSignatureStatuses, getAccountInfo, getLatestBlockhash) are idempotent and retried
on transport errors with backoff; sendTransaction is tried once, since a re-send is decided by the caller.
"""
from __future__ import annotations

import asyncio
import base64
import itertools
from dataclasses import dataclass

import aiohttp

from dllm.errors import DllmError

COMMITMENT_RANK = {"processed": 0, "confirmed": 1, "finalized": 2}


class RpcError(DllmError):
    """The RPC node answered with an error object, or could not be reached."""

    def __init__(self, method: str, message: str, code: int | None = None, data=None):
        super().__init__(f"{method}: {message}" + (f" (code {code})" if code is not None else ""))
        self.method, self.code, self.data = method, code, data


class RpcTimeout(RpcError):
    """A transaction did not reach the wanted commitment in time; it may still land later."""


@dataclass(frozen=True)
class AccountInfo:
    owner: str
    lamports: int
    data: bytes
    executable: bool


class SolanaRpc:
    """JSON-RPC 2.0 over HTTP POST. Create inside the event loop that uses it; close() when done."""

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3):
        self.url, self.retries = url, retries
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)

    async def close(self) -> None:
        if self._session is not None and self._loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = None

    async def call(self, method: str, params: list, idempotent: bool = True):
        """The `result` of one call; RpcError on an error object or after the retries run out."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            # a session belongs to the loop that made it; a caller on a new loop gets a new one
            self._session, self._loop = aiohttp.ClientSession(timeout=self._timeout), loop
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        attempts = self.retries if idempotent else 1
        for attempt in range(attempts):
            try:
                async with self._session.post(self.url, json=body) as resp:
                    if resp.status == 429 or resp.status >= 500:
                        raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                    reply = await resp.json(content_type=None)
                break
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                if attempt + 1 >= attempts:
                    raise RpcError(method, f"{type(e).__name__}: {e} after {attempts} attempt(s)") from None
                await asyncio.sleep(0.1 * 2 ** attempt)
        if not isinstance(reply, dict):
            raise RpcError(method, f"malformed reply {reply!r:.200}")
        if reply.get("error"):
            err = reply["error"]
            raise RpcError(method, str(err.get("message")), err.get("code"), err.get("data"))
        return reply.get("result")

    async def get_latest_blockhash(self, commitment: str = "confirmed") -> tuple[str, int]:
        r = await self.call("getLatestBlockhash", [{"commitment": commitment}])
        return r["value"]["blockhash"], r["value"]["lastValidBlockHeight"]

    async def get_account_info(self, pubkey: str, commitment: str = "confirmed") -> AccountInfo | None:
        r = await self.call("getAccountInfo", [pubkey, {"encoding": "base64", "commitment": commitment}])
        v = r["value"]
        if v is None:
            return None
        return AccountInfo(v["owner"], v["lamports"], base64.b64decode(v["data"][0]), v["executable"])

    async def send_transaction(self, tx: bytes, skip_preflight: bool = False) -> str:
        """Submit a signed transaction; the base58 signature. Preflight simulation catches failures for free."""
        opts = {"encoding": "base64", "skipPreflight": skip_preflight, "preflightCommitment": "confirmed",
                "maxRetries": 5}
        return await self.call("sendTransaction", [base64.b64encode(tx).decode(), opts], idempotent=False)

    async def get_signature_statuses(self, signatures: list[str]) -> list[dict | None]:
        r = await self.call("getSignatureStatuses", [signatures, {"searchTransactionHistory": True}])
        return r["value"]

    async def get_transaction(self, signature: str, commitment: str = "confirmed") -> dict | None:
        """The transaction with meta (base64 encoded), or None if not known at ``commitment``."""
        return await self.call("getTransaction", [signature, {
            "encoding": "base64", "commitment": commitment, "maxSupportedTransactionVersion": 0}])

    async def wait_confirmed(self, signature: str, timeout_s: float, commitment: str = "confirmed",
                             poll_s: float = 0.05) -> dict:
        """Poll until ``signature`` reaches ``commitment``; its status. RpcError on tx error or timeout."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + timeout_s, poll_s
        while True:
            status = (await self.get_signature_statuses([signature]))[0]
            if status is not None:
                if status.get("err") is not None:
                    raise RpcError("getSignatureStatuses", f"transaction {signature} failed: {status['err']}")
                level = status.get("confirmationStatus") or "processed"
                if COMMITMENT_RANK.get(level, 0) >= COMMITMENT_RANK[commitment]:
                    return status
            if loop.time() + delay > deadline:
                raise RpcTimeout("getSignatureStatuses", f"transaction {signature} not {commitment} within "
                                 f"{timeout_s}s (last status: {status and status.get('confirmationStatus')})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def request_airdrop(self, pubkey: str, lamports: int) -> str:
        return await self.call("requestAirdrop", [pubkey, lamports], idempotent=False)
