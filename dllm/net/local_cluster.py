"""LocalCluster: start stage processes on 127.0.0.1 (the one-machine demo of the split, and tests).

Each stage is a real ``dllm stage`` process with a fresh identity in a private temp dir; it
prints ``ready KEY@127.0.0.1:PORT`` once it listens. The cluster stops them on exit.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dllm.errors import DllmError
from dllm.net.crypto import Identity, PeerAddress


def wait_ready(proc: subprocess.Popen, timeout: float, log_path: Path | None = None) -> PeerAddress:
    """Read a node's stdout until it prints ``ready KEY@host:port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ready "):
            return PeerAddress.parse(line.split()[1])
        if not line and proc.poll() is not None:
            err = log_path.read_text()[-2000:] if log_path and log_path.exists() else ""
            raise DllmError(f"node exited with {proc.returncode} before it was ready:\n{err}")
    raise DllmError(f"node not ready after {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, model_dir, ranges: list[tuple[int, int]], *, dtype: str = "float32", kv_tokens: int = 8192,
                 emulate_rtt_ms: float = 0.0, threads: int | None = None, allow: list[str] | None = None,
                 ready_timeout_s: float = 180.0, extra_args: list[str] | None = None, quant: str | None = None):
        """``dtype`` / ``quant`` go to every stage as --dtype / --quant (quant None: the flag is
        left out, so a stage runs a quantized checkpoint as stored and a dense one dense). Give
        them the coordinator's resolved values (dllm.launch.resolve_precision) so that the chain
        computes exactly what one process would."""
        self.tmp = tempfile.TemporaryDirectory(prefix="dllm-stages-")
        self.procs: list[subprocess.Popen] = []
        self.addresses: list[PeerAddress] = []
        try:
            for i, (a, b) in enumerate(ranges):
                ident_path = Path(self.tmp.name) / f"stage{i}.key"
                Identity.generate().save(ident_path)
                port = free_port()
                cmd = [sys.executable, "-m", "dllm.cli", "stage", "--model", str(model_dir), "--layers", f"{a}:{b}",
                       "--listen", f"127.0.0.1:{port}", "--identity", str(ident_path), "--dtype", dtype,
                       "--kv-tokens", str(kv_tokens), "--emulate-rtt", str(emulate_rtt_ms)]
                if quant is not None:
                    cmd += ["--quant", quant]
                if threads:
                    cmd += ["--threads", str(threads)]
                if allow:
                    cmd += ["--allow", ",".join(allow)]
                cmd += extra_args or []
                log = open(Path(self.tmp.name) / f"stage{i}.log", "w")
                self.procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                                   env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            for i, p in enumerate(self.procs):
                self.addresses.append(wait_ready(p, ready_timeout_s, Path(self.tmp.name) / f"stage{i}.log"))
        except BaseException:
            self.stop()
            raise

    def kill(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
