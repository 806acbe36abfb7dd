"""platform.spawn over real gloo: per-rank results, a failing rank's traceback, a hung rank's timeout.

Also the cpu Platform's memory statistics and RNG round trip (CPU generator and megatron's
tracker), checked inside a spawned rank (where activate() ran), so the pytest process never
activates a backend.
"""
import time

import pytest
import torch

from megatron_vita.platform import DistributedRunError, spawn

HANG_TIMEOUT = 10


def _all_reduce_rank(rank, world_size, offset):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return {"rank": rank, "world": dist.get_world_size(), "backend": dist.get_backend(), "sum": t.item()}


def test_spawn_returns_per_rank_results_over_gloo():
    results = spawn(_all_reduce_rank, 2, 10, timeout=120)
    assert results == [
        {"rank": 0, "world": 2, "backend": "gloo", "sum": 21.0},
        {"rank": 1, "world": 2, "backend": "gloo", "sum": 21.0},
    ]


def _failing_rank(rank, world_size):
    if rank == 1:
        raise ValueError(f"deliberate failure on rank {rank}")
    return rank


def test_failing_rank_reports_its_traceback():
    start = time.monotonic()
    with pytest.raises(DistributedRunError) as e:
        spawn(_failing_rank, 2, timeout=120)
    msg = str(e.value)
    assert "--- rank 1 ---" in msg and "Traceback" in msg
    assert "ValueError: deliberate failure on rank 1" in msg
    assert "in _failing_rank" in msg
    # Rank 0 waits in the closing barrier for a peer that is gone: spawn must not wait for it.
    assert time.monotonic() - start < 60


def _hanging_rank(rank, world_size):
    if rank == 1:
        time.sleep(3600)
    return rank


def test_hung_rank_fails_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedRunError, match=rf"timed out after {HANG_TIMEOUT}s") as e:
        spawn(_hanging_rank, 2, timeout=HANG_TIMEOUT)
    elapsed = time.monotonic() - start
    assert HANG_TIMEOUT <= elapsed < HANG_TIMEOUT + 5, f"took {elapsed:.1f}s"
    assert "ranks finished: []" in str(e.value)  # rank 0 returned but never got past the barrier


# A rank's result used to travel as tensors on the multiprocessing queue, which torch shares by
# file descriptor, served by the rank itself: a rank exiting before the launcher had unpickled
# every tensor made spawn raise FileNotFoundError. Many tensors per result widen that window (on
# the old code 3 of 3 runs of this test's spawns failed; with 1 tensor per result, 0 of 5).
RESULT_TENSORS, RESULT_RUNS = 200, 3


def _many_tensors(rank, world_size, n):
    import torch

    return {"rank": rank, "tensors": [torch.full((3,), float(rank * n + i)) for i in range(n)],
            "bf16": torch.arange(4, dtype=torch.bfloat16)}


@pytest.mark.timeout(120 * RESULT_RUNS)
def test_tensor_results_survive_ranks_that_exit_at_once():
    import torch

    for _ in range(RESULT_RUNS):
        results = spawn(_many_tensors, 2, RESULT_TENSORS, timeout=120)
        for rank, res in enumerate(results):
            assert res["rank"] == rank and len(res["tensors"]) == RESULT_TENSORS
            assert torch.equal(torch.stack(res["tensors"])[:, 0],
                               torch.arange(RESULT_TENSORS, dtype=torch.float32) + rank * RESULT_TENSORS)
            assert res["bf16"].dtype == torch.bfloat16 and res["bf16"].tolist() == [0, 1, 2, 3]


def _unsavable_result(rank, world_size):
    import threading

    return threading.Lock()  # neither torch.save nor pickle can write a lock


@pytest.mark.timeout(120)
def test_a_result_that_cannot_be_sent_is_the_ranks_error():
    with pytest.raises(DistributedRunError) as e:
        spawn(_unsavable_result, 1, timeout=60)
    assert "--- rank 0 ---" in str(e.value) and "lock" in str(e.value)


def _platform_state_rank(rank, world_size):
    import gc

    import torch

    from megatron_vita import platform
    from megatron_vita.platform import cpu_shim

    plat = platform.current()
    out = {"name": plat.name, "dist_backend": plat.dist_backend, "device": str(plat.device()),
           "same_on_reactivate": platform.activate("cpu") is plat, "shim": cpu_shim.is_installed()}

    before = plat.memory_stats()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so that it is resident
    during = plat.memory_stats()
    del block
    gc.collect()
    after = plat.memory_stats()
    out["memory"] = {"before": before, "during": during, "after": after}

    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(1, 1)

    def draws():  # from the CPU generator, then from megatron's tensor-parallel stream
        outer = torch.rand(3).tolist()
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return outer + torch.rand(3).tolist()

    plat.manual_seed(7)
    first = draws()
    plat.manual_seed(7)
    state = plat.get_rng_state()
    replay = draws()
    plat.set_rng_state(state)
    restored = draws()
    out["rng"] = {"keys": sorted(state), "first": first, "replay": replay, "restored": restored,
                  "next": draws()}
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def cpu_platform_state():
    (out,) = spawn(_platform_state_rank, 1, timeout=120)
    return out


def test_cpu_platform_identity(cpu_platform_state):
    s = cpu_platform_state
    assert (s["name"], s["dist_backend"], s["device"]) == ("cpu", "gloo", "cpu")
    assert s["same_on_reactivate"] is True and s["shim"] is True


def test_cpu_memory_stats_follow_process_memory(cpu_platform_state):
    m = cpu_platform_state["memory"]
    for stats in m.values():
        assert set(stats) == {"allocated", "max_allocated"} and all(isinstance(v, int) for v in stats.values())
        assert stats["max_allocated"] >= stats["allocated"] > 0
    assert m["during"]["allocated"] - m["before"]["allocated"] >= 56 * 2**20
    assert m["during"]["allocated"] - m["after"]["allocated"] >= 56 * 2**20  # freed: RSS drops again
    # The peak is remembered after the block is freed. Linux keeps RSS in per-CPU batched
    # counters, so the peak (getrusage) and the RSS (/proc) may disagree by a few hundred KiB.
    assert m["after"]["max_allocated"] >= m["during"]["allocated"] - 2**20


def test_cpu_rng_state_round_trip(cpu_platform_state):
    r = cpu_platform_state["rng"]
    assert r["keys"] == ["cpu", "tracker"]  # on cuda/npu the accelerator's state joins them
    # manual_seed seeds the CPU generator with the seed and megatron's tensor-parallel stream
    # with seed + 2718 + tp_rank, as megatron's model_parallel_cuda_manual_seed does.
    assert r["first"][:3] == torch.rand(3, generator=torch.Generator().manual_seed(7)).tolist()
    assert r["first"][3:] == torch.rand(3, generator=torch.Generator().manual_seed(7 + 2718)).tolist()
    assert r["replay"] == r["first"]  # manual_seed is deterministic, tracker included
    assert r["restored"] == r["replay"]  # set_rng_state rewinds both streams
    assert r["next"][:3] != r["restored"][:3] and r["next"][3:] != r["restored"][3:]
