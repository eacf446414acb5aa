"""GPU tests of the foundation: the fast launch path (plain, graph capture, NVSHMEM-linked),
get_dispatch_layout at full size, the device barrier across ranks, and CuPy views of torch
tensors."""
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


@pytest.mark.gpu
def test_device_view_of_torch_tensors_reads_the_same_bits():
    """interop.device_view builds CuPy views of CUDA tensors from data_ptr/shape/strides: every
    dtype family, offsets, strides (sliced, transposed, expanded), 0-d and empty tensors read
    the tensor's own bits, writes through the view reach the tensor, and the view keeps the
    tensor's memory alive."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    import cupy as cp

    from numba_ep.interop import device_view

    dev = torch.device("cuda", cp.cuda.Device().id)
    g = torch.Generator(device="cpu").manual_seed(int(np.random.default_rng().integers(1 << 30)))
    base = torch.randn((37, 64), generator=g).to(dev)
    carriers = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8,
                torch.bool: torch.uint8}
    cases = {
        "bf16": base.to(torch.bfloat16),
        "fp8 3-d": base.reshape(37, 8, 8).to(torch.float8_e4m3fn),
        "bool": base > 0,
        "int64 every other column": (base * 100).to(torch.int64)[:, ::2],
        "float32 rows 5..": base[5:],
        "float32 transposed": base.t(),
        "int32 expanded": torch.arange(64, dtype=torch.int32, device=dev).expand(3, 64),
        "float32 0-d": base[3, 4],
        "uint8 empty": torch.empty((0, 16), dtype=torch.uint8, device=dev),
    }
    for name, t in cases.items():
        v = device_view(t, name)
        assert tuple(v.shape) == tuple(t.shape), name
        want = (t.view(carriers[t.dtype]) if t.dtype in carriers else t).cpu().numpy()
        np.testing.assert_array_equal(cp.asnumpy(v).view(want.dtype), want, err_msg=name)
    t = torch.zeros(10, dtype=torch.float32, device=dev)
    device_view(t[2:5], "slice")[...] = 7
    torch.cuda.synchronize()
    assert t.cpu().tolist() == [0, 0, 7, 7, 7, 0, 0, 0, 0, 0]
    v = device_view(torch.full((1 << 20,), 3, dtype=torch.int32, device=dev), "owned")
    torch.cuda.empty_cache()
    junk = torch.full((4 << 20,), 9, dtype=torch.int32, device=dev)  # would reuse freed memory
    torch.cuda.synchronize()
    assert int(cp.count_nonzero(v != 3)) == 0
    del junk


@pytest.mark.gpu
def test_results_made_by_torch_go_back_as_views_of_their_tensor():
    """Under interop.torch_allocations CuPy arrays live in torch tensors; to_caller hands them
    back as views of those tensors (same address, the asked dtype and shape, bits unchanged),
    also when the dtype's width differs (uint8 rows -> bfloat16); views at an offset and
    strided arrays are handed back correctly too (the strided ones through DLPack); the memory
    stays valid after the CuPy array is gone."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    import cupy as cp

    from numba_ep.interop import _owner_view, to_caller, torch_allocations

    dev_id = cp.cuda.Device().id
    rng = np.random.default_rng()
    with torch_allocations(dev_id):
        rows = cp.asarray(rng.integers(0, 256, (5, 64), dtype=np.uint8))
        idx = cp.asarray(rng.integers(-1, 100, (7, 3)))
        flags = cp.asarray(rng.random((4, 9)) > 0.5)
        pair = cp.asarray(rng.random((6, 4), dtype=np.float32))
    assert idx.dtype == np.int64
    for a in (rows, idx, flags, pair):
        assert torch.is_tensor(a.data.mem._owner)   # made by torch
    t = to_caller(rows, True, torch_dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == (5, 32)
    assert t.data_ptr() == rows.data.ptr and _owner_view(rows, torch.bfloat16) is not None
    np.testing.assert_array_equal(t.view(torch.uint8).cpu().numpy(), cp.asnumpy(rows))
    for a, want in ((idx, torch.int64), (flags, torch.bool), (pair, torch.float32)):
        t = to_caller(a, True)
        assert t.dtype == want and tuple(t.shape) == a.shape and t.data_ptr() == a.data.ptr
        np.testing.assert_array_equal(t.cpu().numpy(), cp.asnumpy(a))
    col = pair[:, 1]                   # strided: DLPack
    assert _owner_view(col, None) is None
    np.testing.assert_array_equal(to_caller(col, True).cpu().numpy(), cp.asnumpy(col))
    tail = pair[2:]                    # contiguous at an offset: a view
    t = to_caller(tail, True)
    assert t.data_ptr() == tail.data.ptr
    np.testing.assert_array_equal(t.cpu().numpy(), cp.asnumpy(tail))
    want = cp.asnumpy(idx)
    t = to_caller(idx, True)
    del idx
    junk = torch.full((1 << 20,), 9, dtype=torch.int64, device=t.device)  # would reuse memory
    torch.cuda.synchronize()
    np.testing.assert_array_equal(t.cpu().numpy(), want)
    del junk
    # outside the context CuPy's own pool is back
    assert not torch.is_tensor(getattr(cp.empty(16, np.int32).data.mem, "_owner", None))
