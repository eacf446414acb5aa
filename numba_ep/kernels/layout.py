"""get_dispatch_layout: who sends how many tokens where, computed from the router's top-k choice.

Input and outputs (T tokens, K slots, E experts, R ranks, G GPUs per node, N = R/G nodes,
L = E/R experts per rank; expert e lives on rank e // L):

    topk_idx           [T, K] int64   expert id per slot, -1 = slot unused
    num_tokens_per_expert [E] int32   (token, slot) pairs that chose expert e
    num_tokens_per_rank   [R] int32   tokens with at least one expert on rank r
    num_tokens_per_rdma_rank [N] int32  tokens with at least one expert on node n
    is_token_in_rank   [T, R] bool    token t goes to rank r

One launch, two kinds of block, no atomics and no zero-filled outputs (so it is deterministic,
CUDA-graph safe and runs in the numba simulator):

    blocks [0, NB_E)          expert blocks: block b owns experts [b*EPB, (b+1)*EPB); every
                              thread scans a strided share of all T*K slots and keeps EPB counters
                              in registers; a shared-memory column sum gives the totals.
    blocks [NB_E, NB_E+NB_R)  rank blocks: block j owns ranks and nodes [j*RPB, (j+1)*RPB); every
                              thread takes whole tokens, writes their is_token_in_rank bytes and
                              counts hits per owned rank / node; a column sum gives the totals.

Nobody waits on anybody: blocks are independent.

Cost model (4096 x 8 int64 = 256 KiB of indices, E = 256, R = 2): each of the 32 expert blocks
reads the whole index array once from L2 (8 MiB of L2 reads in all) and the rank block reads it
once more and writes T*R bytes; a few microseconds of L2 traffic, so launch latency and the rank
block's serial loop (16 tokens per thread) dominate.
"""
from __future__ import annotations

import numpy as np

from numba import cuda, int32, int64, uint8

from numba_ep.kernels import ptx

THREADS = 256
EXPERTS_PER_BLOCK = 8   # EPB
RANKS_PER_BLOCK = 8     # RPB

LAYOUT_SIG = "void(uint64, int32, uint64, uint64, uint64, uint64)"


def make_layout_kernel(num_experts, num_ranks, num_topk, gpus_per_node):
    """Specialise the layout kernel. Arguments: topk_idx address (int64 [T,K]), T, and the
    addresses of num_tokens_per_rank, num_tokens_per_rdma_rank (ignored when G >= R),
    num_tokens_per_expert and is_token_in_rank."""
    E, R, K, G = num_experts, num_ranks, num_topk, gpus_per_node
    L = E // R
    NODES = (R + G - 1) // G
    LG = L * G  # experts per node
    NB_E = (E + EXPERTS_PER_BLOCK - 1) // EXPERTS_PER_BLOCK
    EPB = EXPERTS_PER_BLOCK
    RPB = RANKS_PER_BLOCK
    COLS = 2 * RPB  # rank counters then node counters

    def layout_kernel(topk_addr, num_tokens, per_rank_addr, per_rdma_addr, per_expert_addr,
                      in_rank_addr):
        tid = cuda.threadIdx.x
        bid = cuda.blockIdx.x
        idx = ptx.ptr_i64(topk_addr)
        # [counter, thread]: consecutive threads touch consecutive words, so no bank conflicts.
        partial = cuda.shared.array((COLS, THREADS), int32)

        if bid < NB_E:
            first = bid * EPB
            for j in range(EPB):
                partial[j, tid] = 0
            n_slots = num_tokens * K
            i = tid
            while i < n_slots:
                off = idx[i] - first
                # One compare per owned expert, unrolled: counters stay in shared per-thread cells
                # that only this thread touches, so there are no races until the column sum.
                if off >= 0 and off < EPB:
                    partial[off, tid] += 1
                i += THREADS
            cuda.syncthreads()
            if tid < EPB and first + tid < E:
                total = 0
                for t in range(THREADS):
                    total += partial[tid, t]
                out = ptx.ptr_i32(per_expert_addr)
                out[first + tid] = total
        else:
            first = (bid - NB_E) * RPB
            for j in range(COLS):
                partial[j, tid] = 0
            in_rank = ptx.ptr_u8(in_rank_addr)
            t = tid
            while t < num_tokens:
                # Bit j of rank_bits / node_bits: the token has a slot on owned rank / node j.
                rank_bits = 0
                node_bits = 0
                for k in range(K):
                    e = idx[t * K + k]
                    if e >= 0:
                        r = e // L - first
                        if r >= 0 and r < RPB:
                            rank_bits |= 1 << r
                        n = e // LG - first
                        if n >= 0 and n < RPB:
                            node_bits |= 1 << n
                for j in range(RPB):
                    if first + j < R:
                        hit = (rank_bits >> j) & 1
                        in_rank[int64(t) * R + first + j] = uint8(hit)
                        partial[j, tid] += hit
                    partial[RPB + j, tid] += (node_bits >> j) & 1
                t += THREADS
            cuda.syncthreads()
            if tid < COLS:
                j = tid % RPB
                total = 0
                for u in range(THREADS):
                    total += partial[tid, u]
                if tid < RPB:
                    if first + j < R:
                        ptx.ptr_i32(per_rank_addr)[first + j] = total
                elif G < R and first + j < NODES:
                    ptx.ptr_i32(per_rdma_addr)[first + j] = total

    return layout_kernel


def grid_size(num_experts, num_ranks):
    """Blocks of one layout launch: expert blocks then rank blocks."""
    return ((num_experts + EXPERTS_PER_BLOCK - 1) // EXPERTS_PER_BLOCK
            + (num_ranks + RANKS_PER_BLOCK - 1) // RANKS_PER_BLOCK)


def get_dispatch_layout(topk_idx, num_experts, num_ranks, num_gpus_per_node=None, stream=None):
    """Compute the dispatch layout on the device of ``topk_idx``.

    Args:
        topk_idx: ``[T, K]`` int64, C-contiguous; a CuPy array on a GPU, or a NumPy array when the
            numba simulator is active (``NUMBA_ENABLE_CUDASIM=1``). ``-1`` marks an unused slot.
        num_experts: E, a multiple of ``num_ranks``.
        num_ranks: R.
        num_gpus_per_node: G; ``num_tokens_per_rdma_rank`` is computed only when ``G < R``.
        stream: launch stream (None = CuPy's current stream).

    Returns:
        ``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [R/G] int32 or None,
        num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)``, arrays of the input's
        kind. Expert ids outside ``[-1, E)`` are not counted anywhere (validate on the host first
        when that matters; ``numba_ep.Buffer`` does).
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
    per_rank = xp.empty(num_ranks, dtype=np.int32)
    per_rdma = xp.empty(max(nodes, 1), dtype=np.int32)
    per_expert = xp.empty(num_experts, dtype=np.int32)
    in_rank = xp.empty((T, num_ranks), dtype=np.bool_)
    kernel = get_kernel(make_layout_kernel, LAYOUT_SIG, num_experts=num_experts,
                        num_ranks=num_ranks, num_topk=K, gpus_per_node=G)
    if SIMULATOR and xp is not np:
        raise TypeError("topk_idx: the numba simulator needs a NumPy array")
    kernel.launch(grid_size(num_experts, num_ranks), THREADS, address(topk_idx), T, address(per_rank),
                  address(per_rdma), address(per_expert), address(in_rank), stream=stream)
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
