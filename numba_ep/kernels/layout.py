"""get_dispatch_layout: who sends how many tokens where, computed from the router's top-k choice.

Input and outputs (T tokens, K slots, E experts, R ranks, G GPUs per node, N = R/G nodes,
L = E/R experts per rank; expert e lives on rank e // L):

    topk_idx           [T, K] int64   expert id per slot, -1 = slot unused
    num_tokens_per_expert [E] int32   (token, slot) pairs that chose expert e
    num_tokens_per_rank   [R] int32   tokens with at least one expert on rank r
    num_tokens_per_rdma_rank [N] int32  tokens with at least one expert on node n
    is_token_in_rank   [T, R] bool    token t goes to rank r

One launch, token-parallel, no host synchronisation (so it is CUDA-graph safe, deterministic since
all counts are integers, and runs in the numba simulator):

    block b, thread i   token t = b*256 + i: reads its K ids (independent loads, one memory round
                        trip), writes its is_token_in_rank row, and adds its expert / rank / node
                        hits to the block's shared-memory histogram (shared atomics).
    every block         writes its histogram to a row of a persistent workspace, fences, and takes
                        a ticket from a done-counter;
    the last block      (ticket == grid size - 1) sums the workspace rows into the three count
                        outputs and resets the done-counter to 0 for the next launch.

Who waits on whom: nobody spins; the last block only reads rows whose writers fenced before taking
their ticket.

Cost model (4096 x 8 int64 = 256 KiB of indices, E = 256, R = 2): 16 blocks each read 16 KiB and
write 2 KiB of is_token_in_rank; the last block reads 16 x 260 counters. A few microseconds of
work: launch latency and the two dependent phases dominate. (A first version with blocks that each
owned 8 experts and scanned all T*K ids serially took 85 us on an H100, latency-bound.)
"""
from __future__ import annotations

import numpy as np

from numba import cuda, int32, int64, uint8

from numba_ep.kernels import ptx

THREADS = 256  # tokens per block, one per thread

LAYOUT_SIG = "void(uint64, int32, uint64, uint64, uint64, uint64, uint64, uint64)"


def make_layout_kernel(num_experts, num_ranks, num_topk, gpus_per_node):
    """Specialise the layout kernel. Arguments: topk_idx address (int64 [T,K]), T, the addresses
    of num_tokens_per_rank, num_tokens_per_rdma_rank (ignored unless G < R),
    num_tokens_per_expert, is_token_in_rank, the workspace (int32 [grid, E+R+N]) and the
    done-counter (int32, zero between launches)."""
    E, R, K, G = num_experts, num_ranks, num_topk, gpus_per_node
    L = E // R
    NODES = (R + G - 1) // G
    LG = L * G  # experts per node
    COUNTS = E + R + NODES
    PER_NODE = G < R

    def layout_kernel(topk_addr, num_tokens, per_rank_addr, per_rdma_addr, per_expert_addr,
                      in_rank_addr, ws_addr, done_addr):
        tid = cuda.threadIdx.x
        bid = cuda.blockIdx.x
        hist = cuda.shared.array(COUNTS, int32)
        last = cuda.shared.array(1, int32)
        i = tid
        while i < COUNTS:
            hist[i] = 0
            i += THREADS
        cuda.syncthreads()

        t = bid * THREADS + tid
        if t < num_tokens:
            idx = ptx.ptr_i64(topk_addr)
            es = cuda.local.array(K, int64)
            for k in range(K):
                e = idx[int64(t) * K + k]
                es[k] = e if e >= 0 and e < E else -1  # out-of-range ids count nowhere
            for k in range(K):
                e = es[k]
                if e >= 0:
                    cuda.atomic.add(hist, e, 1)
                    new_rank = True
                    new_node = True
                    for j in range(k):  # count a rank / node once per token
                        if es[j] >= 0:
                            if es[j] // L == e // L:
                                new_rank = False
                            if es[j] // LG == e // LG:
                                new_node = False
                    if new_rank:
                        cuda.atomic.add(hist, E + e // L, 1)
                    if PER_NODE and new_node:
                        cuda.atomic.add(hist, E + R + e // LG, 1)
            row = ptx.ptr_u8(in_rank_addr)
            for r in range(R):
                hit = 0
                for k in range(K):
                    if es[k] >= 0 and es[k] // L == r:
                        hit = 1
                row[int64(t) * R + r] = uint8(hit)
        cuda.syncthreads()

        ws = ptx.ptr_i32(ws_addr)
        i = tid
        while i < COUNTS:
            ws[bid * COUNTS + i] = hist[i]
            i += THREADS
        cuda.threadfence()
        cuda.syncthreads()
        if tid == 0:
            last[0] = ptx.atomic_add_gpu_i32(done_addr, 1) == cuda.gridDim.x - 1
        cuda.syncthreads()
        if last[0]:
            cuda.threadfence()
            i = tid
            while i < COUNTS:
                total = int32(0)
                for b in range(cuda.gridDim.x):
                    total += ptx.ld_volatile_i32(ws_addr + (b * COUNTS + i) * 4)
                if i < E:
                    ptx.ptr_i32(per_expert_addr)[i] = total
                elif i < E + R:
                    ptx.ptr_i32(per_rank_addr)[i - E] = total
                elif PER_NODE:
                    ptx.ptr_i32(per_rdma_addr)[i - E - R] = total
                i += THREADS
            if tid == 0:
                ptx.ptr_i32(done_addr)[0] = 0

    return layout_kernel


_workspaces = {}


def _workspace(xp, blocks, counts):
    """Persistent (workspace, done-counter) pair for this device: grown, never shrunk, so a
    launch captured in a CUDA graph keeps valid addresses. The counter is zeroed once here and
    reset by every launch's last block."""
    dev = -1 if xp is np else xp.cuda.runtime.getDevice()
    ws, done = _workspaces.get(dev, (None, None))
    if ws is None or ws.size < blocks * counts:
        ws = xp.empty(max(blocks * counts, 2 * (ws.size if ws is not None else 0)), dtype=np.int32)
        if done is None:
            done = xp.zeros(1, dtype=np.int32)
        _workspaces[dev] = (ws, done)
    return ws, done


def get_dispatch_layout(topk_idx, num_experts, num_ranks, num_gpus_per_node=None, stream=None,
                        out=None):
    """Compute the dispatch layout on the device of ``topk_idx``.

    Args:
        topk_idx: ``[T, K]`` int64, C-contiguous; a CuPy array on a GPU, or a NumPy array when the
            numba simulator is active (``NUMBA_ENABLE_CUDASIM=1``). ``-1`` marks an unused slot.
        num_experts: E, a multiple of ``num_ranks``.
        num_ranks: R.
        num_gpus_per_node: G; ``num_tokens_per_rdma_rank`` is computed only when ``G < R``.
        stream: launch stream (None = CuPy's current stream).
        out: optional preallocated ``(num_tokens_per_rank, num_tokens_per_rdma_rank,
            num_tokens_per_expert, is_token_in_rank)`` to write into (no allocation: for CUDA
            graphs); ``num_tokens_per_rdma_rank`` may be None when ``G >= R``.

    Returns:
        ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [R/G] int32 or None,
        num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)``, arrays of the input's
        kind. Expert ids outside ``[-1, E)`` are not counted anywhere (validate on the host first
        when that matters; ``numba_ep.Buffer`` does). Launches on one stream at a time per device
        share a workspace: do not run two layouts concurrently on different streams.
    """
    from numba_ep.interop import address, array_module
    from numba_ep.launch import SIMULATOR, get_kernel

    xp = array_module(topk_idx)
    check_topk_idx(topk_idx, num_experts, num_ranks)
    T, K = topk_idx.shape
    G = num_ranks if num_gpus_per_node is None else int(num_gpus_per_node)
    if G <= 0 or num_ranks % G:
        raise ValueError(f"num_gpus_per_node: expected a divisor of num_ranks={num_ranks}, got {G}")
    nodes = num_ranks // G
    if out is None:
        per_rank = xp.empty(num_ranks, dtype=np.int32)
        per_rdma = xp.empty(max(nodes, 1), dtype=np.int32) if G < num_ranks else None
        per_expert = xp.empty(num_experts, dtype=np.int32)
        in_rank = xp.empty((T, num_ranks), dtype=np.bool_)
    else:
        per_rank, per_rdma, per_expert, in_rank = out
        for name, a, shape, dt in (("num_tokens_per_rank", per_rank, (num_ranks,), np.int32),
                                   ("num_tokens_per_expert", per_expert, (num_experts,), np.int32),
                                   ("is_token_in_rank", in_rank, (T, num_ranks), np.bool_)):
            if a.shape != shape or a.dtype != dt or not a.flags.c_contiguous:
                raise ValueError(f"out: {name} must be a contiguous {np.dtype(dt)} array of shape "
                                 f"{shape}, got {a.dtype} {a.shape}")
    factory, sig, constants = layout_spec(num_experts, num_ranks, K, G)
    kernel = get_kernel(factory, sig, **constants)
    blocks = max(1, (T + THREADS - 1) // THREADS)
    ws, done = _workspace(xp, blocks, num_experts + num_ranks + nodes)
    if SIMULATOR and xp is not np:
        raise TypeError("topk_idx: the numba simulator needs a NumPy array")
    kernel.launch(blocks, THREADS, address(topk_idx), T, address(per_rank),
                  0 if per_rdma is None else address(per_rdma), address(per_expert),
                  address(in_rank), address(ws), address(done), stream=stream)
    return per_rank, (per_rdma if G < num_ranks else None), per_expert, in_rank


def check_topk_idx(topk_idx, num_experts, num_ranks):
    """Shape/dtype/contiguity checks shared by every entry point that takes ``topk_idx``."""
    if getattr(topk_idx, "ndim", None) != 2:
        raise ValueError(f"topk_idx: expected a 2-D [num_tokens, num_topk] array, got shape "
                         f"{getattr(topk_idx, 'shape', None)}")
    if topk_idx.dtype != np.int64:
        raise TypeError(f"topk_idx: expected dtype int64 (numba_ep.topk_idx_t), got {topk_idx.dtype}")
    if not topk_idx.flags.c_contiguous:
        raise ValueError("topk_idx: expected a C-contiguous array")
    if num_experts <= 0 or num_ranks <= 0 or num_experts % num_ranks:
        raise ValueError(f"num_experts: expected a positive multiple of num_ranks={num_ranks}, "
                         f"got {num_experts}")


def layout_spec(num_experts, num_ranks, num_topk, gpus_per_node):
    """``(factory, signature, constants)`` of the layout kernel for these sizes (for launching and
    for compiling ahead of time)."""
    return (make_layout_kernel, LAYOUT_SIG, dict(num_experts=num_experts, num_ranks=num_ranks,
                                                 num_topk=num_topk, gpus_per_node=gpus_per_node))
