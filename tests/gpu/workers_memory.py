"""Spawn targets for tests/gpu/test_memory_gpu.py: each function runs in one rank's process.

They return plain Python values (dicts of ints and lists) so the parent can unpickle them whatever
name this module was imported under.
"""
import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)
import numpy as np


def _view(cp, ptr, nbytes, owner, device, dtype):
    """A CuPy array over someone else's memory, used from ``device``."""
    mem = cp.cuda.UnownedMemory(int(ptr), int(nbytes), owner, device)
    return cp.ndarray((nbytes // np.dtype(dtype).itemsize,), dtype,
                      memptr=cp.cuda.MemoryPointer(mem, 0))


def ipc_exchange(group, nbytes):
    """IpcBuffer: tables, zero fill, reads of every peer's block, writes into every peer's block."""
    import cupy as cp

    from numba_ep.memory import IpcBuffer, ipc_layout

    r, n = group.rank, group.size
    buf = IpcBuffer(group, nbytes)
    assert (buf.nbytes, buf.signal_offset, buf.alloc_bytes) == tuple(ipc_layout(nbytes))
    assert buf.ptrs[r] == buf.local.data.ptr
    assert buf.signal_ptrs == [p + buf.signal_offset for p in buf.ptrs]
    assert cp.asnumpy(buf.peer_ptrs_dev).tolist() == buf.ptrs
    assert cp.asnumpy(buf.signal_ptrs_dev).tolist() == buf.signal_ptrs
    assert buf.peer_ptrs_dev.dtype == cp.uint64 and buf.peer_ptrs_dev.shape == (n,)
    assert buf.local.size == buf.nbytes and buf.signals.size == 1024
    zero = int(cp.count_nonzero(buf.local)) == 0 and int(cp.count_nonzero(buf.signals)) == 0

    # 1. Each rank writes its id into its own first bytes; after a barrier everyone reads them.
    buf.local[:256] = r + 1
    cp.cuda.runtime.deviceSynchronize()
    group.barrier()
    seen = {}
    for p in range(n):
        arr = _view(cp, buf.ptrs[p], 256, buf, buf.device, cp.uint8)
        seen[p] = np.unique(cp.asnumpy(arr)).tolist()

    # 2. Each rank writes into every block: int32 slot r at byte 4096 of the data region, and
    #    signal slot r; after a barrier each rank finds every peer's mark in its own block.
    for p in range(n):
        data = buf.peer(p, dtype=cp.int32)
        data[1024 + r] = 100 + r
        sig = _view(cp, buf.signal_ptrs[p], 4096, buf, buf.device, cp.int32)
        sig[r] = r + 1
    cp.cuda.runtime.deviceSynchronize()
    group.barrier()
    got = cp.asnumpy(buf.local.view(cp.int32)[1024:1024 + n]).tolist()
    sigs = cp.asnumpy(buf.signals[:n]).tolist()

    dev = buf.device
    buf.close()
    buf.close()  # idempotent
    assert buf.closed
    # a context-managed second buffer in the same process
    with IpcBuffer(group, 128) as small:
        small.local[:] = 7
    return {"rank": r, "device": dev, "zero": zero, "seen": seen, "got": got, "sigs": sigs}


def nvshmem_ring(group, nbytes):
    """NVSHMEM init (reference counted), a SymmetricBuffer written by rank r into rank r+1."""
    import cupy as cp

    from numba_ep.memory import (SymmetricBuffer, nvshmem_finalize, nvshmem_init,
                                 nvshmem_runtime)

    r, n = group.rank, group.size
    rt = nvshmem_init(group)
    assert (rt.rank, rt.size, rt.refs) == (r, n, 1), rt
    assert nvshmem_init(group) is rt and rt.refs == 2
    assert nvshmem_finalize() is False and rt.active and rt.refs == 1

    sb = SymmetricBuffer(nbytes)
    assert sb.ptr == sb.local.data.ptr == sb.peer_ptrs[r]
    assert cp.asnumpy(sb.peer_ptrs_dev).tolist() == sb.peer_ptrs
    zero = int(cp.count_nonzero(sb.local)) == 0
    nxt, prv = (r + 1) % n, (r - 1) % n
    reachable = [p != 0 for p in sb.peer_ptrs]
    dst = sb.peer(nxt, cp.int32)
    if dst is None:
        sb.close()
        nvshmem_finalize()
        return {"rank": r, "reachable": reachable, "got": None}
    dst[:256] = 1000 + r
    cp.cuda.runtime.deviceSynchronize()
    rt.barrier()
    got = np.unique(cp.asnumpy(sb.local.view(cp.int32)[:256])).tolist()
    expect = [1000 + prv]

    sb2 = SymmetricBuffer(4096)
    sb3 = SymmetricBuffer(100)   # left open: the last finalize frees it
    assert sb3.nbytes == 128
    sb2.close()
    sb2.close()
    sb.close()
    assert nvshmem_finalize() is True
    assert sb3.closed and nvshmem_runtime() is None and not rt.active
    assert nvshmem_finalize() is False
    return {"rank": r, "reachable": reachable, "zero": zero, "got": got, "expect": expect}


def nvshmem_two_cycles(group):
    """init/finalize twice in one process. Returns {"reinit": True} or why the second failed."""
    import cupy as cp

    from numba_ep.memory import SymmetricBuffer, nvshmem_finalize, nvshmem_init

    for cycle in range(2):
        try:
            rt = nvshmem_init(group)
        except Exception as e:
            if cycle == 0:
                raise
            return {"reinit": False, "error": f"{type(e).__name__}: {e}"}
        sb = SymmetricBuffer(1024)
        sb.local[:] = cycle + 1
        cp.cuda.runtime.deviceSynchronize()
        rt.barrier()
        assert int(cp.count_nonzero(sb.local != cycle + 1)) == 0
        sb.close()
        assert nvshmem_finalize() is True
    return {"reinit": True}
