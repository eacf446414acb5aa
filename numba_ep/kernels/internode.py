"""Internode normal mode: notify, dispatch and combine for ranks on several nodes.

Terms: R ranks in N = R / G nodes of G GPUs; rank r = n*G + g is GPU g of node n. C channels
(contiguous token ranges, as in intranode mode), T tokens on this rank, Tm the most tokens any
rank holds in this dispatch, Hb row bytes of x, S scales and K top-k slots per token, E experts,
L = E / R per rank. A token of rank (a, i) bound for rank (b, j) travels once per destination
node: to its *forwarder* (b, i), the GPU with the same index on node b, by NVSHMEM put (a network
transfer when a != b; a local copy when a == b), then from the forwarder to (b, j) over NVLink.
The NVLink hop is a *pull*: (b, j) reads the forwarder's buffer through its NVLink-mapped
address, so no forwarding kernel and no NVLink ring is needed. Combine is the reverse: each
forwarder pulls the rows its node's GPUs hold for a token, sums them (fp32) and puts the partial
sum back to the token's source, which adds the partials of every node.

This is not DeepEP's kernel: DeepEP streams through bounded RDMA and NVLink rings with head/tail
flow control, so its buffers do not grow with the batch. Here every region is sized for the whole
batch (memory grows with Tm; ``dispatch_bytes`` / ``combine_bytes`` say how much, and the Buffer
refuses a call that does not fit), and in exchange nothing ever waits for buffer space: senders
never wait, only receivers do. The user-visible results and the 10-item handle are DeepEP's
(``numba_ep.reference.internode_dispatch``; one NVLink sub-ring per (channel, source node), so
``send_nvl_head`` is a function of the routing).

Symmetric buffer (NVSHMEM heap, the same offsets on every rank), int32 words unless said:

    header  meta_flag  [R]             [s] = epoch once rank s's meta has landed here
            sync_flag  [R]             [s] = epoch once rank s reached the combine barrier
            disp_flag  [N][MAXC]       [a][c] = epoch once source (a, my g) delivered channel c
            comb_flag  [N][MAXC]       [b][c] = epoch once forwarder (b, my g) returned channel c
            staged     [1]             = epoch once my combine input is staged (peers poll it)
            pub        [R][MAXC]       my recv_gbl_channel_prefix_matrix, published for combine
            meta_in    [2][R][WM]      [p][s] = rank s's meta for me, in notify number p % 2
            meta_out   [R][WM]         [d] = my meta for rank d (the source of its put)
                       meta for d = [T, my tokens per channel bound for d's node [C], bound for
                       d [C], (token, slot) pairs per expert of d [L]];  WM = 1 + 2*MAXC + 1024
    dispatch (after the header):
            send  [Tm] records of my tokens                               (staging for puts)
            recv  [N][Tm] records: [a][k] = k-th token of source (a, my g) bound for my node
            record = [x row: Hb B][scales: 4S B][top-k ids: K int32][weights: K float32]
                     [counter: R int32], padded to 16 B. counter[d] = the token's row inside
                     the (source, channel) block of rank d's recv_x, or -1 if d does not get it.
    combine (after the header; overlaps the dispatch regions, which are dead by then):
            csend  [N][Tm] partial sums I forward, staged for the puts       (row: 2H B + 4K B)
            cred   [N][Tm] partial sums for my tokens: [b][k] from forwarder (b, my g)
            cstage [num_recv] my combine input rows (x and weights), for my node's forwarders

Epochs: every collective call takes the next value of a host counter (the same on every rank,
as calls are collective and in order), and every flag is written with it, so no flag is ever
reset. Each dispatch starts with notify's exchange and each combine with a barrier, so no rank
writes a data region while another still reads it from the previous call. Only notify writes
before it waits (a peer one call ahead writes its meta while I may still be in the previous
dispatch, which reads meta): meta_in alternates between two halves, call by call.

Who waits on whom:

    notify (1 block)    count my tokens per (rank, channel) and (node, channel); put my meta
                        for d into slot [me] of rank d; set meta_flag[me] there ----> wait for
                        all R meta_flags; from every rank's meta: the handle's prefix matrices and
                        the host-mapped counters (received rows, RDMA-received rows, Tm, rows
                        per local expert) the host waits on to size the outputs.
    dispatch (2C blocks, cooperative)
      sender c          ballots over the channel's tokens give each token's counter per rank and
                        its slot per node (send_rdma_head); records into send[t]; each record
                        goes to recv[my node][slot] of forwarder (b, my g) for every node b it
                        visits; then disp_flag[my node][c] at every forwarder  ---->
      receiver c        for every forwarder f = (my node, i) and source node a: wait
                        disp_flag[a][c] at f; read f's records of channel c; rows with
                        counter[me] >= 0 go to recv_x (NVLink loads). The receiver that is the
                        forwarder itself also writes send_nvl_head.
    sync (1 block)      barrier before a combine (sync_flag all-to-all).
    combine (2C blocks, cooperative; blocks c and c + C share channel c, each taking every
             other warp-step of its tokens in both roles below)
      every block       stage my input rows into cstage; the last block sets staged = epoch
      forwarder c       wait staged of my node's GPUs; per RDMA-received token of channel c:
                        sum the rows of the GPUs that hold it (pulled by NVLink, located by
                        their published recv_gbl_channel_prefix_matrix and send_nvl_head) and
                        put the bf16 partial to cred[my node][k] of its source; the second
                        half to finish (a counter per channel in the workspace) completes the
                        PE's puts and sets comb_flag[my node][c] at each source  ---->
      source c          wait comb_flag[b][c] for every node b; out[t] = bias0 + bias1 + the
                        partials of the nodes token t visited (fp32, bf16 out).

All waits are bounded (numba_ep.kernels.waits): a rank that never arrives becomes a
CommTimeoutError naming it. Senders never wait, but receivers spin, so the 2C blocks of dispatch
and combine are launched cooperatively (all resident).

Transport: peers on my node must be NVLink-mapped (NVSHMEM's ``nvshmem_ptr``); peers on other
nodes are always reached by ``nvshmemx_uint8_put_nbi_warp`` + ``nvshmem_quiet`` +
``nvshmem_int_p``, even where one host could map them. So declaring a 4-GPU host as 2 nodes x 2
GPUs (``NUMBA_EP_GPUS_PER_NODE=2``) runs the network code path on one machine; NVSHMEM then
carries the puts over NVLink, as copies by the calling warp. Only a put that a NIC may carry
(some rank of another node unmapped: ``nic_fence_needed``) needs its source fenced at system
scope first; the kernels are specialised on that (``nic_fence``), so one host runs them without
the per-record fence.
"""
from __future__ import annotations

import functools

import numpy as np

from numba import cuda, float32, int32, int64, uint32, uint64

from numba_ep.interop import address
from numba_ep.kernels import ptx
from numba_ep.kernels.intranode import _align, add_row, channel_range, copy_row
from numba_ep.kernels.waits import KERNEL_IDS, record_timeout, timed_out

THREADS = 512               # 16 warps per block
WARPS = THREADS // 32
MAX_CHANNELS = 64           # flag arrays are sized for this many channels
MAX_LOCAL_EXPERTS = 1024
MAX_GPUS_PER_NODE = 32      # a node's GPUs fit in one warp (ballots, lane-per-GPU loads)
UNROLL = 8                  # 16-byte loads in flight per lane in row copies
ACC_UNROLL = 4              # ... and per source row in combine's sums (registers: 48 a lane)
FULL = 0xFFFFFFFF

_NOTIFY = KERNEL_IDS["internode_notify"]
_DISPATCH = KERNEL_IDS["internode_dispatch"]
_COMBINE = KERNEL_IDS["internode_combine"]
_SYNC = KERNEL_IDS["internode_sync"]


# ---------------------------------------------------------------------------------------------
# Layout: the one place that computes byte offsets (host side, and constants of the kernels)
# ---------------------------------------------------------------------------------------------

#: int32 words of a meta slot: T, two [MAX_CHANNELS] count rows, one count per local expert
META_WORDS = (1 + 2 * MAX_CHANNELS + MAX_LOCAL_EXPERTS + 3) // 4 * 4


@functools.lru_cache(maxsize=64)
def header(num_ranks, num_nodes):
    """Byte offsets of the header: a dict with meta_flag, sync_flag, disp_flag, comb_flag,
    staged, pub, meta_in, meta_out and bytes (the header's size, a multiple of 128)."""
    R, N = num_ranks, num_nodes
    off = {}
    pos = 0
    for name, words in (("meta_flag", R), ("sync_flag", R), ("disp_flag", N * MAX_CHANNELS),
                        ("comb_flag", N * MAX_CHANNELS), ("staged", 1),
                        ("pub", R * MAX_CHANNELS), ("meta_in", 2 * R * META_WORDS),
                        ("meta_out", R * META_WORDS)):
        pos = _align(pos, 16)
        off[name] = pos
        pos += 4 * words
    off["bytes"] = _align(pos)
    return off


def record_bytes(row_bytes, num_scales, num_topk, num_ranks):
    """Bytes of a dispatch record (see the module docstring)."""
    return _align(row_bytes + 4 * num_scales + 8 * num_topk + 4 * num_ranks, 16)


def combine_record_bytes(hidden, num_topk):
    """Bytes of a combine row: BF16 values then float32 weights, padded to 16 bytes."""
    return _align(2 * hidden + 4 * num_topk, 16)


def dispatch_offsets(num_ranks, num_nodes, max_tokens, rec):
    """``(send, recv, total)`` byte offsets of a dispatch with ``max_tokens`` = Tm."""
    send = header(num_ranks, num_nodes)["bytes"]
    recv = send + _align(max_tokens * rec)
    return send, recv, recv + _align(num_nodes * max_tokens * rec)


def combine_offsets(num_ranks, num_nodes, max_tokens, crec, num_recv):
    """``(csend, cred, cstage, total)`` byte offsets of a combine."""
    csend = header(num_ranks, num_nodes)["bytes"]
    cred = csend + _align(num_nodes * max_tokens * crec)
    cstage = cred + _align(num_nodes * max_tokens * crec)
    return csend, cred, cstage, cstage + _align(num_recv * crec)


def rdma_size_hint(num_max_tokens, hidden_bytes, num_ranks, num_gpus_per_node, num_topk=16):
    """Bytes of NVSHMEM buffer per rank that internode dispatch and combine need in the worst
    case: up to ``num_max_tokens`` tokens on every rank, rows of ``hidden_bytes`` (BF16: 2 *
    hidden), up to ``num_topk`` top-k slots, and every token sent to every rank. Real batches
    need less (a combine stages only the rows this rank received); every call checks its own
    need and names it when the buffer is too small."""
    R, G, T = int(num_ranks), int(num_gpus_per_node), int(num_max_tokens)
    N = R // G
    rec = record_bytes(hidden_bytes, hidden_bytes // 256, num_topk, R)  # scales: FP8 rows
    crec = combine_record_bytes(hidden_bytes // 2, num_topk)
    return max(dispatch_offsets(R, N, T, rec)[2], combine_offsets(R, N, T, crec, R * T)[3])


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@cuda.jit(device=True, inline=True)
def wait_epoch(addr, epoch, timeout_ns, err_addr, kernel_id, rank, peer, channel):
    """Spin (bounded) until the int32 at ``addr`` reaches ``epoch`` (acquire). False on
    timeout, after recording it."""
    start = ptx.globaltimer()
    seen = ptx.ld_acquire_sys_i32(addr)
    while seen < epoch:
        if timed_out(start, timeout_ns):
            record_timeout(err_addr, kernel_id, rank, peer, channel, epoch, seen,
                           int64(ptx.globaltimer() - start))
            return False
        seen = ptx.ld_acquire_sys_i32(addr)
    return True


def make_publish(num_nodes, num_gpus_per_node):
    """``publish(base, flags, node, gpu, c, epoch)``, called by every thread of a block once
    its puts and stores for channel ``c`` are issued: completes them (fence, barrier,
    ``nvshmem_quiet``), then sets word ``[node][c]`` of the flag array at byte offset ``flags``
    to ``epoch`` at GPU ``gpu`` of every node (thread n signals node n): a release store for my
    own node, ``nvshmem_int_p`` for the others. The sender of dispatch and the forwarder of
    combine end a channel with it."""
    import nvshmem.bindings.device.numba as nvb

    N, G = num_nodes, num_gpus_per_node

    @cuda.jit(device=True, inline=True)
    def publish(base, flags, node, gpu, c, epoch):
        tid = cuda.threadIdx.x
        ptx.fence_acq_rel_sys()
        cuda.syncthreads()
        if tid == 0:
            nvb.quiet()
        cuda.syncthreads()
        if tid < N:
            off = uint64(flags + 4 * (node * MAX_CHANNELS + c))
            if tid == node:
                ptx.fence_acq_rel_sys()
                ptx.st_release_sys_i32(base + off, epoch)
            else:
                nvb.int_p(ptx.ptr_i32(base + off), epoch, int32(tid * G + gpu))

    return publish


@cuda.jit(device=True, inline=True)
def _sum_weights(srcs, warp, num_sources, offset, lane):
    """Sum over the first ``num_sources`` rows of ``srcs[warp]`` (row addresses, 0 = absent) of
    the float32 at byte ``offset + 4 * lane`` of each: a combine's top-k weight ``lane``."""
    wsum = float32(0)
    for g in range(num_sources):
        sg = srcs[warp, g]
        if sg != 0:
            wsum += ptx.bitcast_u32_f32(ptx.ld_volatile_u32(sg + uint64(offset + 4 * lane)))
    return wsum


@cuda.jit(device=True, inline=True)
def _zero(acc):
    for u in range(ACC_UNROLL):
        for e in range(8):
            acc[u, e] = float32(0)


@cuda.jit(device=True, inline=True)
def _store_row(dst, acc, j0, h16):
    for u in range(ACC_UNROLL):
        j = j0 + 32 * u
        if j < h16:
            ptx.st_na_v4(dst + uint64(j * 16), ptx.cvt_bf16x2(acc[u, 0], acc[u, 1]),
                         ptx.cvt_bf16x2(acc[u, 2], acc[u, 3]),
                         ptx.cvt_bf16x2(acc[u, 4], acc[u, 5]),
                         ptx.cvt_bf16x2(acc[u, 6], acc[u, 7]))


@cuda.jit(device=True, inline=True)
def _excl(prefix_addr, i):
    """Exclusive prefix at ``i`` of an inclusive int32 prefix array."""
    if i == 0:
        return int32(0)
    return ptx.ptr_i32(prefix_addr)[i - 1]


# ---------------------------------------------------------------------------------------------
# notify
# ---------------------------------------------------------------------------------------------

NOTIFY_SIG = ("void(int32, uint64, uint64, uint64, uint64, int32, int32, int32, int32, uint64, "
              "uint64, uint64, uint64, uint64, uint64, uint64, int64, uint64)")


def make_notify(num_ranks, num_gpus_per_node, num_channels, num_experts):
    """Arguments: rank, peer table (uint64 [R]; 0 = other node), my symmetric base,
    is_token_in_rank (bool [T, R]), tokens per expert (int32 [E], or 0), T, expert alignment,
    epoch, meta half (0 or 1), then the outputs rdma_channel_prefix_matrix [N, C],
    gbl_channel_prefix_matrix [R, C],
    recv_rdma_channel_prefix_matrix [N, C], recv_rdma_rank_prefix_sum [N],
    recv_gbl_channel_prefix_matrix [R, C], recv_gbl_rank_prefix_sum [R] (int32), the host
    counters (mapped int32 [3 + L]), timeout_ns, err_addr."""
    import nvshmem.bindings.device.numba as nvb

    R, G, C, E = num_ranks, num_gpus_per_node, num_channels, num_experts
    N = R // G
    L = E // R
    W = 1 + 2 * C + L            # words of a meta slot in use
    hdr = header(R, N)
    META_IN, META_OUT, META_FLAG = hdr["meta_in"], hdr["meta_out"], hdr["meta_flag"]
    OFF_NODE, OFF_GBL, OFF_EXP = 1, 1 + C, 1 + 2 * C
    TARGETS = R + N
    NCOUNT = TARGETS * C

    def notify(rank, peers_addr, base, in_rank_addr, per_expert_addr, num_tokens, alignment,
               epoch, half, rdma_prefix_addr, gbl_prefix_addr, recv_rdma_prefix_addr,
               recv_rdma_sum_addr, recv_gbl_prefix_addr, recv_gbl_sum_addr, host_addr,
               timeout_ns, err_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        counts = cuda.shared.array(NCOUNT, int32)
        peers = ptx.ptr_u64(peers_addr)
        in_rank = ptx.ptr_u8(in_rank_addr)
        node = rank // G
        gpu = rank - node * G

        # 1. My tokens per (rank, channel) and (node, channel): a warp per pair.
        p = warp
        while p < TARGETS * C:
            tgt = p // C
            c = p - tgt * C
            t0, t1 = channel_range(num_tokens, C, c)
            n = int32(0)
            t = t0 + lane
            while t < t1:
                if tgt < R:
                    n += int32(in_rank[int64(t) * R + tgt])
                else:
                    hit = int32(0)
                    for g in range(G):
                        hit |= int32(in_rank[int64(t) * R + (tgt - R) * G + g])
                    n += hit
                t += 32
            for off in (16, 8, 4, 2, 1):
                n += cuda.shfl_down_sync(FULL, n, off)
            if lane == 0:
                counts[p] = n
            p += WARPS
        cuda.syncthreads()

        # 2. My meta for rank d (a warp per d) into meta_out[d], then into its meta_in[half][me].
        slot_in = uint64(META_IN + 4 * (half * R + rank) * META_WORDS)
        d = warp
        while d < R:
            out = base + uint64(META_OUT + 4 * d * META_WORDS)
            meta = ptx.ptr_i32(out)
            k = lane
            while k < W:
                v = int32(0)
                if k == 0:
                    v = num_tokens
                elif k < OFF_GBL:
                    v = counts[(R + d // G) * C + k - OFF_NODE]
                elif k < OFF_EXP:
                    v = counts[d * C + k - OFF_GBL]
                elif per_expert_addr != 0:
                    v = ptx.ptr_i32(per_expert_addr)[d * L + k - OFF_EXP]
                meta[k] = v
                k += 32
            ptx.fence_acq_rel_sys()
            cuda.syncwarp()
            p_d = base if d == rank else peers[d]
            if p_d != 0:
                dst = ptx.ptr_i32(p_d + slot_in)
                k = lane
                while k < W:
                    dst[k] = meta[k]
                    k += 32
            else:
                nvb.uint8_put_nbi_warp(ptx.ptr_u8(base + slot_in), ptx.ptr_u8(out),
                                       uint64(4 * W), int32(d))
            d += WARPS
        ptx.fence_acq_rel_sys()
        cuda.syncthreads()
        if tid == 0:
            nvb.quiet()
        cuda.syncthreads()
        if tid < R and tid != rank:
            p_d = peers[tid]
            off = uint64(META_FLAG + 4 * rank)
            if p_d != 0:
                ptx.fence_acq_rel_sys()
                ptx.st_relaxed_sys_i32(p_d + off, epoch)
            else:
                nvb.int_p(ptx.ptr_i32(base + off), epoch, int32(tid))

        # 3. Every rank's meta has landed.
        if tid < R and tid != rank:
            wait_epoch(base + uint64(META_FLAG + 4 * tid), epoch, timeout_ns, err_addr,
                       _NOTIFY, rank, tid, -1)
        ptx.fence_acq_rel_sys()
        cuda.syncthreads()

        # 4. The handle's prefix matrices (one thread per row).
        all_meta = base + uint64(META_IN + 4 * half * R * META_WORDS)
        r = tid
        while r < N + R + N + R:
            acc = int32(0)
            if r < N:              # rdma_channel_prefix_matrix[r]: mine to node r
                out = ptx.ptr_i32(rdma_prefix_addr)
                for c in range(C):
                    acc += counts[(R + r) * C + c]
                    out[r * C + c] = acc
            elif r < N + R:        # gbl_channel_prefix_matrix[d]: mine to rank d
                d = r - N
                out = ptx.ptr_i32(gbl_prefix_addr)
                for c in range(C):
                    acc += counts[d * C + c]
                    out[d * C + c] = acc
            elif r < N + R + N:    # recv_rdma_channel_prefix_matrix[a]: (a, gpu) to my node
                a = r - N - R
                src = ptx.ptr_i32(all_meta + uint64(4 * (a * G + gpu) * META_WORDS))
                out = ptx.ptr_i32(recv_rdma_prefix_addr)
                for c in range(C):
                    acc += src[OFF_NODE + c]
                    out[a * C + c] = acc
            else:                  # recv_gbl_channel_prefix_matrix[s] without the block start
                s = r - N - R - N
                src = ptx.ptr_i32(all_meta + uint64(4 * s * META_WORDS))
                out = ptx.ptr_i32(recv_gbl_prefix_addr)
                for c in range(C):
                    out[s * C + c] = acc
                    acc += src[OFF_GBL + c]
                ptx.ptr_i32(recv_gbl_sum_addr)[s] = acc   # the block size, for now
            r += THREADS
        host = ptx.ptr_i32(host_addr)
        e = tid
        while e < L and host_addr != 0:
            n = int32(0)
            if per_expert_addr != 0:
                for s in range(R):
                    n += ptx.ptr_i32(all_meta + uint64(4 * s * META_WORDS))[OFF_EXP + e]
                n = (n + alignment - 1) // alignment * alignment
            host[3 + e] = n
            e += THREADS
        cuda.syncthreads()
        if tid == 0:
            sums = ptx.ptr_i32(recv_gbl_sum_addr)
            starts = ptx.ptr_i32(recv_gbl_prefix_addr)
            acc = int32(0)
            for s in range(R):
                start = acc
                acc += sums[s]
                sums[s] = acc
                for c in range(C):
                    starts[s * C + c] += start
            rdma = ptx.ptr_i32(recv_rdma_sum_addr)
            rp = ptx.ptr_i32(recv_rdma_prefix_addr)
            racc = int32(0)
            for a in range(N):
                racc += rp[a * C + C - 1]
                rdma[a] = racc
            tmax = int32(0)
            for s in range(R):
                tmax = max(tmax, ptx.ptr_i32(all_meta + uint64(4 * s * META_WORDS))[0])
            if host_addr != 0:
                host[1] = racc
                host[2] = tmax
                ptx.fence_acq_rel_sys()
                ptx.st_release_sys_i32(host_addr, acc)

    return notify


# ---------------------------------------------------------------------------------------------
# sync: the barrier before a combine
# ---------------------------------------------------------------------------------------------

SYNC_SIG = "void(int32, uint64, uint64, int32, int64, uint64)"


def make_sync(num_ranks, num_gpus_per_node):
    """Arguments: rank, peer table, my symmetric base, epoch, timeout_ns, err_addr."""
    import nvshmem.bindings.device.numba as nvb

    R, N = num_ranks, num_ranks // num_gpus_per_node
    FLAG = header(R, N)["sync_flag"]

    def sync(rank, peers_addr, base, epoch, timeout_ns, err_addr):
        tid = cuda.threadIdx.x
        peers = ptx.ptr_u64(peers_addr)
        ptx.fence_acq_rel_sys()
        if tid < R and tid != rank:
            p_d = peers[tid]
            off = uint64(FLAG + 4 * rank)
            if p_d != 0:
                ptx.st_relaxed_sys_i32(p_d + off, epoch)
            else:
                nvb.int_p(ptx.ptr_i32(base + off), epoch, int32(tid))
            wait_epoch(base + uint64(FLAG + 4 * tid), epoch, timeout_ns, err_addr, _SYNC, rank,
                       tid, -1)
        ptx.fence_acq_rel_sys()

    return sync


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------

DISPATCH_SIG = ("void(int32, uint64, uint64, int32, int32, int64, int32, int32, uint64, uint64, "
                "int64, int64, uint64, uint64, uint64, uint64, uint64, uint64, uint64, uint64, "
                "uint64, uint64, uint64, uint64, uint64, int32, int64, uint64)")


def make_dispatch(num_ranks, num_gpus_per_node, num_channels, num_experts, row_bytes,
                  num_scales, num_topk, nic_fence=True):
    """Arguments: rank, peer table, my symmetric base, meta half, Tm, byte offset of the recv
    region, T, received rows, x (bytes [T, Hb]),
    x_scales (float32 [T, S] with element strides s0, s1, or 0), s0, s1, topk_idx (int64 [T, K]
    or 0), topk_weights (float32 [T, K] or 0), is_token_in_rank, rdma_channel_prefix_matrix,
    recv_rdma_rank_prefix_sum, recv_gbl_channel_prefix_matrix, outputs recv_x (bytes [N, Hb]),
    recv_x_scales (float32 [N, S] or 0), recv_topk_idx (int64 [N, K] or 0), recv_topk_weights
    (float32 [N, K] or 0), recv_src_meta (int32 [N, 2]), send_rdma_head (int32 [T, N_nodes]),
    send_nvl_head (int32 [N_rdma, G]), epoch, timeout_ns, err_addr."""
    import nvshmem.bindings.device.numba as nvb

    R, G, C, E, Hb, S, K = (num_ranks, num_gpus_per_node, num_channels, num_experts, row_bytes,
                            num_scales, num_topk)
    N = R // G
    L = E // R if E else 0
    hdr = header(R, N)
    DISP_FLAG, META_IN = hdr["disp_flag"], hdr["meta_in"]
    REC = record_bytes(Hb, S, K, R)
    SEND = dispatch_offsets(R, N, 0, REC)[0]
    OFF_S, OFF_K = Hb, Hb + 4 * S
    OFF_W, OFF_CNT = OFF_K + 4 * K, OFF_K + 8 * K
    OFF_NODE = 1                 # a meta slot's counts toward my node
    TARGETS = R + N
    publish = make_publish(N, G)

    def dispatch(rank, peers_addr, base, half, max_tokens, recv_off, num_tokens, num_recv,
                 x_addr, sc_addr, s0,
                 s1, topk_addr, w_addr, in_rank_addr, rdma_prefix_addr, recv_rdma_sum_addr,
                 recv_gbl_prefix_addr, out_x, out_sc, out_topk, out_w, out_meta, rdma_head_addr,
                 nvl_head_addr, epoch, timeout_ns, err_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        peers = ptx.ptr_u64(peers_addr)
        node = rank // G
        gpu = rank - node * G
        send_off = SEND
        all_meta = base + uint64(META_IN + 4 * half * R * META_WORDS)
        if cuda.blockIdx.x < C:
            # ---------------- sender of channel c ----------------
            c = cuda.blockIdx.x
            t0, t1 = channel_range(num_tokens, C, c)
            in_rank = ptx.ptr_u8(in_rank_addr)
            rdma_head = ptx.ptr_i32(rdma_head_addr)
            # 1. Counters: warp per target (a rank, or a node), ballots over 32 tokens at a time.
            tgt = warp
            while tgt < TARGETS:
                count = int32(0)
                tb = t0
                while tb < t1:
                    t = tb + lane
                    hit = False
                    if t < t1:
                        if tgt < R:
                            hit = in_rank[int64(t) * R + tgt] != 0
                        else:
                            for g in range(G):
                                if in_rank[int64(t) * R + (tgt - R) * G + g] != 0:
                                    hit = True
                    ballot = cuda.ballot_sync(FULL, hit)
                    v = int32(-1)
                    if hit:
                        v = count + int32(cuda.popc(ballot & ((uint32(1) << uint32(lane))
                                                              - uint32(1))))
                    if t < t1:
                        if tgt < R:
                            ptx.ptr_i32(base + uint64(send_off + int64(t) * REC + OFF_CNT))[
                                tgt] = v
                        else:
                            rdma_head[int64(t) * N + tgt - R] = v
                    count += int32(cuda.popc(ballot))
                    tb += 32
                tgt += WARPS
            cuda.syncthreads()
            # 2. Warp per token: the record into send[t], then to each node's forwarder.
            t = t0 + warp
            while t < t1:
                rec = base + uint64(send_off + int64(t) * REC)
                copy_row(rec, x_addr + uint64(int64(t) * Hb), Hb // 16, lane, True, UNROLL)
                sc = lane
                while sc < S:   # S = H / 128 may exceed a warp
                    ptx.ptr_u32(rec + uint64(OFF_S))[sc] = ptx.ptr_u32(sc_addr)[
                        int64(t) * s0 + int64(sc) * s1]
                    sc += 32
                if lane < K:
                    ptx.ptr_i32(rec + uint64(OFF_K))[lane] = int32(
                        ptx.ptr_i64(topk_addr)[int64(t) * K + lane])
                    w = float32(0)
                    if w_addr != 0:
                        w = ptx.ptr_f32(w_addr)[int64(t) * K + lane]
                    ptx.ptr_f32(rec + uint64(OFF_W))[lane] = w
                if nic_fence:   # a NIC may read the record: visible system-wide first
                    ptx.fence_acq_rel_sys()
                cuda.syncwarp()   # a put over NVLink: this warp's lanes read what others wrote
                for n in range(N):
                    head = rdma_head[int64(t) * N + n]
                    if head >= 0:
                        k = head
                        if c > 0:
                            k += ptx.ptr_i32(rdma_prefix_addr)[n * C + c - 1]
                        off = uint64(recv_off + (int64(node) * max_tokens + k) * REC)
                        if n == node:
                            copy_row(base + off, rec, REC // 16, lane, False, UNROLL)
                        else:
                            nvb.uint8_put_nbi_warp(ptx.ptr_u8(base + off), ptx.ptr_u8(rec),
                                                   uint64(REC), int32(n * G + gpu))
                t += WARPS
            # 3. Channel c delivered to every forwarder: quiet, then its flag.
            publish(base, DISP_FLAG, node, gpu, c, epoch)
        else:
            # ---------------- receiver of channel c ----------------
            c = cuda.blockIdx.x - C
            gbl_prefix = ptx.ptr_i32(recv_gbl_prefix_addr)
            for i in range(G):
                f = node * G + i
                fbase = base if f == rank else peers[f]
                for a in range(N):
                    s = a * G + i
                    node_counts = ptx.ptr_i32(all_meta + uint64(4 * (s * META_WORDS + OFF_NODE)))
                    q0 = int32(0)
                    for cc in range(c):
                        q0 += node_counts[cc]
                    q1 = q0 + node_counts[c]
                    if tid == 0:
                        wait_epoch(fbase + uint64(DISP_FLAG + 4 * (a * MAX_CHANNELS + c)), epoch,
                                   timeout_ns, err_addr, _DISPATCH, rank, s, c)
                    cuda.syncthreads()
                    row0 = gbl_prefix[s * C + c]
                    q = q0 + warp
                    while q < q1:
                        rec = fbase + uint64(recv_off + (int64(a) * max_tokens + q) * REC)
                        cnt_lane = int32(-1)
                        if lane < G:
                            cnt_lane = ptx.ld_volatile_i32(rec + uint64(OFF_CNT + 4 * (node * G
                                                                                      + lane)))
                        mask = cuda.ballot_sync(FULL, cnt_lane >= 0)
                        if f == rank and lane < G:   # I am the forwarder of this record
                            r = _excl(recv_rdma_sum_addr, a) + q
                            ptx.ptr_i32(nvl_head_addr)[int64(r) * G + lane] = cnt_lane
                        cnt = cuda.shfl_sync(FULL, cnt_lane, gpu)
                        row = row0 + cnt
                        if cnt >= 0 and row < num_recv:
                            copy_row(out_x + uint64(int64(row) * Hb), rec, Hb // 16, lane, True,
                                     UNROLL)
                            sc = lane   # (not i: that is the forwarder loop's index)
                            while sc < S:
                                ptx.ptr_u32(out_sc)[int64(row) * S + sc] = ptx.ld_volatile_u32(
                                    rec + uint64(OFF_S + 4 * sc))
                                sc += 32
                            if lane < K and out_topk != 0:
                                e = ptx.ld_volatile_i32(rec + uint64(OFF_K + 4 * lane))
                                le = int64(-1)
                                if e >= rank * L and e < (rank + 1) * L:
                                    le = int64(e - rank * L)
                                ptx.ptr_i64(out_topk)[int64(row) * K + lane] = le
                                if out_w != 0:
                                    w = ptx.bitcast_u32_f32(ptx.ld_volatile_u32(
                                        rec + uint64(OFF_W + 4 * lane)))
                                    ptx.ptr_f32(out_w)[int64(row) * K + lane] = (
                                        w if le >= 0 else float32(0))
                            if lane == 0:
                                ptx.ptr_i32(out_meta)[int64(row) * 2] = a
                                ptx.ptr_i32(out_meta)[int64(row) * 2 + 1] = int32(mask)
                        q += WARPS
                    cuda.syncthreads()

    return dispatch


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------

COMBINE_SIG = ("void(int32, uint64, uint64, int32, int64, int64, int32, int32, uint64, uint64, "
               "uint64, uint64, uint64, uint64, uint64, uint64, uint64, uint64, uint64, uint64, "
               "uint64, int32, int64, uint64)")


def make_combine(num_ranks, num_gpus_per_node, num_channels, hidden, num_topk,
                 nic_fence=True):
    """Arguments: rank, peer table, my symmetric base, Tm, byte offsets of cred and cstage, T,
    received rows, x (bf16 [N, H]),
    topk_weights (float32 [N, K] or 0), the handle's rdma_channel_prefix_matrix,
    recv_rdma_channel_prefix_matrix, recv_rdma_rank_prefix_sum, recv_gbl_channel_prefix_matrix,
    send_rdma_head, send_nvl_head, bias0, bias1 (bf16 [T, H] or 0), out (bf16 [T, H]),
    out_topk_weights (float32 [T, K] or 0), workspace (int32 [1 + MAX_CHANNELS], zero), epoch,
    timeout_ns, err_addr."""
    import nvshmem.bindings.device.numba as nvb

    R, G, C, H, K = num_ranks, num_gpus_per_node, num_channels, hidden, num_topk
    N = R // G
    hdr = header(R, N)
    COMB_FLAG, STAGED, PUB = hdr["comb_flag"], hdr["staged"], hdr["pub"]
    CREC = combine_record_bytes(H, K)
    CSEND = hdr["bytes"]
    H16 = 2 * H // 16
    publish = make_publish(N, G)

    def combine(rank, peers_addr, base, max_tokens, cred_off, cstage_off, num_tokens, num_recv,
                x_addr, w_addr,
                rdma_prefix_addr, recv_rdma_prefix_addr, recv_rdma_sum_addr, recv_gbl_prefix_addr,
                rdma_head_addr, nvl_head_addr, bias0_addr, bias1_addr, out_addr, out_w_addr,
                ws_addr, epoch, timeout_ns, err_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        last = cuda.shared.array(2, int32)
        srcs = cuda.shared.array((WARPS, MAX_GPUS_PER_NODE), uint64)
        acc = cuda.local.array((ACC_UNROLL, 8), float32)
        vals = cuda.local.array((ACC_UNROLL, 4), uint32)
        peers = ptx.ptr_u64(peers_addr)
        node = rank // G
        gpu = rank - node * G
        csend_off = CSEND

        # 1. Every block: stage my input rows (and weights) where my node's forwarders read them.
        row = cuda.blockIdx.x * WARPS + warp
        while row < num_recv:
            dst = base + uint64(cstage_off + int64(row) * CREC)
            copy_row(dst, x_addr + uint64(int64(row) * 2 * H), H16, lane, True, UNROLL)
            if lane < K:
                w = float32(0)
                if w_addr != 0:
                    w = ptx.ptr_f32(w_addr)[int64(row) * K + lane]
                ptx.ptr_f32(dst + uint64(2 * H))[lane] = w
            row += cuda.gridDim.x * WARPS
        if cuda.blockIdx.x == 0:
            i = tid
            while i < R * C:
                s = i // C
                ptx.ptr_i32(base + uint64(PUB + 4 * (s * MAX_CHANNELS + i - s * C)))[0] = \
                    ptx.ptr_i32(recv_gbl_prefix_addr)[i]
                i += THREADS
        ptx.fence_acq_rel_sys()
        cuda.syncthreads()
        if tid == 0:
            ptx.fence_acq_rel_sys()
            done = ptx.atomic_add_gpu_i32(ws_addr, 1)
            last[0] = 1 if done == cuda.gridDim.x - 1 else 0
        cuda.syncthreads()
        if last[0] != 0 and tid == 0:
            ptx.ptr_i32(ws_addr)[0] = 0
            ptx.fence_acq_rel_sys()
            ptx.st_release_sys_i32(base + uint64(STAGED), epoch)

        # Blocks c and c + C share channel c: half h of it takes every other warp-step of
        # tokens, first as forwarder, then as source, so all 2C blocks reduce.
        c = cuda.blockIdx.x % C
        h = cuda.blockIdx.x // C
        step = 2 * WARPS
        # ---------------- forwarder of channel c, half h ----------------
        if tid < G:
            p = base if tid == gpu else peers[node * G + tid]
            wait_epoch(p + uint64(STAGED), epoch, timeout_ns, err_addr, _COMBINE, rank,
                       node * G + tid, c)
        cuda.syncthreads()
        nvl_head = ptx.ptr_i32(nvl_head_addr)
        for a in range(N):
            s = a * G + gpu
            r_base = _excl(recv_rdma_sum_addr, a)
            k0 = int32(0)
            if c > 0:
                k0 = ptx.ptr_i32(recv_rdma_prefix_addr)[a * C + c - 1]
            k1 = ptx.ptr_i32(recv_rdma_prefix_addr)[a * C + c]
            k = k0 + h * WARPS + warp
            while k < k1:
                r = r_base + k
                # Where each GPU of my node holds this token (0: it does not).
                if lane < G:
                    head = nvl_head[int64(r) * G + lane]
                    src = uint64(0)
                    if head >= 0:
                        p = base if lane == gpu else peers[node * G + lane]
                        start = ptx.ld_volatile_i32(p + uint64(PUB + 4 * (s * MAX_CHANNELS + c)))
                        src = p + uint64(cstage_off + int64(start + head) * CREC)
                    srcs[warp, lane] = src
                cuda.syncwarp()
                if a == node:   # the source is me: straight into my cred
                    dst = base + uint64(cred_off + (int64(node) * max_tokens + k) * CREC)
                else:
                    dst = base + uint64(csend_off + (int64(a) * max_tokens + k) * CREC)
                j0 = lane
                while j0 < H16:
                    _zero(acc)
                    for g in range(G):
                        sg = srcs[warp, g]
                        if sg != 0:
                            add_row(acc, vals, sg, j0, H16, True, ACC_UNROLL)
                    _store_row(dst, acc, j0, H16)
                    j0 += 32 * ACC_UNROLL
                if lane < K:
                    ptx.ptr_f32(dst + uint64(2 * H))[lane] = _sum_weights(srcs, warp, G, 2 * H,
                                                                          lane)
                if a != node:
                    if nic_fence:   # a NIC may read the partial: visible system-wide first
                        ptx.fence_acq_rel_sys()
                    cuda.syncwarp()
                    nvb.uint8_put_nbi_warp(
                        ptx.ptr_u8(base + uint64(cred_off + (int64(node) * max_tokens + k)
                                                 * CREC)),
                        ptx.ptr_u8(dst), uint64(CREC), int32(s))
                cuda.syncwarp()
                k += step
        # The second half to finish publishes the channel: its quiet completes this PE's puts,
        # the other half's too (issued before that half's fenced count).
        ptx.fence_acq_rel_sys()
        cuda.syncthreads()
        if tid == 0:
            done = ptx.atomic_add_gpu_i32(ws_addr + uint64(4 * (1 + c)), 1)
            last[1] = 1 if done == 1 else 0
            if done == 1:
                ptx.ptr_i32(ws_addr)[1 + c] = 0
        cuda.syncthreads()
        if last[1] != 0:
            publish(base, COMB_FLAG, node, gpu, c, epoch)

        # ---------------- source of channel c, half h: my tokens ----------------
        if tid < N:
            wait_epoch(base + uint64(COMB_FLAG + 4 * (tid * MAX_CHANNELS + c)), epoch,
                       timeout_ns, err_addr, _COMBINE, rank, tid * G + gpu, c)
        cuda.syncthreads()
        t0, t1 = channel_range(num_tokens, C, c)
        rdma_head = ptx.ptr_i32(rdma_head_addr)
        t = t0 + h * WARPS + warp
        while t < t1:
            if lane < N:
                head = rdma_head[int64(t) * N + lane]
                src = uint64(0)
                if head >= 0:
                    k = head
                    if c > 0:
                        k += ptx.ptr_i32(rdma_prefix_addr)[lane * C + c - 1]
                    src = base + uint64(cred_off + (int64(lane) * max_tokens + k) * CREC)
                srcs[warp, lane] = src
            cuda.syncwarp()
            row_off = uint64(int64(t) * H16 * 16)
            j0 = lane
            while j0 < H16:
                _zero(acc)
                if bias0_addr != 0:
                    add_row(acc, vals, bias0_addr + row_off, j0, H16, True, ACC_UNROLL)
                if bias1_addr != 0:
                    add_row(acc, vals, bias1_addr + row_off, j0, H16, True, ACC_UNROLL)
                for n in range(N):
                    sn = srcs[warp, n]
                    if sn != 0:
                        add_row(acc, vals, sn, j0, H16, False, ACC_UNROLL)
                _store_row(out_addr + row_off, acc, j0, H16)
                j0 += 32 * ACC_UNROLL
            if lane < K and out_w_addr != 0:
                ptx.ptr_f32(out_w_addr)[int64(t) * K + lane] = _sum_weights(srcs, warp, N,
                                                                            2 * H, lane)
            cuda.syncwarp()
            t += step

    return combine


# ---------------------------------------------------------------------------------------------
# Kernel specifications: the one place that turns sizes into compile-time constants
# (``(factory, signature, get_kernel keywords)``, as in intranode.py), memoised: launchers ask for
# them on every call.
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def notify_spec(num_ranks, num_gpus_per_node, num_channels, num_experts):
    return (make_notify, NOTIFY_SIG,
            dict(num_ranks=num_ranks, num_gpus_per_node=num_gpus_per_node,
                 num_channels=num_channels, num_experts=num_experts))


@functools.lru_cache(maxsize=256)
def sync_spec(num_ranks, num_gpus_per_node):
    return (make_sync, SYNC_SIG, dict(num_ranks=num_ranks, num_gpus_per_node=num_gpus_per_node))


@functools.lru_cache(maxsize=256)
def dispatch_spec(num_ranks, num_gpus_per_node, num_channels, num_experts, row_bytes,
                  num_scales, num_topk, nic_fence=True):
    """``nic_fence``: some rank of another node is not NVLink-mapped (``nic_fence_needed``)."""
    return (make_dispatch, DISPATCH_SIG,
            dict(launch_bounds=(THREADS, 1), num_ranks=num_ranks,
                 num_gpus_per_node=num_gpus_per_node, num_channels=num_channels,
                 num_experts=num_experts, row_bytes=row_bytes, num_scales=num_scales,
                 num_topk=num_topk, nic_fence=bool(nic_fence)))


@functools.lru_cache(maxsize=256)
def combine_spec(num_ranks, num_gpus_per_node, num_channels, hidden, num_topk, nic_fence=True):
    """``nic_fence`` as in ``dispatch_spec``."""
    return (make_combine, COMBINE_SIG,
            dict(launch_bounds=(THREADS, 1), num_ranks=num_ranks,
                 num_gpus_per_node=num_gpus_per_node, num_channels=num_channels, hidden=hidden,
                 num_topk=num_topk, nic_fence=bool(nic_fence)))


def _get(spec):
    from numba_ep.launch import get_kernel

    factory, sig, kwargs = spec
    return get_kernel(factory, sig, **kwargs)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

def node_peer_table(peer_ptrs, rank, num_gpus_per_node):
    """The kernels' peer table: the NVLink-mapped address of each rank on my node (my own
    included), 0 for every rank on another node (reached by NVSHMEM puts, even when mapped).
    RuntimeError if a rank of my node is not mapped."""
    G = int(num_gpus_per_node)
    table = []
    for r, p in enumerate(int(v) for v in peer_ptrs):
        if r // G != rank // G:
            p = 0
        elif p == 0:
            raise RuntimeError(f"internode mode: rank {r} is on this rank's node (GPUs per node: "
                               f"{G}) but NVSHMEM does not map its buffer over NVLink; the ranks "
                               f"of a node must share NVLink")
        table.append(p)
    return table


def nic_fence_needed(peer_ptrs, rank, num_gpus_per_node) -> bool:
    """Whether this rank's puts to other nodes may be carried by a NIC: True when NVSHMEM maps
    some rank of another node over no NVLink (``peer_ptrs`` entry 0). A NIC reads the source
    of a put from memory, so the warp that wrote it fences at system scope first; a put to a
    mapped rank is a copy by the warp itself (its loads follow the other lanes' stores after a
    ``syncwarp``), and one fence per record per warp was a full NVLink round trip each."""
    G = int(num_gpus_per_node)
    return any(int(p) == 0 for r, p in enumerate(peer_ptrs) if r // G != rank // G)


class InternodeContext:
    """What every internode launch needs: the symmetric buffer, the peer table (my node's
    NVLink-mapped addresses, 0 for every other node), the epoch counter, the error record, the
    host-mapped counters notify fills (int32 [3 + MAX_LOCAL_EXPERTS]) and the combine
    workspace.

    Args:
        sym_buffer: a ``numba_ep.memory.SymmetricBuffer`` (``ptr``, ``nbytes``, ``peer_ptrs``).
        rank, num_ranks, num_gpus_per_node: this rank, R, and G (``R % G == 0``, ``G <= 32``).
        timeout_s: bound of every wait (None: env ``NUMBA_EP_TIMEOUT_S`` or 100 s).
    """

    def __init__(self, sym_buffer, rank, num_ranks, num_gpus_per_node, timeout_s=None):
        import cupy

        from numba_ep.kernels.waits import error_record, mapped_host_array, timeout_ns

        R, G = int(num_ranks), int(num_gpus_per_node)
        if G < 1 or R % G or G > MAX_GPUS_PER_NODE or R // G > MAX_GPUS_PER_NODE:
            raise ValueError(f"num_gpus_per_node: expected a divisor of the rank count {R} in "
                             f"1..{MAX_GPUS_PER_NODE}, with at most {MAX_GPUS_PER_NODE} nodes, "
                             f"got {G}")
        peers = node_peer_table(sym_buffer.peer_ptrs, rank, G)
        #: whether puts to other nodes fence their source first (``nic_fence_needed``)
        self.nic_fence = nic_fence_needed(sym_buffer.peer_ptrs, rank, G)
        self.buffer = sym_buffer
        self.base = int(sym_buffer.ptr)
        self.rank, self.num_ranks, self.num_gpus_per_node = int(rank), R, G
        self.num_nodes = R // G
        self.peers = cupy.asarray(np.asarray(peers, dtype=np.uint64))
        self.epoch = 0
        #: meta_in half of the last notify (alternates call by call)
        self.half = 1
        self.timeout_s = timeout_s
        self.timeout_ns = timeout_ns(timeout_s)
        self.errors = error_record()
        self._counters_mem, self.counters, self.counters_dev = mapped_host_array(
            3 + MAX_LOCAL_EXPERTS, np.int32)
        #: [0]: combine's staging counter; [1 + c]: halves of channel c done forwarding
        self.workspace = cupy.zeros(1 + MAX_CHANNELS, dtype=np.int32)

    def next_epoch(self) -> int:
        self.epoch += 1
        if self.epoch >= 2**31 - 1:
            raise RuntimeError("internode mode: 2**31 collective calls on one Buffer")
        return self.epoch

    def need(self, nbytes, what):
        if nbytes > int(self.buffer.nbytes):
            raise ValueError(f"num_rdma_bytes: internode {what} needs {nbytes} bytes of NVSHMEM "
                             f"buffer per rank (regions sized for the whole batch, see "
                             f"numba_ep.kernels.internode), the buffer has "
                             f"{int(self.buffer.nbytes)}")


def _addr(a) -> int:
    return 0 if a is None else address(a)


def notify(ctx, is_token_in_rank, num_tokens_per_expert, num_experts, num_channels,
           expert_alignment, stream, counts=True):
    """Enqueue notify (collective). Returns the six prefix items of the handle, CuPy int32:
    ``(rdma_channel_prefix_matrix [N, C], gbl_channel_prefix_matrix [R, C],
    recv_rdma_channel_prefix_matrix [N, C], recv_rdma_rank_prefix_sum [N],
    recv_gbl_channel_prefix_matrix [R, C], recv_gbl_rank_prefix_sum [R])``, filled when the
    kernel runs; ``wait_counts`` then gives the sizes. ``num_tokens_per_expert`` may be None
    (a cached dispatch): the per-expert counts are then zeros. ``counts=False`` (a cached
    dispatch, whose sizes the host knows from the handle): the host counters are not written, so
    a notify still queued cannot overwrite the counters of a later one."""
    import cupy

    R, G, N, C = ctx.num_ranks, ctx.num_gpus_per_node, ctx.num_nodes, num_channels
    E = int(num_experts or 0)
    if not 1 <= C <= MAX_CHANNELS:
        raise ValueError(f"config: internode mode supports 1..{MAX_CHANNELS} channels, got {C}")
    if E // R > MAX_LOCAL_EXPERTS:
        raise ValueError(f"num_experts: at most {MAX_LOCAL_EXPERTS} experts per rank, got {E // R}")
    T = is_token_in_rank.shape[0]
    ctx.need(header(R, N)["bytes"], "notify")
    ctx.half = 1 - ctx.half
    outs = (cupy.empty((N, C), np.int32), cupy.empty((R, C), np.int32),
            cupy.empty((N, C), np.int32), cupy.empty((N,), np.int32),
            cupy.empty((R, C), np.int32), cupy.empty((R,), np.int32))
    if counts:
        ctx.counters[: 3 + E // R] = -1
    k = _get(notify_spec(R, G, C, E))
    k.launch(1, THREADS, ctx.rank, _addr(ctx.peers), ctx.base, _addr(is_token_in_rank),
             _addr(num_tokens_per_expert), T, int(expert_alignment), ctx.next_epoch(), ctx.half,
             *(_addr(o) for o in outs), ctx.counters_dev if counts else 0, ctx.timeout_ns,
             ctx.errors.device_address, stream=stream)
    return outs


def wait_counts(ctx, num_local_experts):
    """Busy-wait (host) until notify has published the counts. Returns ``(num_recv_tokens,
    num_rdma_recv_tokens, max_tokens, rows per local expert (list))``; raises CommTimeoutError
    when a kernel recorded a timeout or nothing arrived in time."""
    from numba_ep.kernels.waits import wait_host_count

    wait_host_count(ctx, "internode_notify")
    c = ctx.counters
    return (int(c[0]), int(c[1]), int(c[2]),
            [int(v) for v in c[3: 3 + num_local_experts]])


def dispatch(ctx, x_bytes, x_scales, topk_idx, topk_weights, is_token_in_rank, prefixes,
             max_tokens, num_experts, num_channels, recv_x_bytes, recv_x_scales, recv_topk_idx,
             recv_topk_weights, recv_src_meta, send_rdma_head, send_nvl_head, stream):
    """Enqueue the dispatch kernel after ``notify`` (whose ``prefixes`` it reads).

    ``x_bytes`` [T, Hb] uint8 (Hb % 16 == 0); ``x_scales`` float32-sized [T, S] with any
    strides, or None; ``topk_idx`` int64 / ``topk_weights`` float32 [T, K] or None; outputs
    ``recv_x_bytes`` [N, Hb], ``recv_x_scales`` [N, S], ``recv_topk_idx`` int64 [N, K],
    ``recv_topk_weights`` float32 [N, K], ``recv_src_meta`` int32 [N, 2], ``send_rdma_head`` int32
    [T, N_nodes], ``send_nvl_head`` int32 [N_rdma, G]."""
    R, G, N, C = ctx.num_ranks, ctx.num_gpus_per_node, ctx.num_nodes, num_channels
    E = int(num_experts or 0)
    T, Hb = x_bytes.shape[0], x_bytes.shape[1]
    K = 0 if topk_idx is None else topk_idx.shape[1]
    S = 0 if x_scales is None else x_scales.shape[1]
    rec = record_bytes(Hb, S, K, R)
    _, recv_off, total = dispatch_offsets(R, N, max_tokens, rec)
    ctx.need(total, "dispatch")
    s0, s1 = (0, 0) if x_scales is None else tuple(st // 4 for st in x_scales.strides)
    rdma_prefix, _, _, recv_rdma_sum, recv_gbl_prefix, _ = prefixes
    k = _get(dispatch_spec(R, G, C, E, Hb, S, K, ctx.nic_fence))
    k.launch(2 * C, THREADS, ctx.rank, _addr(ctx.peers), ctx.base, ctx.half, max_tokens,
             recv_off, T, recv_x_bytes.shape[0], _addr(x_bytes), _addr(x_scales), s0, s1,
             _addr(topk_idx), _addr(topk_weights), _addr(is_token_in_rank), _addr(rdma_prefix),
             _addr(recv_rdma_sum), _addr(recv_gbl_prefix), _addr(recv_x_bytes),
             _addr(recv_x_scales), _addr(recv_topk_idx), _addr(recv_topk_weights),
             _addr(recv_src_meta), _addr(send_rdma_head), _addr(send_nvl_head), ctx.epoch,
             ctx.timeout_ns, ctx.errors.device_address, stream=stream, cooperative=True)


def combine(ctx, x_bf16, topk_weights, handle, max_tokens, bias0, bias1, out, out_topk_weights,
            num_channels, stream):
    """Enqueue the barrier and the combine kernel (collective).

    ``x_bf16`` [N, H] and ``out`` [T, H] uint16 views of bf16 data; ``topk_weights`` float32
    [N, K] or None; biases uint16 [T, H] or None; ``handle`` a dict of the handle's items (device
    arrays); ``max_tokens`` the dispatch's Tm."""
    R, G, N, C = ctx.num_ranks, ctx.num_gpus_per_node, ctx.num_nodes, num_channels
    num_recv, H = x_bf16.shape
    T = out.shape[0]
    K = 0 if topk_weights is None else topk_weights.shape[1]
    crec = combine_record_bytes(H, K)
    _, cred_off, cstage_off, total = combine_offsets(R, N, max_tokens, crec, num_recv)
    ctx.need(total, "combine")
    _get(sync_spec(R, G)).launch(1, 32 * ((R + 31) // 32), ctx.rank, _addr(ctx.peers), ctx.base,
                                 ctx.next_epoch(), ctx.timeout_ns, ctx.errors.device_address,
                                 stream=stream)
    k = _get(combine_spec(R, G, C, H, K, ctx.nic_fence))
    k.launch(2 * C, THREADS, ctx.rank, _addr(ctx.peers), ctx.base, max_tokens, cred_off,
             cstage_off, T, num_recv, _addr(x_bf16), _addr(topk_weights),
             _addr(handle["rdma_channel_prefix_matrix"]),
             _addr(handle["recv_rdma_channel_prefix_matrix"]),
             _addr(handle["recv_rdma_rank_prefix_sum"]),
             _addr(handle["recv_gbl_channel_prefix_matrix"]), _addr(handle["send_rdma_head"]),
             _addr(handle["send_nvl_head"]), _addr(bias0), _addr(bias1), _addr(out),
             _addr(out_topk_weights), _addr(ctx.workspace), ctx.next_epoch(), ctx.timeout_ns,
             ctx.errors.device_address, stream=stream, cooperative=True)
