"""Rank bodies for tests/gpu/test_foundation_gpu.py (spawned processes import this module)."""
import numpy as np

import numba_ep  # noqa: F401


def layout_full_size(group, num_tokens, num_experts, num_topk, num_ranks, gpus_per_node):
    import cupy as cp

    from numba_ep import reference
    from numba_ep.demo import _random_topk
    from numba_ep.kernels.layout import get_dispatch_layout

    rng = np.random.default_rng()
    topk = _random_topk(rng, num_tokens, num_experts, num_topk, drop=0.2)
    got = get_dispatch_layout(cp.asarray(topk), num_experts, num_ranks, gpus_per_node)
    want = reference.get_dispatch_layout(topk, num_experts, num_ranks, gpus_per_node)
    for name, g, w in zip(["per_rank", "per_rdma", "per_expert", "in_rank"], got, want):
        if w is None:
            assert g is None, name
        else:
            assert np.array_equal(cp.asnumpy(g), w), name
    return True


def barrier_rounds(group, rounds):
    """Every rank bumps a counter in its own IPC buffer, then barriers; after each barrier every
    rank must see every peer's counter at the round number (the barrier publishes prior writes)."""
    import cupy as cp

    from numba_ep.kernels.barrier import barrier
    from numba_ep.memory import IpcBuffer

    with IpcBuffer(group, 1 << 16) as buf:
        peers = [cp.ndarray((1,), dtype=cp.int32, memptr=cp.cuda.MemoryPointer(
            cp.cuda.UnownedMemory(p, 4, buf), 0)) for p in buf.ptrs]
        for i in range(1, rounds + 1):
            peers[group.rank][0] = i
            barrier(buf, group.rank, group.size)
            seen = [int(p[0].get()) for p in peers]
            assert all(s >= i for s in seen), (i, seen)
            barrier(buf, group.rank, group.size)
    return True


def barrier_timeout(group):
    """Rank 1 never enters the device barrier: rank 0 must raise CommTimeoutError naming it."""
    from numba_ep.errors import CommTimeoutError
    from numba_ep.kernels.barrier import barrier
    from numba_ep.memory import IpcBuffer

    with IpcBuffer(group, 1 << 16) as buf:
        result = None
        if group.rank == 0:
            try:
                barrier(buf, 0, group.size, timeout_s=1.0)
                result = "no error"
            except CommTimeoutError as e:
                result = (e.peer, str(e))
        group.barrier()  # host barrier: rank 1 stays alive until rank 0 has given up
    return result


def nvshmem_kernel_fast_path(group):
    """A kernel that calls NVSHMEM device code, launched through numba_ep.launch: every rank puts
    its rank number into the next rank's symmetric array with nvshmem_int_p."""
    import cupy as cp

    from numba_ep.group import current_device
    from numba_ep.launch import get_kernel
    from numba_ep.memory import SymmetricBuffer, nvshmem_finalize, nvshmem_init

    dev = current_device()
    nvshmem_init(group, dev)
    try:
        sym = SymmetricBuffer(4 * group.size)
        arr = sym.local.view(cp.int32)
        arr[:] = -1
        cp.cuda.Device().synchronize()
        group.barrier()
        k = get_kernel(make_int_p_kernel, "void(uint64, int32, int32)")
        assert k.meta["nvshmem"], "the kernel should have been detected as linking NVSHMEM"
        k.launch(1, 32, int(sym.ptr), group.rank, (group.rank + 1) % group.size)
        cp.cuda.Device().synchronize()
        group.barrier()
        got = int(arr[(group.rank - 1) % group.size].get())  # written by the previous rank
        sym.close()
    finally:
        nvshmem_finalize()
    return got


def make_int_p_kernel():
    from numba import cuda

    import nvshmem.bindings.device.numba as raw

    from numba_ep.kernels import ptx

    def int_p_kernel(sym_addr, rank, peer):
        if cuda.threadIdx.x == 0:
            # Slot `rank` of the peer's copy of the symmetric array.
            raw.int_p(ptx.ptr_i32(sym_addr + rank * 4), rank, peer)
            raw.quiet()

    return int_p_kernel
