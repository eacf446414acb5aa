"""Intranode normal mode: notify, dispatch and combine over NVLink buffers shared by CUDA IPC.

Terms: R ranks (one GPU each), C channels (= num_sms / 2), T tokens on this rank, N ring slots per
(channel, peer), Hb row bytes of x (any dtype, a multiple of 16), K top-k slots, S scales per token,
L local experts per rank. A token's channel is the contiguous block of ceil(T/C) tokens it falls in.

Every rank's IPC buffer (numba_ep.memory.IpcBuffer) holds, in int32 words unless said otherwise:

    header  rank_counts   [R][R]      row s = num_tokens_per_rank of rank s          (written by s)
            chan_counts   [R][C]      [s][c] = tokens rank s sends me in channel c   (written by s)
            expert_counts [R][1024]   [s][i] = (token, slot) pairs from s for my expert i (by s)
            tail          [C][R]      [c][s] = slots rank s has published into ring (c, s)  (by s)
            head          [C][R]      [c][d] = slots rank d has consumed of ring (c, me->d) (by d)
    rings   x      [C][R][N][Hb bytes]   ring (c, s): rows sent to me by rank s in channel c
            src    [C][R][N]             token index at the sender
            topk   [C][R][N][K]          local expert ids (-1 elsewhere)
            weight [C][R][N][K] float32
            scales [C][R][N][S] float32

Data and tails live with the receiver, heads with the sender: every rank *writes* remote memory
and *polls* its own, so no spin-wait crosses NVLink.

Who waits on whom:

    notify_dispatch (1 block)   barrier; write my counts into every peer's header; zero my
                                tail/head; barrier; read my header -> prefix matrices and the
                                host-mapped counters the host waits on to size the outputs.
    cached_notify (1 block)     barrier; zero my tail/head; barrier.  (before cached dispatch and
                                before every combine)
    dispatch (2C blocks)        block 2c = sender of channel c, block 2c+1 = receiver. Sender
                                warps form R groups, group g serving peer g. A sender group looks
                                at 32 tokens at a time (one per lane, ballot), waits until ring
                                (c, me->g) has room (polls its local head), copies the selected
                                rows into g's ring, then publishes g's tail with a release store.
                                Rows for my own rank skip the ring and go straight into recv_x.
                                Receiver warps form R-1 groups, one per remote source s: a group
                                acquires the tail of ring (c, s->me), copies the new rows into
                                recv_x (non-coherent loads, which never allocate in L1, so no
                                stale line can be hit), and writes its head into s's buffer.
    combine (2C blocks)         the reverse: R-1 sender groups, group for rank g pushing my rows
                                that came from g in channel c into ring (c, me->g) of rank g
                                (my own rows stay where they are); the receiver block
                                walks its own tokens in order, waits until every rank that holds a
                                copy has published it (send_head gives the slot), sums the rows
                                (fp32, plus bias) and frees slots batch by batch.

All waits are bounded (numba_ep.kernels.waits). The dispatch and combine kernels need all their
blocks resident at once (senders and receivers wait on each other), so they are launched
cooperatively.

Byte budget (EP2, 4096 tokens x 7168 BF16, top-8 of 256): each rank receives ~8160 rows (117 MB
logical); half of them are its own and are copied HBM->HBM by the sender, the other half (59 MB)
cross NVLink once, land in the ring and are copied again HBM->HBM by the receiver. At ~350 GB/s of
NVLink stores the remote half alone takes ~170 us: that is the floor this design can reach.
"""
from __future__ import annotations

import functools

import numpy as np

from numba import cuda, float32, int32, int64, uint32, uint64

from numba_ep.interop import address
from numba_ep.kernels import ptx
from numba_ep.kernels.barrier import barrier_block
from numba_ep.kernels.waits import KERNEL_IDS, record_timeout, timed_out

THREADS = 768               # 24 warps per block
WARPS = THREADS // 32
MAX_LOCAL_EXPERTS = 1024
MAX_RANKS = 8
MIN_RECV_SLOTS = 64         # combine: a sender batch (32) plus a receiver batch (<= 32) in flight
NOTIFY_THREADS = 512

#: Compile-time choices of the dispatch and combine kernels, swept by scripts/sweep_intranode.py;
#: the defaults are the fastest measured (notes/perf.md). ``ring_nc``: receivers read ring slots
#: through the non-coherent path (after acquiring the tail) rather than with volatile loads.
#: ``unroll``: 16-byte loads in flight per lane in row copies (4 or 8).
TUNING = {"ring_nc": True, "unroll": 8}

_NOTIFY = KERNEL_IDS["notify_dispatch"]
_CACHED = KERNEL_IDS["cached_notify"]
_DISPATCH = KERNEL_IDS["dispatch"]
_COMBINE = KERNEL_IDS["combine"]


# ---------------------------------------------------------------------------------------------
# Buffer layout: the one place that knows where everything lives in an IPC buffer.
# ---------------------------------------------------------------------------------------------

def _align(n, a=128):
    return (n + a - 1) // a * a


class RingLayout:
    """Byte offsets of the header and rings described in the module docstring."""

    def __init__(self, num_ranks, num_channels, num_recv_slots, row_bytes, num_topk, num_scales):
        R, C, N = num_ranks, num_channels, num_recv_slots
        if row_bytes % 16:
            raise ValueError(f"hidden: a row must be a whole number of 16-byte vectors, got "
                             f"{row_bytes} bytes")
        self.R, self.C, self.N, self.row_bytes = R, C, N, row_bytes
        self.K, self.S = num_topk, num_scales
        o = 0
        self.rank_counts = o; o += R * R * 4
        self.chan_counts = o; o += R * C * 4
        self.expert_counts = o; o += R * MAX_LOCAL_EXPERTS * 4
        self.tail = o; o += C * R * 4
        self.head = o; o += C * R * 4
        o = _align(o)
        self.header_bytes = o
        slots = C * R * N
        self.x = o; o = _align(o + slots * row_bytes)
        self.src = o; o = _align(o + slots * 4)
        self.topk = o; o = _align(o + slots * num_topk * 4)
        self.weight = o; o = _align(o + slots * num_topk * 4)
        self.scales = o; o = _align(o + slots * num_scales * 4)
        self.total_bytes = o

    def constants(self):
        """Offsets as keyword constants for the kernel factories."""
        return dict(off_rank_counts=self.rank_counts, off_chan_counts=self.chan_counts,
                    off_expert_counts=self.expert_counts, off_tail=self.tail, off_head=self.head,
                    off_x=self.x, off_src=self.src, off_topk=self.topk, off_weight=self.weight,
                    off_scales=self.scales)


@functools.lru_cache(maxsize=256)
def ring_layout(num_ranks, num_channels, num_recv_slots, row_bytes, num_topk, num_scales):
    """The RingLayout for these sizes, memoised (every launch asks for one). Treat as read-only."""
    return RingLayout(num_ranks, num_channels, num_recv_slots, row_bytes, num_topk, num_scales)


def nvl_bytes_needed(num_ranks, num_channels, num_recv_slots, hidden_bytes, num_topk, num_scales):
    """Bytes of IPC buffer a dispatch or combine with these sizes needs (header + rings)."""
    return ring_layout(num_ranks, num_channels, num_recv_slots, hidden_bytes, num_topk,
                       num_scales).total_bytes


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@cuda.jit(device=True, inline=True)
def channel_range(num_tokens, num_channels, c):
    per = (num_tokens + num_channels - 1) // num_channels
    start = min(per * c, num_tokens)
    return start, min(start + per, num_tokens)


@cuda.jit(device=True, inline=True)
def _ld16(addr, nc):
    if nc:
        return ptx.ld_nc_v4(addr)
    return ptx.ld_volatile_v4(addr)


@cuda.jit(device=True, inline=True)
def copy_row(dst, src, n16, lane, nc, unroll):
    """Warp-wide copy of ``n16`` 16-byte vectors, ``unroll`` (4 or 8) loads in flight per lane.

    ``nc``: read through the non-coherent path with no L1 allocation. Right for the caller's x
    (read-only for the whole kernel) and, as in DeepEP, for ring slots read after the acquire of
    their tail: nothing ever allocates ring lines in L1, so no stale copy can be hit. Without it
    the loads are volatile (each one a fresh read of L2), slower but beyond doubt.
    Bytes in flight per warp (32 x 16 x unroll) are what bound a warp's copy rate: each load
    round costs one memory latency.
    """
    i = lane
    if unroll >= 8:
        while i + 224 < n16:
            a0, a1, a2, a3 = _ld16(src + uint64(i * 16), nc)
            b0, b1, b2, b3 = _ld16(src + uint64((i + 32) * 16), nc)
            c0, c1, c2, c3 = _ld16(src + uint64((i + 64) * 16), nc)
            d0, d1, d2, d3 = _ld16(src + uint64((i + 96) * 16), nc)
            e0, e1, e2, e3 = _ld16(src + uint64((i + 128) * 16), nc)
            f0, f1, f2, f3 = _ld16(src + uint64((i + 160) * 16), nc)
            g0, g1, g2, g3 = _ld16(src + uint64((i + 192) * 16), nc)
            h0, h1, h2, h3 = _ld16(src + uint64((i + 224) * 16), nc)
            ptx.st_na_v4(dst + uint64(i * 16), a0, a1, a2, a3)
            ptx.st_na_v4(dst + uint64((i + 32) * 16), b0, b1, b2, b3)
            ptx.st_na_v4(dst + uint64((i + 64) * 16), c0, c1, c2, c3)
            ptx.st_na_v4(dst + uint64((i + 96) * 16), d0, d1, d2, d3)
            ptx.st_na_v4(dst + uint64((i + 128) * 16), e0, e1, e2, e3)
            ptx.st_na_v4(dst + uint64((i + 160) * 16), f0, f1, f2, f3)
            ptx.st_na_v4(dst + uint64((i + 192) * 16), g0, g1, g2, g3)
            ptx.st_na_v4(dst + uint64((i + 224) * 16), h0, h1, h2, h3)
            i += 256
    while i + 96 < n16:
        a0, a1, a2, a3 = _ld16(src + uint64(i * 16), nc)
        b0, b1, b2, b3 = _ld16(src + uint64((i + 32) * 16), nc)
        c0, c1, c2, c3 = _ld16(src + uint64((i + 64) * 16), nc)
        d0, d1, d2, d3 = _ld16(src + uint64((i + 96) * 16), nc)
        ptx.st_na_v4(dst + uint64(i * 16), a0, a1, a2, a3)
        ptx.st_na_v4(dst + uint64((i + 32) * 16), b0, b1, b2, b3)
        ptx.st_na_v4(dst + uint64((i + 64) * 16), c0, c1, c2, c3)
        ptx.st_na_v4(dst + uint64((i + 96) * 16), d0, d1, d2, d3)
        i += 128
    while i < n16:
        a0, a1, a2, a3 = _ld16(src + uint64(i * 16), nc)
        ptx.st_na_v4(dst + uint64(i * 16), a0, a1, a2, a3)
        i += 32


@cuda.jit(device=True, inline=True)
def peer_group(warp, rank, num_ranks, warps_per_peer):
    """Warps split into groups over the R - 1 peers other than ``rank`` (warps_per_peer each):
    returns (peer, warp index inside the group, group index); peer = -1 for warps left over."""
    grp = warp // warps_per_peer
    peer = grp + 1 if grp >= rank else grp
    if grp >= num_ranks - 1:
        peer = -1
    return peer, warp % warps_per_peer, grp


@cuda.jit(device=True, inline=True)
def prefix_before(rank_prefix, src, me, R):
    """Rows of recv_x before the block of source ``src`` on rank ``me``."""
    if src == 0:
        return int32(0)
    return rank_prefix[(src - 1) * R + me]


@cuda.jit(device=True, inline=True)
def channel_block(rank_prefix, recv_chan_prefix, src, me, c, R, C):
    """(first row, row count) in rank ``me``'s recv_x of the tokens rank ``src`` sent it in
    channel ``c``: the rows dispatch writes there and combine sends back."""
    before = prefix_before(rank_prefix, src, me, R)
    start = recv_chan_prefix[src * C + c]
    if c + 1 < C:
        end = recv_chan_prefix[src * C + c + 1]
    else:
        end = rank_prefix[src * R + me] - before
    return before + start, end - start


# ---------------------------------------------------------------------------------------------
# notify_dispatch
# ---------------------------------------------------------------------------------------------

NOTIFY_SIG = ("void(uint64, uint64, int32, uint64, uint64, uint64, int32, int32, uint64, uint64, "
              "uint64, uint64, int64, uint64)")


def make_notify_dispatch(num_ranks, num_channels, num_local_experts, off_rank_counts,
                         off_chan_counts, off_expert_counts, off_tail, off_head):
    """Arguments: buffer table, signal table, rank, num_tokens_per_rank, is_token_in_rank,
    num_tokens_per_expert, T, expert_alignment, rank_prefix_matrix out, channel_prefix_matrix out,
    recv_channel_prefix_matrix out, host counters (mapped int32 [1+L]), timeout_ns, err_addr."""
    R, C, L = num_ranks, num_channels, num_local_experts
    NW = NOTIFY_THREADS // 32
    RC = R * C

    def notify_dispatch(bufs_addr, sig_addr, rank, per_rank_addr, in_rank_addr, per_expert_addr,
                        num_tokens, alignment, rank_prefix_addr, chan_prefix_addr,
                        recv_chan_prefix_addr, host_addr, timeout_ns, err_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        counts = cuda.shared.array(RC, int32)
        bufs = ptx.ptr_u64(bufs_addr)
        in_rank = ptx.ptr_u8(in_rank_addr)

        # 1. Tokens per (destination, channel): a warp per pair, lanes stride over the tokens.
        p = warp
        while p < R * C:
            dst = p // C
            c = p % C
            t0, t1 = channel_range(num_tokens, C, c)
            n = int32(0)
            t = t0 + lane
            while t < t1:
                n += int32(in_rank[int64(t) * R + dst])
                t += 32
            for off in (16, 8, 4, 2, 1):
                n += cuda.shfl_down_sync(0xFFFFFFFF, n, off)
            if lane == 0:
                counts[p] = n
            p += NW
        cuda.syncthreads()
        if tid < R:
            out = ptx.ptr_i32(chan_prefix_addr)
            acc = int32(0)
            for c in range(C):
                acc += counts[tid * C + c]
                out[tid * C + c] = acc

        # 2. Everyone has finished the previous operation on these buffers.
        barrier_block(sig_addr, rank, R, timeout_ns, err_addr, _NOTIFY)

        # 3. My counts into every peer's header; my own ring counters to zero.
        per_rank = ptx.ptr_i32(per_rank_addr)
        per_expert = ptx.ptr_i32(per_expert_addr)
        for dst in range(R):
            base = bufs[dst]
            rc = ptx.ptr_i32(base + uint64(off_rank_counts))
            cc = ptx.ptr_i32(base + uint64(off_chan_counts))
            ec = ptx.ptr_i32(base + uint64(off_expert_counts))
            i = tid
            while i < R:
                rc[rank * R + i] = per_rank[i]
                i += NOTIFY_THREADS
            i = tid
            while i < C:
                cc[rank * C + i] = counts[dst * C + i]
                i += NOTIFY_THREADS
            i = tid
            while i < L:
                ec[rank * MAX_LOCAL_EXPERTS + i] = per_expert[dst * L + i]
                i += NOTIFY_THREADS
        mine = bufs[rank]
        ring = ptx.ptr_i32(mine + uint64(off_tail))  # tail then head: 2*C*R contiguous words
        i = tid
        while i < 2 * C * R:
            ring[i] = 0
            i += NOTIFY_THREADS

        # 4. Every peer's counts have landed in my header.
        barrier_block(sig_addr, rank, R, timeout_ns, err_addr, _NOTIFY)

        rank_prefix = ptx.ptr_i32(rank_prefix_addr)
        if tid < R:
            acc = int32(0)
            for s in range(R):
                acc += ptx.ld_volatile_i32(mine + uint64(off_rank_counts + 4 * (s * R + tid)))
                rank_prefix[s * R + tid] = acc
        elif tid >= 32 and tid < 32 + R:
            s = tid - 32
            out = ptx.ptr_i32(recv_chan_prefix_addr)
            acc = int32(0)
            for c in range(C):
                out[s * C + c] = acc
                acc += ptx.ld_volatile_i32(mine + uint64(off_chan_counts + 4 * (s * C + c)))
        host = ptx.ptr_i32(host_addr)
        i = tid
        while i < L:
            total = int32(0)
            for s in range(R):
                total += ptx.ld_volatile_i32(
                    mine + uint64(off_expert_counts + 4 * (s * MAX_LOCAL_EXPERTS + i)))
            host[1 + i] = (total + alignment - 1) // alignment * alignment
            i += NOTIFY_THREADS
        cuda.syncthreads()
        if tid == 0:
            total = int32(0)
            for s in range(R):
                total += ptx.ld_volatile_i32(mine + uint64(off_rank_counts + 4 * (s * R + rank)))
            # The count goes last, released: the host reads the expert counts only after it.
            ptx.fence_acq_rel_sys()
            ptx.st_release_sys_i32(host_addr, total)

    return notify_dispatch


# ---------------------------------------------------------------------------------------------
# cached_notify: reset the ring counters between operations
# ---------------------------------------------------------------------------------------------

CACHED_SIG = "void(uint64, uint64, int32, int64, uint64)"


def make_cached_notify(num_ranks, num_channels, off_tail):
    """Arguments: buffer table, signal table, rank, timeout_ns, err_addr."""
    R, C = num_ranks, num_channels

    def cached_notify(bufs_addr, sig_addr, rank, timeout_ns, err_addr):
        barrier_block(sig_addr, rank, R, timeout_ns, err_addr, _CACHED)
        ring = ptx.ptr_i32(ptx.ptr_u64(bufs_addr)[rank] + uint64(off_tail))
        i = cuda.threadIdx.x
        while i < 2 * C * R:
            ring[i] = 0
            i += cuda.blockDim.x
        barrier_block(sig_addr, rank, R, timeout_ns, err_addr, _CACHED)

    return cached_notify


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------

DISPATCH_SIG = ("void(uint64, int32, int32, uint64, uint64, int64, int64, uint64, uint64, uint64, "
                "uint64, uint64, uint64, uint64, uint64, uint64, uint64, uint64, uint64, int32, "
                "int64, uint64)")


def make_dispatch(num_ranks, num_channels, num_recv_slots, row16, num_topk, num_scales,
                  num_local_experts, off_tail, off_head, off_x, off_src, off_topk, off_weight,
                  off_scales, ring_nc=True, unroll=8, **_unused_offsets):
    """Arguments: buffer table, rank, T, x, scales, scales stride 0 and 1 (elements), topk_idx,
    topk_weights, is_token_in_rank, channel_prefix_matrix, rank_prefix_matrix,
    recv_channel_prefix_matrix, recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights,
    recv_src_idx, send_head (0 = cached mode), num_worst_tokens, timeout_ns, err_addr."""
    R, C, N, H16, K, S, L = (num_ranks, num_channels, num_recv_slots, row16, num_topk,
                             num_scales, num_local_experts)
    WPG = WARPS // R                    # sender: a group per destination, me included
    RWPG = WARPS // max(R - 1, 1)       # receiver: a group per remote source
    ROW = H16 * 16

    def dispatch(bufs_addr, rank, num_tokens, x_addr, sc_addr, sc_s0, sc_s1, topk_addr, w_addr,
                 in_rank_addr, chan_prefix_addr, rank_prefix_addr, recv_chan_prefix_addr,
                 rx_addr, rsc_addr, rtopk_addr, rw_addr, rsrc_addr, send_head_addr, num_worst,
                 timeout_ns, err_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        c = cuda.blockIdx.x >> 1
        is_sender = (cuda.blockIdx.x & 1) == 0
        g = warp // WPG          # the peer this warp's group serves
        wg = warp % WPG          # warp index inside the group
        bufs = ptx.ptr_u64(bufs_addr)
        rank_prefix = ptx.ptr_i32(rank_prefix_addr)
        recv_chan_prefix = ptx.ptr_i32(recv_chan_prefix_addr)
        mine = bufs[rank]
        tails = cuda.shared.array(MAX_RANKS, int32)

        if g < R and is_sender:
            dst = g
            t0, t1 = channel_range(num_tokens, C, c)
            in_rank = ptx.ptr_u8(in_rank_addr)
            local = dst == rank
            out_base = prefix_before(rank_prefix, rank, rank, R) + recv_chan_prefix[rank * C + c]
            ring = (c * R + rank) * N          # ring (c, me) in dst's buffer, first slot
            peer = bufs[dst]
            head_addr = mine + uint64(off_head + 4 * (c * R + dst))
            cached_head = int32(0)
            pos = int32(0)
            b0 = t0
            while b0 < t1:
                t = b0 + lane
                sel = False
                if t < t1:
                    sel = in_rank[int64(t) * R + dst] != 0
                mask = cuda.ballot_sync(0xFFFFFFFF, sel)
                nsel = cuda.popc(mask)
                before = cuda.popc(mask & ((uint32(1) << uint32(lane)) - uint32(1)))
                if wg == 0 and send_head_addr != 0 and t < t1:
                    ptx.ptr_i32(send_head_addr)[int64(t) * R + dst] = pos + before if sel else -1
                if nsel > 0:
                    if not local:
                        # Room for the whole batch in ring (c, me->dst)? Poll my own head word.
                        if lane == 0:
                            start = ptx.globaltimer()
                            while pos + nsel - cached_head > N:
                                cached_head = ptx.ld_volatile_i32(head_addr)
                                if timed_out(start, timeout_ns):
                                    record_timeout(err_addr, _DISPATCH, rank, dst, c,
                                                   pos + nsel - N, cached_head,
                                                   ptx.globaltimer() - start)
                                    break
                        cached_head = cuda.shfl_sync(0xFFFFFFFF, cached_head, 0)
                    # The ballot comes back as a signed 32-bit value; widened as is, lane 31's bit
                    # would sign-extend into 32 phantom "selected" lanes. Keep the low 32 bits.
                    m = uint64(mask) & uint64(0xFFFFFFFF)
                    k = int32(0)
                    while m != 0:
                        i = cuda.ffs(m) - 1          # next selected lane
                        m &= m - uint64(1)
                        p = pos + k
                        k += 1
                        if p % WPG != wg:
                            continue
                        tok = int64(b0 + i)
                        if local:
                            row = int64(out_base + p)
                            dst_x = rx_addr + uint64(row * ROW)
                        else:
                            row = int64(ring + p % N)
                            dst_x = peer + uint64(off_x + row * ROW)
                        copy_row(dst_x, x_addr + uint64(tok * ROW), H16, lane, True, unroll)
                        if lane == 0:
                            if local:
                                ptx.ptr_i32(rsrc_addr)[row] = int32(tok)
                            else:
                                ptx.ptr_i32(peer + uint64(off_src))[row] = int32(tok)
                        if K > 0 and lane < K:
                            e = ptx.ptr_i64(topk_addr)[tok * K + lane]
                            le = int64(-1)
                            if e >= dst * L and e < (dst + 1) * L:
                                le = e - dst * L
                            wv = ptx.ptr_f32(w_addr)[tok * K + lane] if le >= 0 else float32(0)
                            if local:
                                ptx.ptr_i64(rtopk_addr)[row * K + lane] = le
                                ptx.ptr_f32(rw_addr)[row * K + lane] = wv
                            else:
                                ptx.ptr_i32(peer + uint64(off_topk))[row * K + lane] = int32(le)
                                ptx.ptr_f32(peer + uint64(off_weight))[row * K + lane] = wv
                        if S > 0:
                            j = lane
                            while j < S:
                                v = ptx.ptr_f32(sc_addr)[tok * sc_s0 + j * sc_s1]
                                if local:
                                    ptx.ptr_f32(rsc_addr)[row * S + j] = v
                                else:
                                    ptx.ptr_f32(peer + uint64(off_scales))[row * S + j] = v
                                j += 32
                    pos += nsel
                    if not local:
                        # Everything this group wrote for the batch, then the tail, released.
                        ptx.bar_sync(g + 1, WPG * 32)
                        if wg == 0 and lane == 0:
                            ptx.st_release_sys_i32(peer + uint64(off_tail + 4 * (c * R + rank)), pos)
                b0 += 32
        elif not is_sender:
            # All warps serve the R - 1 remote sources (rows for me were written by my sender).
            src, wg, grp = peer_group(warp, rank, R, RWPG)
            if src >= 0:
                base, count = channel_block(rank_prefix, recv_chan_prefix, src, rank, c, R, C)
                tail_addr = mine + uint64(off_tail + 4 * (c * R + src))
                ring = (c * R + src) * N
                head = int32(0)
                while head < count:
                    if wg == 0 and lane == 0:
                        start = ptx.globaltimer()
                        tail = ptx.ld_acquire_sys_i32(tail_addr)
                        while tail <= head:
                            if timed_out(start, timeout_ns):
                                record_timeout(err_addr, _DISPATCH, rank, src, c, head + 1, tail,
                                               ptx.globaltimer() - start)
                                tail = count  # give up: copy whatever is there and leave
                                break
                            tail = ptx.ld_acquire_sys_i32(tail_addr)
                        tails[grp] = tail
                    ptx.bar_sync(grp + 1, RWPG * 32)
                    tail = tails[grp]
                    p = head + wg
                    while p < tail:
                        slot = int64(ring + p % N)
                        row = int64(base + p)
                        copy_row(rx_addr + uint64(row * ROW), mine + uint64(off_x + slot * ROW),
                                 H16, lane, ring_nc, unroll)
                        if lane == 0:
                            ptx.ptr_i32(rsrc_addr)[row] = ptx.ld_volatile_i32(
                                mine + uint64(off_src + 4 * slot))
                        if K > 0 and lane < K:
                            ptx.ptr_i64(rtopk_addr)[row * K + lane] = int64(ptx.ld_volatile_i32(
                                mine + uint64(off_topk + 4 * (slot * K + lane))))
                            ptx.ptr_u32(rw_addr)[row * K + lane] = ptx.ld_volatile_u32(
                                mine + uint64(off_weight + 4 * (slot * K + lane)))
                        if S > 0:
                            j = lane
                            while j < S:
                                ptx.ptr_u32(rsc_addr)[row * S + j] = ptx.ld_volatile_u32(
                                    mine + uint64(off_scales + 4 * (slot * S + j)))
                                j += 32
                        p += RWPG
                    ptx.bar_sync(grp + 1, RWPG * 32)
                    if wg == 0 and lane == 0:
                        # Slots [head, tail) are free again: tell the sender, in its buffer.
                        ptx.st_release_sys_i32(
                            bufs[src] + uint64(off_head + 4 * (c * R + rank)), tail)
                    head = tail
        if not is_sender and K > 0 and num_worst > 0:
            # num_worst_tokens: rows past the real count carry no expert.
            num_recv = rank_prefix[(R - 1) * R + rank]
            i = int64(num_recv) * K + (c * THREADS + tid)
            end = int64(num_worst) * K
            while i < end:
                ptx.ptr_i64(rtopk_addr)[i] = -1
                i += C * THREADS

    return dispatch


# ---------------------------------------------------------------------------------------------
# combine
# ---------------------------------------------------------------------------------------------

COMBINE_SIG = ("void(uint64, int32, int32, uint64, uint64, uint64, uint64, uint64, uint64, uint64, "
               "uint64, uint64, int64, uint64)")


@cuda.jit(device=True, inline=True)
def _add_bf16x8(acc, u, a, b, c, d):
    """acc[u, 0:8] += the eight bf16 values packed in a, b, c, d (low half first)."""
    lo, hi = ptx.bf16x2_to_f32x2(a)
    acc[u, 0] += lo
    acc[u, 1] += hi
    lo, hi = ptx.bf16x2_to_f32x2(b)
    acc[u, 2] += lo
    acc[u, 3] += hi
    lo, hi = ptx.bf16x2_to_f32x2(c)
    acc[u, 4] += lo
    acc[u, 5] += hi
    lo, hi = ptx.bf16x2_to_f32x2(d)
    acc[u, 6] += lo
    acc[u, 7] += hi


@cuda.jit(device=True, inline=True)
def add_row(acc, vals, src, j0, h16, nc, unroll):
    """acc[u] += the eight bf16 values of 16-byte chunk ``j0 + 32u`` of the row at ``src``, for
    u < ``unroll`` (a compile-time constant of the caller; ``acc`` is ``float32[unroll, 8]`` and
    ``vals`` ``uint32[unroll, 4]`` in registers). All loads come first, so that ``unroll`` of
    them are in flight per lane: a remote row over NVLink costs about a microsecond of latency
    per round trip. ``nc`` as in ``_ld16``."""
    for u in range(unroll):
        j = j0 + 32 * u
        if j < h16:
            a0, a1, a2, a3 = _ld16(src + uint64(j * 16), nc)
            vals[u, 0] = a0
            vals[u, 1] = a1
            vals[u, 2] = a2
            vals[u, 3] = a3
    for u in range(unroll):
        if j0 + 32 * u < h16:
            _add_bf16x8(acc, u, vals[u, 0], vals[u, 1], vals[u, 2], vals[u, 3])


def make_combine(num_ranks, num_channels, num_recv_slots, row16, num_topk, off_tail, off_head,
                 off_x, off_weight, ring_nc=True, unroll=8, **_unused_offsets):
    """Arguments: buffer table, rank, T, x (bf16 [N_recv, H]), topk_weights (0 = none), bias0,
    bias1 (0 = none), rank_prefix_matrix, recv_channel_prefix_matrix, send_head, out (bf16 [T,H]),
    out_topk_weights, timeout_ns, err_addr."""
    R, C, N, H16, K = num_ranks, num_channels, num_recv_slots, row16, num_topk
    SWPG = WARPS // max(R - 1, 1)       # sender: a group per remote destination
    ROW = H16 * 16
    U = 4 if R <= 4 else 2  # columns per lane per step (registers: U * (8 + 4) per lane)

    def combine(bufs_addr, rank, num_tokens, x_addr, w_addr, bias0_addr, bias1_addr,
                rank_prefix_addr, recv_chan_prefix_addr, send_head_addr, out_addr, out_w_addr,
                timeout_ns, err_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        c = cuda.blockIdx.x >> 1
        bufs = ptx.ptr_u64(bufs_addr)
        rank_prefix = ptx.ptr_i32(rank_prefix_addr)
        recv_chan_prefix = ptx.ptr_i32(recv_chan_prefix_addr)
        mine = bufs[rank]
        send_head = ptx.ptr_i32(send_head_addr)

        if (cuda.blockIdx.x & 1) == 0:
            # All warps serve the R - 1 remote destinations (my own rows are read in place).
            dst, wg, grp = peer_group(warp, rank, R, SWPG)
            if dst >= 0:
                # My rows that came from dst in channel c go back into ring (c, me) of dst.
                start, count = channel_block(rank_prefix, recv_chan_prefix, dst, rank, c, R, C)
                peer = bufs[dst]
                ring = (c * R + rank) * N
                head_addr = mine + uint64(off_head + 4 * (c * R + dst))
                cached_head = int32(0)
                pos = int32(0)
                while pos < count:
                    nb = min(32, count - pos)
                    if lane == 0:
                        t_start = ptx.globaltimer()
                        while pos + nb - cached_head > N:
                            cached_head = ptx.ld_volatile_i32(head_addr)
                            if timed_out(t_start, timeout_ns):
                                record_timeout(err_addr, _COMBINE, rank, dst, c, pos + nb - N,
                                               cached_head, ptx.globaltimer() - t_start)
                                break
                    cached_head = cuda.shfl_sync(0xFFFFFFFF, cached_head, 0)
                    p = pos + wg
                    while p < pos + nb:
                        row = int64(start + p)
                        slot = int64(ring + p % N)
                        copy_row(peer + uint64(off_x + slot * ROW), x_addr + uint64(row * ROW),
                                 H16, lane, True, unroll)
                        if K > 0 and lane < K:
                            ptx.ptr_f32(peer + uint64(off_weight))[slot * K + lane] = \
                                ptx.ptr_f32(w_addr)[row * K + lane]
                        p += SWPG
                    pos += nb
                    ptx.bar_sync(grp + 1, SWPG * 32)
                    if wg == 0 and lane == 0:
                        ptx.st_release_sys_i32(peer + uint64(off_tail + 4 * (c * R + rank)), pos)
        else:
            # Receiver: my tokens of channel c in order, one per warp per round.
            t0, t1 = channel_range(num_tokens, C, c)
            local_base = prefix_before(rank_prefix, rank, rank, R) + recv_chan_prefix[rank * C + c]
            acc = cuda.local.array((U, 8), float32)
            vals = cuda.local.array((U, 4), uint32)
            srcs = cuda.shared.array((WARPS, MAX_RANKS), uint64)
            b0 = t0
            while b0 < t1:
                t = b0 + warp
                if t < t1:
                    slot = int32(-1)
                    if lane < R:
                        slot = send_head[int64(t) * R + lane]
                        if slot >= 0 and lane != rank:
                            tail_addr = mine + uint64(off_tail + 4 * (c * R + lane))
                            t_start = ptx.globaltimer()
                            seen = ptx.ld_acquire_sys_i32(tail_addr)
                            while seen <= slot:
                                if timed_out(t_start, timeout_ns):
                                    record_timeout(err_addr, _COMBINE, rank, lane, c, slot + 1,
                                                   seen, ptx.globaltimer() - t_start)
                                    break
                                seen = ptx.ld_acquire_sys_i32(tail_addr)
                    cuda.syncwarp(0xFFFFFFFF)
                    # Where each rank's copy of row t lives (0 = that rank does not hold it).
                    for d in range(R):
                        s = cuda.shfl_sync(0xFFFFFFFF, slot, d)
                        srcs[warp, d] = uint64(0)
                        if s >= 0:
                            if d == rank:
                                srcs[warp, d] = x_addr + uint64(int64(local_base + s) * ROW)
                            else:
                                srcs[warp, d] = mine + uint64(
                                    off_x + int64((c * R + d) * N + s % N) * ROW)
                    # U columns of 16 B per lane per step: U * R independent loads in flight
                    # before the first add, instead of one round trip per column.
                    j0 = lane
                    while j0 < H16:
                        for u in range(U):
                            for q in range(8):
                                acc[u, q] = float32(0)
                        for u in range(U):
                            j = j0 + 32 * u
                            if j < H16:
                                if bias0_addr != 0:
                                    a0, a1, a2, a3 = ptx.ld_nc_v4(
                                        bias0_addr + uint64((int64(t) * H16 + j) * 16))
                                    _add_bf16x8(acc, u, a0, a1, a2, a3)
                                if bias1_addr != 0:
                                    a0, a1, a2, a3 = ptx.ld_nc_v4(
                                        bias1_addr + uint64((int64(t) * H16 + j) * 16))
                                    _add_bf16x8(acc, u, a0, a1, a2, a3)
                        for d in range(R):
                            base_d = srcs[warp, d]
                            if base_d != 0:
                                add_row(acc, vals, base_d, j0, H16, d == rank or ring_nc, U)
                        for u in range(U):
                            j = j0 + 32 * u
                            if j < H16:
                                ptx.st_na_v4(out_addr + uint64((int64(t) * H16 + j) * 16),
                                             ptx.cvt_bf16x2(acc[u, 0], acc[u, 1]),
                                             ptx.cvt_bf16x2(acc[u, 2], acc[u, 3]),
                                             ptx.cvt_bf16x2(acc[u, 4], acc[u, 5]),
                                             ptx.cvt_bf16x2(acc[u, 6], acc[u, 7]))
                        j0 += 32 * U
                    if K > 0 and out_w_addr != 0:
                        # Lane k sums weight k over every rank that held the token.
                        wsum = float32(0)
                        for d in range(R):
                            s = cuda.shfl_sync(0xFFFFFFFF, slot, d)
                            if s >= 0 and lane < K:
                                if d == rank:
                                    wsum += ptx.ptr_f32(w_addr)[int64(local_base + s) * K + lane]
                                else:
                                    wsum += ptx.bitcast_u32_f32(ptx.ld_volatile_u32(
                                        mine + uint64(off_weight + 4 * (int64((c * R + d) * N
                                                                             + s % N) * K + lane))))
                        if lane < K:
                            ptx.ptr_f32(out_w_addr)[int64(t) * K + lane] = wsum
                cuda.syncthreads()
                # Free the slots this round consumed: per ring, one past the last slot used.
                if tid < R and tid != rank:
                    last = int32(-1)
                    u = b0
                    while u < min(b0 + WARPS, t1):
                        last = max(last, send_head[int64(u) * R + tid])
                        u += 1
                    if last >= 0:
                        ptx.st_release_sys_i32(bufs[tid] + uint64(off_head + 4 * (c * R + rank)),
                                               last + 1)
                b0 += WARPS

    return combine


# ---------------------------------------------------------------------------------------------
# Kernel specifications: the one place that turns sizes into compile-time constants. Launchers
# compile through these; so do tools that compile ahead of time (tests/gpu/parallel_compile.py).
# Each is ``(factory, signature, get_kernel keywords)``. dispatch and combine read TUNING on every
# call (bench sweeps change it at run time), so they are not memoised.
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def notify_spec(num_ranks, num_channels, num_local_experts):
    """notify_dispatch for R ranks, C channels, L experts per rank."""
    lay = ring_layout(num_ranks, num_channels, MIN_RECV_SLOTS, 16, 0, 0)  # header only
    return (make_notify_dispatch, NOTIFY_SIG,
            dict(num_ranks=num_ranks, num_channels=num_channels,
                 num_local_experts=num_local_experts, off_rank_counts=lay.rank_counts,
                 off_chan_counts=lay.chan_counts, off_expert_counts=lay.expert_counts,
                 off_tail=lay.tail, off_head=lay.head))


@functools.lru_cache(maxsize=256)
def cached_notify_spec(num_ranks, num_channels):
    """The barrier + ring reset before a cached dispatch or a combine."""
    lay = ring_layout(num_ranks, num_channels, MIN_RECV_SLOTS, 16, 0, 0)  # header only
    return (make_cached_notify, CACHED_SIG,
            dict(num_ranks=num_ranks, num_channels=num_channels, off_tail=lay.tail))


def dispatch_spec(num_ranks, num_channels, num_recv_slots, row_bytes, num_topk, num_scales,
                  num_local_experts):
    """dispatch of ``row_bytes``-byte rows (K = 0 and no top-k for a cached dispatch)."""
    lay = ring_layout(num_ranks, num_channels, num_recv_slots, row_bytes, num_topk, num_scales)
    return (make_dispatch, DISPATCH_SIG,
            dict(launch_bounds=(THREADS, 1), num_ranks=num_ranks, num_channels=num_channels,
                 num_recv_slots=num_recv_slots, row16=row_bytes // 16, num_topk=num_topk,
                 num_scales=num_scales, num_local_experts=num_local_experts,
                 **lay.constants(), **TUNING))


def combine_spec(num_ranks, num_channels, num_recv_slots, row_bytes, num_topk):
    """combine of ``row_bytes``-byte BF16 rows with ``num_topk`` weights (0: none)."""
    lay = ring_layout(num_ranks, num_channels, num_recv_slots, row_bytes, num_topk, 0)
    return (make_combine, COMBINE_SIG,
            dict(launch_bounds=(THREADS, 1), num_ranks=num_ranks, num_channels=num_channels,
                 num_recv_slots=num_recv_slots, row16=row_bytes // 16, num_topk=num_topk,
                 **lay.constants(), **TUNING))


def _get(spec):
    from numba_ep.launch import get_kernel

    factory, sig, kwargs = spec
    return get_kernel(factory, sig, **kwargs)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

class IntranodeContext:
    """What every intranode launch needs: the IPC buffer, my rank, the error record, timeouts,
    and the host-mapped counters notify_dispatch fills (int32 [1 + MAX_LOCAL_EXPERTS])."""

    def __init__(self, ipc_buffer, rank, num_ranks, timeout_s=None):
        from numba_ep.kernels.waits import error_record, mapped_host_array, timeout_ns

        if not 1 <= num_ranks <= MAX_RANKS:
            raise ValueError(f"num_ranks: intranode mode supports 1..{MAX_RANKS} ranks, got {num_ranks}")
        self.buffer = ipc_buffer
        self.rank = rank
        self.num_ranks = num_ranks
        self.timeout_s = timeout_s
        self.timeout_ns = timeout_ns(timeout_s)
        self.errors = error_record()
        self._counters_mem, self.counters, self.counters_dev = mapped_host_array(
            1 + MAX_LOCAL_EXPERTS, np.int32)

    @property
    def bufs(self) -> int:
        return int(self.buffer.peer_ptrs_dev.data.ptr)

    @property
    def signals(self) -> int:
        return int(self.buffer.signal_ptrs_dev.data.ptr)

    def layout(self, num_channels, num_recv_slots, row_bytes, num_topk, num_scales):
        lay = ring_layout(self.num_ranks, num_channels, num_recv_slots, row_bytes, num_topk,
                          num_scales)
        if lay.total_bytes > self.buffer.nbytes:
            raise ValueError(f"num_nvl_bytes: this operation needs {lay.total_bytes} bytes of NVLink "
                             f"buffer ({num_channels} channels x {num_recv_slots} slots x "
                             f"{row_bytes} B rows), the buffer has {self.buffer.nbytes}")
        return lay


def _addr(a) -> int:
    return 0 if a is None else address(a)


def notify_dispatch(ctx, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                    num_experts, num_channels, expert_alignment, stream):
    """Enqueue notify_dispatch. Returns ``(rank_prefix_matrix [R,R], channel_prefix_matrix [R,C],
    recv_channel_prefix_matrix [R,C])``, CuPy int32, filled when the kernel runs. Also arms the
    host counters that ``wait_recv_counts`` reads."""
    import cupy

    R, C = ctx.num_ranks, num_channels
    L = num_experts // R
    if L > MAX_LOCAL_EXPERTS:
        raise ValueError(f"num_experts: at most {MAX_LOCAL_EXPERTS} experts per rank, got {L}")
    rank_prefix = cupy.empty((R, R), dtype=np.int32)
    chan_prefix = cupy.empty((R, C), dtype=np.int32)
    recv_chan_prefix = cupy.empty((R, C), dtype=np.int32)
    ctx.counters[: 1 + L] = -1
    k = _get(notify_spec(R, C, L))
    k.launch(1, NOTIFY_THREADS, ctx.bufs, ctx.signals, ctx.rank, _addr(num_tokens_per_rank),
             _addr(is_token_in_rank), _addr(num_tokens_per_expert), is_token_in_rank.shape[0],
             expert_alignment, _addr(rank_prefix), _addr(chan_prefix), _addr(recv_chan_prefix),
             ctx.counters_dev, ctx.timeout_ns, ctx.errors.device_address, stream=stream)
    return rank_prefix, chan_prefix, recv_chan_prefix


def wait_recv_counts(ctx, num_local_experts):
    """Busy-wait (host) until notify_dispatch has published the received counts.

    Returns ``(num_recv_tokens, num_recv_tokens_per_expert_list)``; raises CommTimeoutError if a
    kernel recorded a timeout or nothing arrived within the context's timeout.
    """
    from numba_ep.kernels.waits import wait_host_count

    wait_host_count(ctx, "notify_dispatch")
    counts = ctx.counters[1: 1 + num_local_experts]
    while (counts < 0).any():  # released after the count, so this almost never spins
        counts = ctx.counters[1: 1 + num_local_experts]
    return int(ctx.counters[0]), [int(v) for v in counts]


def cached_notify(ctx, num_channels, stream):
    """Enqueue the barrier + ring-counter reset that precedes a cached dispatch or a combine."""
    k = _get(cached_notify_spec(ctx.num_ranks, num_channels))
    k.launch(1, 128, ctx.bufs, ctx.signals, ctx.rank, ctx.timeout_ns, ctx.errors.device_address,
             stream=stream)


def _row_bytes(a):
    return a.shape[1] * a.dtype.itemsize


def dispatch(ctx, x_bytes, x_scales, topk_idx, topk_weights, is_token_in_rank,
             channel_prefix_matrix, rank_prefix_matrix, recv_channel_prefix_matrix, recv_x_bytes,
             recv_x_scales, recv_topk_idx, recv_topk_weights, recv_src_idx, send_head,
             num_experts, num_recv_slots, num_channels, num_worst_tokens, stream):
    """Enqueue the dispatch kernel (see the module docstring for the data flow).

    ``x_bytes`` [T, row] and ``recv_x_bytes`` [N, row] are uint8 views; ``x_scales`` float32
    [T, S] with any strides or None; ``topk_idx`` int64 / ``topk_weights`` float32 [T, K] or None;
    ``recv_*`` outputs as in ``Buffer.dispatch``; ``send_head`` int32 [T, R] or None (cached).
    """
    R, C = ctx.num_ranks, num_channels
    T = x_bytes.shape[0]
    row = _row_bytes(x_bytes)
    K = 0 if topk_idx is None else topk_idx.shape[1]
    S = 0 if x_scales is None else x_scales.shape[1]
    ctx.layout(C, num_recv_slots, row, K, S)  # checks that the rings fit the buffer
    if x_scales is not None:
        s0, s1 = (st // 4 for st in x_scales.strides)
    else:
        s0 = s1 = 0
    k = _get(dispatch_spec(R, C, num_recv_slots, row, K, S, num_experts // R))
    k.launch(2 * C, THREADS, ctx.bufs, ctx.rank, T, _addr(x_bytes), _addr(x_scales), s0, s1,
             _addr(topk_idx), _addr(topk_weights), _addr(is_token_in_rank),
             _addr(channel_prefix_matrix), _addr(rank_prefix_matrix),
             _addr(recv_channel_prefix_matrix), _addr(recv_x_bytes), _addr(recv_x_scales),
             _addr(recv_topk_idx), _addr(recv_topk_weights), _addr(recv_src_idx), _addr(send_head),
             num_worst_tokens, ctx.timeout_ns, ctx.errors.device_address, stream=stream,
             cooperative=True)


def combine(ctx, x_bf16, topk_weights, bias0, bias1, recv_src_idx, rank_prefix_matrix,
            recv_channel_prefix_matrix, send_head, out, out_topk_weights, num_recv_slots,
            num_channels, stream):
    """Enqueue the combine kernel: ``out[t] = bias0[t] + bias1[t] + sum of the rows of every rank
    that received token t`` (fp32 accumulation, bf16 result); ``out_topk_weights`` likewise.

    ``x_bf16`` [N, H] and ``out`` [T, H] are uint16 views of bf16 data; ``topk_weights`` float32
    [N, K] or None; biases uint16 [T, H] or None; the rest comes from the dispatch handle.
    """
    if num_recv_slots < MIN_RECV_SLOTS:
        raise ValueError(f"config: num_max_nvl_chunked_recv_tokens must be >= {MIN_RECV_SLOTS} "
                         f"for combine, got {num_recv_slots}")
    R, C = ctx.num_ranks, num_channels
    T = out.shape[0]
    row = _row_bytes(x_bf16)
    K = 0 if topk_weights is None else topk_weights.shape[1]
    ctx.layout(C, num_recv_slots, row, K, 0)  # checks that the rings fit the buffer
    k = _get(combine_spec(R, C, num_recv_slots, row, K))
    k.launch(2 * C, THREADS, ctx.bufs, ctx.rank, T, _addr(x_bf16), _addr(topk_weights),
             _addr(bias0), _addr(bias1), _addr(rank_prefix_matrix),
             _addr(recv_channel_prefix_matrix), _addr(send_head), _addr(out),
             _addr(out_topk_weights), ctx.timeout_ns, ctx.errors.device_address, stream=stream,
             cooperative=True)
