"""CPU threads: the engine thread's OpenMP team is the only one (starting an EngineWorker hands
the constructing thread's idle team back, dllm/api/worker.py release_openmp_threads), and
local stage processes share the cores rather than each taking all of them."""
import os

import pytest
import torch

from dllm.api.worker import release_openmp_threads


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux /proc")
def test_release_openmp_threads_ends_this_threads_idle_team():
    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread: no OpenMP team to release")
    torch.randn(512, 512) @ torch.randn(512, 512)  # a parallel region: this thread now has a team
    before = os_threads()
    if not release_openmp_threads():
        pytest.skip("no loaded OpenMP runtime with omp_pause_resource_all")
    assert os_threads() < before
    torch.randn(512, 512) @ torch.randn(512, 512)  # and it comes back when needed
    assert os_threads() == before


def test_local_stages_share_the_cores():
    """--local-stages without --threads: each process takes its share of the cores, at least one."""
    from dllm.cli import local_stage_threads

    assert local_stage_threads(2, cores=2) == 1
    assert local_stage_threads(2, cores=16) == 8
    assert local_stage_threads(3, cores=2) == 1
    assert local_stage_threads(4, cores=16) == 4
