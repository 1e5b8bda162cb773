"""The split over real stage processes on 127.0.0.1: parity, sessions, security, failover."""
import asyncio
import os
import signal
import time

import aiohttp
import pytest
import torch

from dllm.errors import ChainError, StageBusy
from dllm.launch import chain_engine, local_engine
from dllm.net.crypto import Identity, PeerAddress
from dllm.net.link import WS_PATH, Link, LinkClosed
from dllm.net.local_cluster import LocalCluster
from dllm.net.wire import Frame, FrameKind
from dllm.sampling import SamplingParams

from .conftest import make_tiny_hf

PROMPTS = [[1, 2, 3, 4], [9, 8, 7], list(range(20, 60)), [5] * 7, [100, 3, 77, 12, 4], [42], [11, 22, 33], [64, 65]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-chain")
    make_tiny_hf("qwen2", d, num_hidden_layers=5)
    return d


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    # stages 1:3 and 3:5, plus a spare for 1:3 and one that serves 1:5 alone
    with LocalCluster(tiny_dir, [(1, 3), (3, 5), (1, 3), (1, 5)], threads=1) as c:
        yield c


@pytest.fixture(scope="module")
def solo(tiny_dir):
    eng = local_engine(tiny_dir)
    return [eng.generate_all(p, SamplingParams(max_tokens=64, ignore_eos=True)) for p in PROMPTS]


def addrs(cluster, *idx):
    return [str(cluster.addresses[i]) for i in idx]


def test_two_and_three_stage_chains_equal_single_process(tiny_dir, cluster, solo):
    for peers, first in [(addrs(cluster, 3), (0, 1)), (addrs(cluster, 0, 1), (0, 1))]:
        eng = chain_engine(tiny_dir, peers, first)
        try:
            assert [len(p.layers) and p.layers for p in eng.pipeline.chain] in ([(1, 5)], [(1, 3), (3, 5)])
            for p, ref in zip(PROMPTS[:3], solo):
                assert eng.generate_all(p, SamplingParams(max_tokens=64, ignore_eos=True)) == ref
            # every finished sequence was closed on every stage
            assert all(m["sessions"] == 0 for m in eng.pipeline.status().values())
        finally:
            eng.pipeline.close()


def test_eight_concurrent_sessions_each_equal_solo(tiny_dir, cluster, solo):
    eng = chain_engine(tiny_dir, addrs(cluster, 0, 1), (0, 1))
    try:
        seqs = [eng.add(p, SamplingParams(max_tokens=64, ignore_eos=True)) for p in PROMPTS]
        while eng.has_work:
            eng.step()
        assert [s.output for s in seqs] == solo
        assert all(m["sessions"] == 0 for m in eng.pipeline.status().values())
    finally:
        eng.pipeline.close()


def test_wrong_key_is_refused(tiny_dir, cluster):
    real = cluster.addresses[3]
    impostor = str(PeerAddress(Identity.generate().public_key, real.host, real.port))
    with pytest.raises(ChainError, match="no live peer"):
        chain_engine(tiny_dir, [impostor], (0, 1))


def test_unauthenticated_client_gets_nothing(cluster):
    a = cluster.addresses[0]

    async def probe():
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(f"http://{a.host}:{a.port}{WS_PATH}") as ws:
                await ws.send_bytes(os.urandom(142))
                msg = await asyncio.wait_for(ws.receive(), 10)
                return msg.type

    assert asyncio.run(probe()) in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)


def test_tampered_frame_closes_the_link(cluster):
    a = cluster.addresses[3]

    async def go():
        link = await Link.connect(Identity.generate(), a)
        await link.send(Frame(FrameKind.PING, {"t": 1}))
        assert (await asyncio.wait_for(link.recv(), 10)).kind == FrameKind.PONG
        sealed = bytearray(link.channel.seal(b"x" * 64))
        sealed[-3] ^= 0x10  # flip one ciphertext bit
        await link.ws.send_bytes(bytes(sealed))
        with pytest.raises(LinkClosed):
            await asyncio.wait_for(link.recv(), 10)
        await link.close()

    asyncio.run(go())


def test_replayed_frame_closes_the_link(cluster):
    a = cluster.addresses[3]

    async def go():
        link = await Link.connect(Identity.generate(), a)
        from dllm.net import wire

        sealed = bytes(link.channel.seal(wire.encode(Frame(FrameKind.PING, {"t": 1}))))
        await link.ws.send_bytes(sealed)
        assert (await asyncio.wait_for(link.recv(), 10)).kind == FrameKind.PONG
        await link.ws.send_bytes(sealed)  # the same sealed frame again
        with pytest.raises(LinkClosed):
            await asyncio.wait_for(link.recv(), 10)
        await link.close()

    asyncio.run(go())


def test_busy_stage_answers_clearly(tiny_dir):
    with LocalCluster(tiny_dir, [(1, 5)], kv_tokens=32, threads=1) as c:
        eng = chain_engine(tiny_dir, addrs(c, 0), (0, 1))
        try:
            with pytest.raises(StageBusy, match="KV cache full"):
                eng.generate_all(list(range(60)), SamplingParams(max_tokens=4))
            # a small request still works afterwards
            assert len(eng.generate_all([1, 2], SamplingParams(max_tokens=4, ignore_eos=True))) == 4
        finally:
            eng.pipeline.close()


def run_with_fault(eng, prompt, fault, after_steps=8):
    seq = eng.add(prompt, SamplingParams(max_tokens=48, ignore_eos=True))
    steps = 0
    while not seq.finished:
        eng.step()
        steps += 1
        if steps == after_steps:
            fault()
    return seq.output


def test_killed_stage_fails_over_to_spare_with_identical_output(tiny_dir, solo):
    with LocalCluster(tiny_dir, [(1, 3), (3, 5), (1, 3)], threads=1) as c:
        eng = chain_engine(tiny_dir, addrs(c, 0, 1, 2), (0, 1), deadline_s=10)
        try:
            active = [str(p.addr) for p in eng.pipeline.chain]
            victim = addrs(c, 0, 2).index(active[0]) * 2  # whichever 1:3 stage is in use
            out = run_with_fault(eng, PROMPTS[2], lambda: c.kill(victim))
            assert out == solo[2][:48]
            assert eng.failovers == 1
            assert str(c.addresses[victim]) not in [str(p.addr) for p in eng.pipeline.chain]
        finally:
            eng.pipeline.close()


def test_stalled_stage_fails_over_after_deadline(tiny_dir, solo):
    with LocalCluster(tiny_dir, [(1, 5), (1, 5)], threads=1) as c:
        eng = chain_engine(tiny_dir, addrs(c, 0, 1), (0, 1), deadline_s=3)
        try:
            victim = addrs(c, 0, 1).index(str(eng.pipeline.chain[0].addr))
            t0 = time.monotonic()
            out = run_with_fault(eng, PROMPTS[0], lambda: os.kill(c.procs[victim].pid, signal.SIGSTOP))
            assert out == solo[0][:48]
            assert eng.failovers == 1 and time.monotonic() - t0 < 60
        finally:
            os.kill(c.procs[victim].pid, signal.SIGCONT)
            eng.pipeline.close()


def test_no_spare_ends_with_clear_error_within_deadline(tiny_dir):
    with LocalCluster(tiny_dir, [(1, 5)], threads=1) as c:
        eng = chain_engine(tiny_dir, addrs(c, 0), (0, 1), deadline_s=3)
        try:
            t0 = time.monotonic()
            with pytest.raises(ChainError, match="no live peer serves layers starting at 1"):
                run_with_fault(eng, PROMPTS[0], lambda: c.kill(0))
            assert time.monotonic() - t0 < 20
            assert not eng.running
        finally:
            eng.pipeline.close()
