"""A local Solana JSON-RPC node on 127.0.0.1 in front of solders' LiteSVM (the real SVM and the real
Token-2022, ATA and Memo programs), speaking the methods dllm.pay calls.

LiteSVM executes transactions but keeps neither the transaction bytes nor pre/post token balances, so this
node records them itself, as a validator's transaction-status service does: it snapshots every token account
a transaction names before and after executing it. `hold = True` makes new transactions stay at "processed"
(not visible at confirmed commitment) until `confirm()`: that is how tests get an unconfirmed payment.

Set-up helpers (mints with or without the transfer-fee or transfer-hook extension, ATAs, minting) act on the
SVM directly; they do not go through RPC.
"""
from __future__ import annotations

import asyncio
import base64
import json
import struct
import threading
import time

from aiohttp import web
from solders.instruction import AccountMeta, Instruction
from solders.keypair import Keypair
from solders.litesvm import LiteSVM
from solders.message import MessageV0
from solders.pubkey import Pubkey
from solders.system_program import CreateAccountParams, create_account
from solders.transaction import VersionedTransaction

from dllm.pay import token as tk

RANK = {"processed": 0, "confirmed": 1, "finalized": 2}
TOKEN_PROGRAMS = (tk.TOKEN_2022, tk.TOKEN_LEGACY)


class RpcFail(Exception):
    def __init__(self, code: int, message: str, data=None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class LiteSVMRpc:
    """JSON-RPC over HTTP on its own thread and loop, so blocking callers never deadlock it."""

    def __init__(self):
        self.svm = LiteSVM()
        self.lock = threading.Lock()  # the SVM is touched by the server thread and by test set-up
        self.txs: dict[str, dict] = {}
        self.hold = False
        self.slot = 1000
        self.calls: dict[str, int] = {}
        self.bank = Keypair()
        self.svm.airdrop(self.bank.pubkey(), 10 ** 14)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------ server lifecycle

    def start(self) -> str:
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), daemon=True).start()
        ready.wait(10)
        return self.url

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        method, params = body.get("method"), body.get("params") or []
        self.calls[method] = self.calls.get(method, 0) + 1
        reply = {"jsonrpc": "2.0", "id": body.get("id")}
        try:
            handler = getattr(self, "rpc_" + method, None)
            if handler is None:
                raise RpcFail(-32601, f"Method not found: {method}")
            with self.lock:
                reply["result"] = handler(*params)
        except RpcFail as e:
            reply["error"] = {"code": e.code, "message": e.message, **({"data": e.data} if e.data else {})}
        return web.json_response(reply)

    # ------------------------------------------------------------ methods

    def _ctx(self) -> dict:
        return {"slot": self.slot, "apiVersion": "litesvm"}

    def rpc_getLatestBlockhash(self, opts=None):
        return {"context": self._ctx(), "value": {"blockhash": str(self.svm.latest_blockhash()),
                                                  "lastValidBlockHeight": self.slot + 150}}

    def rpc_getAccountInfo(self, pubkey, opts=None):
        acct = self.svm.get_account(Pubkey.from_string(pubkey))
        if acct is None or (acct.lamports == 0 and not acct.data):
            return {"context": self._ctx(), "value": None}
        return {"context": self._ctx(), "value": {
            "data": [base64.b64encode(bytes(acct.data)).decode(), "base64"], "executable": acct.executable,
            "lamports": acct.lamports, "owner": str(acct.owner), "rentEpoch": 0, "space": len(acct.data)}}

    def rpc_getBalance(self, pubkey, opts=None):
        return {"context": self._ctx(), "value": self.svm.get_balance(Pubkey.from_string(pubkey)) or 0}

    def rpc_requestAirdrop(self, pubkey, lamports, opts=None):
        r = self.svm.airdrop(Pubkey.from_string(pubkey), lamports)
        return str(r.signature() if hasattr(r, "signature") else r.meta().signature())

    def rpc_sendTransaction(self, data, opts=None):
        opts = opts or {}
        tx = VersionedTransaction.from_bytes(base64.b64decode(data))
        if isinstance(tx.message, MessageV0) and tx.message.address_table_lookups:
            raise RpcFail(-32602, "this test node does not resolve address lookup tables")
        if not opts.get("skipPreflight"):
            sim = self.svm.simulate_transaction(tx)
            if hasattr(sim, "err"):
                info = json.loads(sim.to_json())
                raise RpcFail(-32002, f"Transaction simulation failed: {_err_text(info['err'])}",
                              {"err": info["err"], "logs": sim.meta().logs()})
        pre = self._balances(tx)
        pre_sol = [self.svm.get_balance(k) or 0 for k in tx.message.account_keys]
        result = self.svm.send_transaction(tx)
        err = json.loads(result.to_json())["err"] if hasattr(result, "err") else None
        if err is not None and not (isinstance(err, dict) and "InstructionError" in err):
            raise RpcFail(-32002, f"Transaction failed: {_err_text(err)}", {"err": err})  # never landed
        meta = result.meta() if err is not None else result
        self.slot += 1
        sig = str(tx.signatures[0])
        self.txs[sig] = {"slot": self.slot, "blockTime": int(time.time()), "raw": data,
                         "version": "legacy" if not isinstance(tx.message, MessageV0) else 0,
                         "status": "processed" if self.hold else "confirmed",
                         "meta": {"err": err, "status": {"Ok": None} if err is None else {"Err": err},
                                  "fee": meta.fee(), "preBalances": pre_sol,
                                  "postBalances": [self.svm.get_balance(k) or 0 for k in tx.message.account_keys],
                                  "preTokenBalances": pre, "postTokenBalances": self._balances(tx),
                                  "logMessages": meta.logs(), "innerInstructions": [],
                                  "loadedAddresses": {"writable": [], "readonly": []},
                                  "computeUnitsConsumed": meta.compute_units_consumed()}}
        return sig

    def rpc_getSignatureStatuses(self, sigs, opts=None):
        out = []
        for s in sigs:
            rec = self.txs.get(s)
            out.append(None if rec is None else {
                "slot": rec["slot"], "confirmations": 0 if rec["status"] == "processed" else None,
                "err": rec["meta"]["err"], "status": rec["meta"]["status"], "confirmationStatus": rec["status"]})
        return {"context": self._ctx(), "value": out}

    def rpc_getTransaction(self, sig, opts=None):
        opts = opts or {}
        if opts.get("encoding", "json") != "base64":
            raise RpcFail(-32602, "this test node serves getTransaction with encoding=base64 only")
        rec = self.txs.get(sig)
        if rec is None or RANK[rec["status"]] < RANK[opts.get("commitment", "finalized")]:
            return None
        return {"slot": rec["slot"], "blockTime": rec["blockTime"], "version": rec["version"],
                "transaction": [rec["raw"], "base64"], "meta": rec["meta"]}

    # ------------------------------------------------------------ token balances as the status service records them

    def _balances(self, tx: VersionedTransaction) -> list[dict]:
        out = []
        for i, key in enumerate(tx.message.account_keys):
            acct = self.svm.get_account(key)
            if acct is None or acct.owner not in TOKEN_PROGRAMS:
                continue
            data = bytes(acct.data)
            if len(data) < tk.ACCOUNT_BASE_LEN or (len(data) > tk.ACCOUNT_BASE_LEN and data[tk.ACCOUNT_BASE_LEN] != 2):
                continue  # a mint, not a token account
            mint, owner, amount = tk.token_account_amount(data)
            decimals = bytes(self.svm.get_account(mint).data)[44]
            ui = amount / 10 ** decimals
            out.append({"accountIndex": i, "mint": str(mint), "owner": str(owner), "programId": str(acct.owner),
                        "uiTokenAmount": {"amount": str(amount), "decimals": decimals, "uiAmount": ui,
                                          "uiAmountString": f"{ui}"}})
        return out

    # ------------------------------------------------------------ test controls and set-up

    def confirm(self, sig: str | None = None) -> None:
        """Promote one (or every) held transaction to confirmed."""
        with self.lock:
            for s, rec in self.txs.items():
                if sig in (None, s):
                    rec["status"] = "confirmed"

    def process(self, ixs: list, signers: list[Keypair]) -> str:
        """Execute directly on the SVM (set-up); raise on failure."""
        with self.lock:
            msg = MessageV0.try_compile(signers[0].pubkey(), ixs, [], self.svm.latest_blockhash())
            r = self.svm.send_transaction(VersionedTransaction(msg, signers))
        if hasattr(r, "err"):
            raise RuntimeError(f"set-up transaction failed: {r.err()} {r.meta().logs()}")
        return str(r.signature())

    def airdrop(self, pubkey: Pubkey, lamports: int = 10 ** 10) -> None:
        with self.lock:
            self.svm.airdrop(pubkey, lamports)

    def create_mint(self, authority: Keypair, decimals: int = 6, fee_bps: int | None = None, max_fee: int = 0,
                    hook_program: Pubkey | None = None) -> Pubkey:
        """A Token-2022 mint, optionally with TransferFeeConfig (fee_bps, max_fee) or TransferHook."""
        mint = Keypair()
        pre, space = [], tk.MINT_BASE_LEN
        opt = lambda pk: b"\x01" + bytes(pk)  # noqa: E731  COption<Pubkey> packing
        if fee_bps is not None:
            space = tk.ACCOUNT_BASE_LEN + 1 + 4 + 108
            pre.append(Instruction(tk.TOKEN_2022, bytes([26, 0]) + opt(authority.pubkey()) + opt(authority.pubkey())
                                   + struct.pack("<HQ", fee_bps, max_fee), [AccountMeta(mint.pubkey(), False, True)]))
        if hook_program is not None:
            space = tk.ACCOUNT_BASE_LEN + 1 + 4 + 64
            pre.append(Instruction(tk.TOKEN_2022, bytes([36, 0]) + bytes(authority.pubkey()) + bytes(hook_program),
                                   [AccountMeta(mint.pubkey(), False, True)]))
        with self.lock:
            rent = self.svm.minimum_balance_for_rent_exemption(space)
        create = create_account(CreateAccountParams(from_pubkey=self.bank.pubkey(), to_pubkey=mint.pubkey(),
                                                    lamports=rent, space=space, owner=tk.TOKEN_2022))
        init = Instruction(tk.TOKEN_2022, bytes([20, decimals]) + bytes(authority.pubkey()) + b"\x00",
                           [AccountMeta(mint.pubkey(), False, True)])  # InitializeMint2, no freeze authority
        self.process([create, *pre, init], [self.bank, mint])
        return mint.pubkey()

    def create_ata(self, owner: Pubkey, mint: Pubkey) -> Pubkey:
        with self.lock:
            if self.svm.get_account(tk.ata(owner, mint)) is not None:
                return tk.ata(owner, mint)
        self.process([tk.create_ata_idempotent(self.bank.pubkey(), owner, mint)], [self.bank])
        return tk.ata(owner, mint)

    def mint_to(self, mint: Pubkey, authority: Keypair, owner: Pubkey, amount: int) -> Pubkey:
        dest = self.create_ata(owner, mint)
        self.process([Instruction(tk.TOKEN_2022, struct.pack("<BQ", 7, amount), [
            AccountMeta(mint, False, True), AccountMeta(dest, False, True),
            AccountMeta(authority.pubkey(), True, False)])], [self.bank, authority])
        return dest

    def token_balance(self, account: Pubkey) -> int:
        with self.lock:
            acct = self.svm.get_account(account)
        return 0 if acct is None else tk.token_account_amount(bytes(acct.data))[2]


def _err_text(err) -> str:
    return err if isinstance(err, str) else json.dumps(err)
