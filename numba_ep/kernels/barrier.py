"""Intranode barrier across the ranks of an IPC buffer, bounded by a timeout.

Memory: every rank's IPC buffer has a signal region (``IpcBuffer.signal_ptrs``) of int32 words;
word ``i`` of rank ``r``'s region is the *balance* between rank r and rank i:

    sig_r[i] = (barriers rank r has entered) - (barriers rank i has entered)

Entering, thread i (< R) of rank r does two system-scope atomics:

    sig_r[i] += 1          on my own memory
    sig_i[r] -= 1          on peer i's memory, over NVLink

then waits until ``sig_r[i] <= 0``, i.e. rank i has entered at least as many barriers as rank r.
The counters are never reset (the balance returns to 0 after every completed barrier), and a peer
that is already one barrier ahead does not confuse anybody.

Who waits on whom: every rank waits on every other rank; nothing else. A rank that never arrives
makes the others record a timeout naming it (numba_ep.kernels.waits) and return.
Before arriving, a system-scope fence publishes this rank's earlier writes to the peers; after
leaving, another fence orders this rank's later reads after the peers' earlier writes.

``barrier_block`` is the device function other kernels call (every thread of the block must call
it); ``barrier`` launches it alone.
"""
from __future__ import annotations

from numba import cuda, int64, uint64

from numba_ep.kernels import ptx
from numba_ep.kernels.waits import KERNEL_IDS, record_timeout, timed_out

BARRIER_SIG = "void(uint64, int32, int64, uint64)"
MAX_RANKS = 32  # one warp: thread i serves peer i


@cuda.jit(device=True)
def barrier_block(signal_table_addr, rank, num_ranks, timeout_ns, err_addr, kernel_id):
    """Block-wide barrier with every rank; called by all threads of the block."""
    i = cuda.threadIdx.x
    ptx.fence_acq_rel_sys()
    cuda.syncthreads()
    if i < num_ranks:
        table = ptx.ptr_u64(signal_table_addr)
        mine = table[rank] + uint64(4 * i)
        ptx.atomic_add_sys_i32(mine, 1)
        ptx.atomic_sub_sys_i32(table[i] + uint64(4 * rank), 1)
        start = ptx.globaltimer()
        seen = ptx.ld_volatile_i32(mine)
        while seen > 0:
            if timed_out(start, timeout_ns):
                record_timeout(err_addr, kernel_id, rank, i, -1, 0, seen,
                               int64(ptx.globaltimer() - start))
                break
            seen = ptx.ld_volatile_i32(mine)
    ptx.fence_acq_rel_sys()
    cuda.syncthreads()


def make_barrier_kernel(num_ranks):
    """Barrier kernel for ``num_ranks`` ranks. Arguments: address of the device table of every
    rank's signal-region address (uint64 [R]), my rank, timeout in ns, error-record address."""
    R = num_ranks
    kid = KERNEL_IDS["barrier"]

    def barrier_kernel(signal_table_addr, rank, timeout_ns, err_addr):
        barrier_block(signal_table_addr, rank, R, timeout_ns, err_addr, kid)

    return barrier_kernel


def barrier(buffer, rank, num_ranks, stream=None, timeout_s=None, check=True):
    """Run the device barrier on ``stream`` over ``buffer`` (a ``numba_ep.memory.IpcBuffer``).

    With ``check`` (default) the host waits for the stream and raises ``CommTimeoutError`` naming
    the rank that did not arrive; with ``check=False`` it only enqueues (graph capture, overlap).
    """
    from numba_ep.kernels.waits import error_record, timeout_ns
    from numba_ep.launch import get_kernel, stream_handle

    if not 1 <= num_ranks <= MAX_RANKS:
        raise ValueError(f"num_ranks: expected 1..{MAX_RANKS}, got {num_ranks}")
    rec = error_record()
    factory, sig, constants = barrier_spec(num_ranks)
    k = get_kernel(factory, sig, **constants)
    k.launch(1, 32, int(buffer.signal_ptrs_dev.data.ptr), rank, timeout_ns(timeout_s),
             rec.device_address, stream=stream)
    if check:
        import cupy

        cupy.cuda.runtime.streamSynchronize(stream_handle(stream))
        rec.check()


def barrier_spec(num_ranks):
    """``(factory, signature, constants)`` of the barrier kernel for ``num_ranks`` ranks."""
    return (make_barrier_kernel, BARRIER_SIG, dict(num_ranks=num_ranks))
