"""numba_ep.Buffer's low-latency API (DeepEP V1's names and tuples) on real GPUs, EP1 and EP2.

Each test spawns one rank per GPU running ``workers_buffer_ll.buffer_ll_suite``: one
``Buffer(group, num_nvl_bytes, num_rdma_bytes=hint, low_latency_mode=True)`` per rank does a
normal intranode dispatch/combine, then ``clean_low_latency_buffer`` and low-latency rounds on
two shapes (M=64, H=2048, E=16 top-4; M=64, H=7168, E=288 top-8): FP8 (plain and UE8M0) and
BF16 dispatch compared exactly with ``reference.low_latency_dispatch``, combine within calc_diff
1e-5 of ``reference.low_latency_combine``, receive hooks, zero-copy combine through
``get_next_low_latency_combine_buffer``, ``out=``, ``async_finish``, a new shape refused without
a clean, torch tensors in and out (when torch is importable), and on EP2 a peer that never
arrives (CommTimeoutError on rank 0). ``test_clean_names_a_rank_that_never_comes``: EP2, a
rank that never calls ``clean_low_latency_buffer`` is named in a CommTimeoutError on the other.
``destroy()`` frees the NVSHMEM buffer and finalises NVSHMEM;
``test_destroy_names_a_rank_that_never_comes``: EP2, a rank that calls it too late is named
instead of leaving the other waiting in ``nvshmem_free``. See the worker module's docstring for
the details.

Kernels are compiled once, in parallel, before the ranks start (``compiled``). Expected wall
time on 2 H100s: well under 90 s with a warm kernel cache.

Run on the GPU machine, from the repository root:
``source .device-bundle/activate && python -m pytest tests/gpu/test_buffer_low_latency_gpu.py -v``
(on one GPU the EP2 test skips). Collects on a CPU machine; the tests skip there.
"""
import os

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep.group import gpu_count  # noqa: E402
from rank_counts import ep_params, runnable_rank_counts  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "workers_buffer_ll.py")


GPUS = gpu_count()


@pytest.fixture(scope="module")
def compiled():
    """Compile the low-latency kernels the ranks use, in parallel processes, into the disk
    cache (so that the ranks only load cubins and start together)."""
    if GPUS < 1:
        pytest.skip(f"needs a CUDA GPU (found {GPUS})")
    from parallel_compile import compile_for

    return compile_for("workers_buffer_ll", runnable_rank_counts())


def _check(report, with_timeout):
    steps = dict((k, v) for k, v in report)
    assert steps["normal"] > 0, "the normal dispatch received nothing"
    rounds = [v for k, v in report if isinstance(k, int)]
    assert len(rounds) == 6 and all(r["combine_diff"] < 1e-5 for r in rounds)
    assert sum(r["received"] for r in rounds) > 0
    assert "clean_low_latency_buffer" in steps["needs-clean"]
    graph = steps["graph"]
    assert graph["replays"] == 3 and len(graph["diffs"]) == 4  # eager run + 3 replays
    if with_timeout:
        return steps["timeout"]
    return None


@pytest.mark.parametrize("nranks", ep_params())
def test_buffer_low_latency(ranks, compiled, nranks):
    with_timeout = nranks == 2  # the timeout round needs a peer; one size is enough
    reports = ranks(f"{WORKERS}:buffer_ll_suite", nranks, with_timeout, timeout=300,
                    group_timeout=200)
    assert len(reports) == nranks
    seen = [_check(r, with_timeout) for r in reports]
    if with_timeout:
        assert seen[1] == [], "rank 1 sat out the timed-out dispatch"
        assert len(seen[0]) == 2
        assert "rank 0 waited" in seen[0][0] and "for rank 1" in seen[0][0], seen[0][0]
        assert "unusable" in seen[0][1], seen[0][1]


@pytest.mark.parametrize("nranks", ep_params(smallest=2)[:1])
def test_clean_names_a_rank_that_never_comes(ranks, compiled, nranks):
    """No silent hang in clean_low_latency_buffer: outside graph capture it meets the other
    ranks in the group's barriers, so a rank that never calls it is named in a
    CommTimeoutError after the group's timeout (here 15 s), and the Buffer refuses further
    work."""
    # rank 1 stays away 20 s: past rank 0's 15 s barrier, and well inside the 15 s that rank 0
    # then waits in the barrier where both meet again
    results = ranks(f"{WORKERS}:clean_absent_peer", nranks, 20.0, timeout=240,
                    group_timeout=15)
    r0 = results[0]
    assert r0["error"] is not None, "clean without its peer must time out"
    assert "rank(s) 1" in r0["error"] and r0["peer"] == 1, r0
    assert r0["elapsed"] < 19, f"took {r0['elapsed']:.1f} s with a 15 s group timeout"
    assert "unusable" in r0["after"], r0["after"]
    assert results[1] == {"rank": 1}


@pytest.mark.parametrize("nranks", ep_params(smallest=2)[:1])
def test_destroy_names_a_rank_that_never_comes(ranks, compiled, nranks):
    """No silent hang in destroy(): NVSHMEM's free and finalize have no timeout, so destroy
    enters them only after two of the group's barriers. Rank 1 comes 20 s late (group timeout
    15 s): rank 0 times out in the first barrier naming rank 1; rank 1 passes the first (rank
    0's arrival is on record) and times out in the second, naming rank 0. Neither enters
    nvshmem_free, and both Buffers refuse further work."""
    r0, r1 = ranks(f"{WORKERS}:destroy_absent_peer", nranks, 20.0, timeout=240,
                   group_timeout=15)
    assert r0["peer"] == 1 and "rank(s) 1" in r0["error"], r0
    assert r0["elapsed"] < 19, f"rank 0 took {r0['elapsed']:.1f} s with a 15 s group timeout"
    assert r1["peer"] == 0 and "rank(s) 0" in r1["error"], r1
    assert r1["elapsed"] < 19, f"rank 1 took {r1['elapsed']:.1f} s with a 15 s group timeout"
    for r in (r0, r1):
        assert "destroyed" in r["after"], r["after"]
