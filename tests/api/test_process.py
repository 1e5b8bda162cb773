"""The server as its own process (python -m dllm.api): starts, answers, and stops cleanly on Ctrl-C."""
import json
import re
import signal
import subprocess
import sys
import urllib.request

import pytest



def test_server_process_round_trip(model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "dllm.api", "--model", str(model_dir), "--serve", "127.0.0.1:0",
                             "--rate-per-minute", "0", "--kv-tokens", "2048"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until it serves (or dies: then the line is empty)
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{m.group(1)}"
        with urllib.request.urlopen(f"{url}/health", timeout=60) as r:
            assert json.load(r)["status"] == "ok"
        name = model_dir.name
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.load(r)
        assert answer["model"] == name and answer["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("server did not stop on SIGINT")
    assert rc == 0, proc.stderr.read()
