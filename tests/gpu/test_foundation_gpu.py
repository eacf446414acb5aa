"""GPU tests of the foundation: the fast launch path (plain, graph capture, NVSHMEM-linked),
get_dispatch_layout at full size, and the device barrier across ranks."""
import numpy as np
import pytest

import numba_ep  # noqa: F401
from kernels_for_tests import make_axpy  # noqa: E402

from workers_foundation import (barrier_rounds, barrier_timeout, layout_full_size,  # noqa: E402
                                nvshmem_kernel_fast_path)


@pytest.mark.gpu
def test_fast_launch_and_graph_capture():
    import cupy as cp

    from numba_ep.launch import get_kernel

    n = 100_003
    rng = np.random.default_rng()
    x = cp.asarray(rng.standard_normal(n).astype(np.float32))
    y0 = rng.standard_normal(n).astype(np.float32)
    y = cp.asarray(y0)
    k = get_kernel(make_axpy, "void(uint64, uint64, int32)", alpha=3.0)
    stream = cp.cuda.Stream(non_blocking=True)
    k.launch((n + 255) // 256, 256, y.data.ptr, x.data.ptr, n, stream=stream)
    stream.synchronize()
    np.testing.assert_allclose(cp.asnumpy(y), 3.0 * cp.asnumpy(x) + y0, rtol=1e-5, atol=1e-6)
    # Captured into a CUDA graph, replayed twice: y += 3x twice more.
    stream.begin_capture()
    k.launch((n + 255) // 256, 256, y.data.ptr, x.data.ptr, n, stream=stream)
    graph = stream.end_capture()
    graph.launch(stream)
    graph.launch(stream)
    stream.synchronize()
    np.testing.assert_allclose(cp.asnumpy(y), 9.0 * cp.asnumpy(x) + y0, rtol=1e-5, atol=1e-5)
    assert get_kernel(make_axpy, "void(uint64, uint64, int32)", alpha=3.0) is k  # memoised


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,K,R,G", [(4096, 256, 8, 2, 2), (4096, 256, 8, 8, 4),
                                       (1, 64, 4, 2, 1), (0, 64, 4, 2, 2), (777, 96, 6, 3, 3),
                                       (3000, 288, 8, 16, 8)])
def test_layout_full_size_matches_reference(T, E, K, R, G, ranks):
    assert ranks(layout_full_size, 1, T, E, K, R, G) == [True]


@pytest.mark.multigpu
def test_barrier_across_two_gpus(ranks):
    assert ranks(barrier_rounds, 2, 20) == [True, True]


@pytest.mark.multigpu
def test_barrier_timeout_names_the_missing_rank(ranks):
    res = ranks(barrier_timeout, 2)
    peer, msg = res[0]
    assert peer == 1 and "rank 1" in msg and "barrier" in msg


@pytest.mark.gpu
def test_nvshmem_kernel_through_fast_path_one_gpu(ranks):
    assert ranks(nvshmem_kernel_fast_path, 1) == [0]


@pytest.mark.multigpu
def test_nvshmem_kernel_through_fast_path_two_gpus(ranks):
    # Rank r wrote r into slot r of rank r+1: rank 0 holds 1's value in slot 1, and so on.
    assert ranks(nvshmem_kernel_fast_path, 2) == [1, 0]
