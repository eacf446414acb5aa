"""Low-latency mode: expert-parallel dispatch and combine for small batches (inference decoding).

Every rank holds T <= M tokens of hidden size H, each routed to K of E experts (L = E / R experts
per rank, expert e lives on rank e // L as local expert e % L). Dispatch sends a copy of each
(token, slot) to its expert's rank, FP8-quantised on the way (or BF16); combine sends the experts'
outputs back and each rank takes the weighted sum per token. Unlike normal mode there is no
notify step and no host sync: every (local expert, source rank) pair owns a fixed region of M
message slots, so a sender can write without asking where, and the receiver learns how many
arrived from one count word per pair. That is what makes it fast, CUDA-graph capturable, and
memory hungry (notes/deepep-v1.md §2.5, §2.6).

Symmetric buffer (NVSHMEM heap; byte offsets from ``reference.low_latency_layout``, the same on
every rank; h = 0 or 1 is the buffer half a call uses, and the halves alternate call by call):

    [sig_0][sig_1][send_0][send_1][recv_0][recv_1]

    sig_h   int32[E] (rounded to 128 B). The only words that must be zero before a call.
            dispatch: count[le*R + s] = -(n)-1: rank s sent n tokens to my local expert le
            combine : flag[s] = 1: rank s has stored every combine row it owes me
    send_h  dispatch: msg[t] for my tokens t < T, msg = [16 B header: int32 t, 0, 0, 0]
                      [FP8 row: H bytes][scale_inv: H/128 float32]   or   [header][BF16 row: 2H B]
                      (slot size dispatch_msg = 16 + 2H)
            combine : row[le][j] (stride combine_msg = 4*H/128 + 2H): the zero-copy area the user
                      fills through next_combine_buffer(), and the staging rows of NVSHMEM puts
    recv_h  dispatch: msg[le][s][slot], slot < M: the tokens rank s sent to my local expert le
            combine : row[e][t], e a global expert of the SENDER, t one of MY tokens: the output
                      of expert e for my token t. Without metadata the receiver knows where
                      y_e[t] lives, because it knows its own top-k.
            combine row with LogFMT: [H/128 x (bf16 amax, bf16 amin)][per 128-channel division:
                      160 B of 10-bit codes, or 256 B of raw bf16 when not encodable]

    workspace (local device memory, zeroed once): int32[1 + E] = [ticket][slot counter per expert]

Who waits on whom (the arrows are the only cross-GPU waits; a send phase never waits):

    dispatch send (rank r, buffer h)          dispatch recv (rank d, buffer h)
      block b casts tokens b, b+G, .. into send_h msg[t]
      warp k < K: e = topk[t][k]; slot = atomicAdd(counter[e]); copy msg[t] ->
          recv_h[le][r][slot] of rank e // L (16-byte stores through the NVLink-mapped peer
          address, or an NVSHMEM put when the peer is not mapped)
      every block: fence, ticket += 1; the LAST block: zero my sig_(1-h); counter[e] -> count
          [le*R + r] = -n-1 at rank e // L (release) ---->  block le: wait count[le*R + s] for
                                                              every s (acquire); rows of source
                                                              s start at sum of counts of s' < s;
                                                              unpack msgs -> packed_recv_x,
                                                              column-major scales, src_info,
                                                              layout_range, recv_count
    combine send (rank d, buffer h)           combine recv (rank r, buffer h)
      warps take my received rows j of my local experts (in halves): row j of local expert le
          came from rank s with token index t = src_info[le][j]; copy x[le][j] (optionally
          LogFMT-encoded) -> recv_h row[d*L + le][t] of rank s
      ticket; the LAST block: zero my sig_(1-h); flag[d] = 1 at every rank (release) ---->
                                                       every block: wait flag[s] for all s;
                                                       block per token t: out[t] = sum_k w_k *
                                                       row[topk[t][k]][t] (fp32, bf16 out)

Why the zeroing is safe: call i uses half h and zeroes the other half before releasing its
counts/flags; a peer writes into that other half only in call i+1, which it starts only after its
call-i receive acquired those very counts/flags. Every receive phase waits for ALL of its words
(even with 0 tokens), so no late write from call i can land after call i+1 zeroed the half.
Consequences (the rules of use):
  - all ranks make the same sequence of low-latency calls with the same M, H, E;
  - a receive hook must run before the next call's send phase (DeepEP has the same rule);
  - one context's calls go to one stream, or to streams ordered by events (the send kernels of
    two calls share the workspace ticket);
  - a CUDA graph should capture dispatch/combine in pairs: each call flips the host's half
    index, and replays reuse the captured halves;
  - a token that lists one expert twice gets two rows in dispatch, but in combine both rows land
    in the same slot (e, t), so the token sums one of them twice (torch.topk never repeats);
  - more than M (token, slot) hits on one expert from one rank (possible only with repeats) are
    dropped and counted as M.

Launches: with ``return_recv_hook=True`` the send and receive phases are two kernels (the hook
launches the second whenever the caller likes; the send kernel never spins, so it needs no
co-residency). Without a hook both phases run in one cooperative kernel (``make_dispatch`` /
``make_combine``: a block's send share, then its receive share): one launch fewer on the host
(~5 us of an eager call) and no kernel boundary on the GPU, at the price of every block being
resident while it waits for peers (the grid is sized from the kernel's occupancy).
``LowLatencyContext(fuse=False)`` keeps two launches there too. DeepEP does the same, with a
grid-wide barrier between the phases; none is needed here, because the publish/acquire pairs
below already order the phases across blocks and ranks.

Synchronisation inside a send kernel without waiting: every block, after its stores, meets at
a barrier, and its thread 0 fences and takes a ticket (an atomic on the workspace); the block
that draws the last ticket knows all stores of the kernel are complete, so it alone zeroes the
other half and publishes the counts (dispatch: per expert, read from the slot counters it then
resets) or the flags (combine), from one warp, with a fence then relaxed system-scope stores (a
release) that the receivers' ld.acquire.sys pair with. Cost: one fence and one atomic per
block, ~1-2 us on the critical path, and no block ever waits for another (DeepEP instead spins
per expert on a finish counter).

NVSHMEM path: a peer whose ``peer_ptrs`` entry is 0 (not NVLink-mapped, e.g. on another node) is
reached with ``nvshmemx_uint8_put_nbi_warp`` from the send buffer (dispatch messages live there
anyway; combine rows are staged into send_h row[le][j] first unless zero-copy), then the last
block calls ``nvshmem_quiet`` (completes every put of this PE) before ``nvshmem_int_p`` of the
counts/flags. Kernels with NVSHMEM calls take 5-15 s to compile and link NVRTC-built shims, so
they are a separate specialisation (``use_nvshmem=True``) that the host picks only when some peer
is unmapped; on one NVLink host the plain kernels (<1 s to compile) run. The receive kernels only
read local memory and never need NVSHMEM. Caveat: this path compiles and links here but can only
run across nodes; the receiver polls its local count/flag words with ``ld.acquire.sys`` as
DeepEP does.

Byte count and expected time of the benchmark (T=128, H=7168, K=8, E=288, R=2 H100s, NVLink
~350 GB/s per direction by SM stores, HBM ~3 TB/s):
  dispatch FP8: 1024 messages of 16 + 7168 + 224 = 7408 B = 7.6 MB leave each rank, half of them
    (3.8 MB) over NVLink -> ~11 us; HBM traffic (read x 1.8 MB, write msgs 0.9 MB, local copies,
    unpack 2 x 7.6 MB) ~ 25 MB -> ~8 us, overlapping; plus two launches and one count round
    trip (~3-5 us): expect ~15-20 us (DeepEP V1: 30-35 us).
  combine BF16: 1024 rows of 14336 B = 14.7 MB per rank, 7.3 MB over NVLink -> ~21 us; the
    receive reads 14.7 MB and writes 1.8 MB of HBM (~6 us): expect ~25-30 us (DeepEP V1:
    41-43 us). LogFMT cuts the NVLink bytes to ~9.2 KB per row when most divisions encode.
"""
from __future__ import annotations

import functools
import os

import numpy as np

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)
from numba import cuda, float32, float64, int32, int64, uint16, uint32, uint64

from numba_ep.interop import cupy_c_contiguous, is_cupy, is_torch
from numba_ep.kernels import ptx
from numba_ep.kernels.waits import KERNEL_IDS, record_timeout, timed_out

__all__ = [
    "LowLatencyContext",
    "clean_low_latency_buffer",
    "low_latency_dispatch",
    "low_latency_combine",
    "next_combine_buffer",
    "dispatch_kernels",
    "combine_kernels",
    "fused_kernel",
    "with_fused",
    "MAX_TOPK",
]

THREADS = 512                  # 16 warps per block in every phase kernel
WARPS = THREADS // 32
FULL = 0xFFFFFFFF
MAX_TOPK = 16                  # a send block gives one warp to each top-k slot of a token
MAX_LOCAL_EXPERTS = 4096       # combine send keeps a prefix over local experts in shared memory
LOGFMT_MAX_HIDDEN = 16384      # LogFMT keeps per-division metadata in shared memory
CHUNKS = 2                     # combine send splits each BF16 row between two warps

_DISPATCH = KERNEL_IDS["low_latency_dispatch"]
_COMBINE = KERNEL_IDS["low_latency_combine"]


# ---------------------------------------------------------------------------------------------
# Intrinsics to move into ptx.py (the lead moves them; nothing else here is PTX)
# ---------------------------------------------------------------------------------------------

if ptx.SIMULATOR:  # pragma: no cover - the simulator cannot run these kernels anyway
    def rint_f32(x):
        """Simulator twin of rint_f32: round half to even."""
        return np.float32(np.rint(np.float32(x)))
else:
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.cuda.extending import intrinsic as _intrinsic

    @_intrinsic
    def rint_f32(typingctx, x):
        """rint_f32(x) -> float32: emits ``cvt.rni.f32.f32``: round to the nearest integer,
        ties to even (what LogFMT-10's encoder needs; ``floor(x + 0.5)`` differs on ties)."""
        sig = _types.float32(_types.float32)

        def codegen(context, builder, signature, args):
            fnty = _ir.FunctionType(_ir.FloatType(), [_ir.FloatType()])
            asm = _ir.InlineAsm(fnty, "cvt.rni.f32.f32 $0, $1;", "=f,f")
            return builder.call(asm, [args[0]])

        return sig, codegen


# ---------------------------------------------------------------------------------------------
# Device helpers: copies
# ---------------------------------------------------------------------------------------------

@cuda.jit(device=True, inline=True)
def _ld16(addr, immutable):
    if immutable:
        return ptx.ld_nc_v4(addr)
    return ptx.ld_v4(addr)


@cuda.jit(device=True, inline=True)
def _wcopy16(dst, src, i0, i1, lane, immutable):
    """Warp copy of the 16-byte vectors ``[i0, i1)`` with no-allocate stores. Loads are coherent
    (data written earlier by this block, or acquired from a peer) unless ``immutable`` (inputs no
    kernel writes while this one runs: the non-coherent path). Each lane issues eight predicated
    loads before its first store, so a 7 KB message costs two memory round trips instead of one
    per vector; the eight vectors stay in registers."""
    buf = cuda.local.array((8, 4), uint32)
    base = i0
    while base < i1:
        for q in range(8):
            i = base + q * 32 + lane
            if i < i1:
                a0, a1, a2, a3 = _ld16(src + uint64(i * 16), immutable)
                buf[q, 0] = a0
                buf[q, 1] = a1
                buf[q, 2] = a2
                buf[q, 3] = a3
        for q in range(8):
            i = base + q * 32 + lane
            if i < i1:
                ptx.st_na_v4(dst + uint64(i * 16), buf[q, 0], buf[q, 1], buf[q, 2], buf[q, 3])
        base += 256


@cuda.jit(device=True, inline=True)
def _wcopy4(dst, src, i0, i1, lane):
    """Warp copy of 4-byte words ``[i0, i1)``, four in flight per lane: the path for hidden sizes
    that are not a multiple of 512, where the layout's rows are only 4-byte aligned."""
    s = ptx.ptr_u32(src)
    d = ptx.ptr_u32(dst)
    i = i0 + lane
    while i + 96 < i1:
        a = s[i]
        b = s[i + 32]
        c = s[i + 64]
        e = s[i + 96]
        d[i] = a
        d[i + 32] = b
        d[i + 64] = c
        d[i + 96] = e
        i += 128
    while i < i1:
        d[i] = s[i]
        i += 32


@cuda.jit(device=True, inline=True)
def _st16(addr, a, b, c, d, vec16):
    """Store 16 bytes: one vector store where the layout is 16-byte aligned (vec16, a
    compile-time constant of the caller), four word stores where it is only 4-byte aligned."""
    if vec16:
        ptx.st_v4(addr, a, b, c, d)
    else:
        p = ptx.ptr_u32(addr)
        p[0] = a
        p[1] = b
        p[2] = c
        p[3] = d


@cuda.jit(device=True, inline=True)
def _warp_inclusive_sum(v, lane):
    for delta in (1, 2, 4, 8, 16):
        o = cuda.shfl_up_sync(FULL, v, delta)
        if lane >= delta:
            v += o
    return v


# ---------------------------------------------------------------------------------------------
# Device helpers: FP8 cast (bit-exact with reference.per_token_cast_to_fp8)
# ---------------------------------------------------------------------------------------------

@cuda.jit(device=True, inline=True)
def _bf16_mag_max4(a, b, c, d):
    """Largest magnitude (bits of |v|, as int32) of the eight bf16 in four 32-bit words. For
    finite values the integer order of magnitude bits is the order of the values."""
    m = max(int32(a & uint32(0x7FFF)), int32((a >> uint32(16)) & uint32(0x7FFF)))
    m = max(m, max(int32(b & uint32(0x7FFF)), int32((b >> uint32(16)) & uint32(0x7FFF))))
    m = max(m, max(int32(c & uint32(0x7FFF)), int32((c >> uint32(16)) & uint32(0x7FFF))))
    m = max(m, max(int32(d & uint32(0x7FFF)), int32((d >> uint32(16)) & uint32(0x7FFF))))
    return m


@cuda.jit(device=True, inline=True)
def _e4m3x4(a, b, scale):
    """Four bf16 (two words) times ``scale`` -> four e4m3 bytes in one word, array order."""
    x0, x1 = ptx.bf16x2_to_f32x2(a)
    x2, x3 = ptx.bf16x2_to_f32x2(b)
    lo = uint32(ptx.cvt_e4m3x2(x0 * scale, x1 * scale))
    hi = uint32(ptx.cvt_e4m3x2(x2 * scale, x3 * scale))
    return lo | (hi << uint32(16))


@cuda.jit(device=True, inline=True)
def _fp8_scales(amax, round_scale):
    """(scale, scale_inv) of one 128-channel block, exactly as the reference computes them."""
    amax = max(amax, float32(1e-4))
    if round_scale:
        q = amax / float32(448.0)
        bits = ptx.bitcast_f32_u32(q)
        e = int32((bits >> uint32(23)) & uint32(0xFF)) - 127
        if (bits & uint32(0x7FFFFF)) != 0:
            e += 1
        scale_inv = ptx.bitcast_u32_f32(uint32(e + 127) << uint32(23))
        scale = ptx.bitcast_u32_f32(uint32(127 - e) << uint32(23))
    else:
        scale_inv = amax / float32(448.0)
        scale = float32(448.0) / amax
    return scale, scale_inv


# ---------------------------------------------------------------------------------------------
# Device helpers: LogFMT-10 (codes bit-exact with reference.logfmt10_encode)
# ---------------------------------------------------------------------------------------------

def log2_table() -> np.ndarray:
    """float64 log2(1 + m/128), m < 128: with it ``_log2_mag`` is the exact float32 log2 of every
    bf16 magnitude (tests/test_low_latency_compile.py checks all 32639 finite ones)."""
    return np.log2(1.0 + np.arange(128, dtype=np.float64) / 128.0)


@cuda.jit(device=True, inline=True)
def _log2_mag(mag, tab):
    """float32 log2 of the positive finite bf16 whose magnitude bits are ``mag`` (int32),
    correctly rounded: float32(exponent + log2(1 + mantissa/128)) with the sum in float64."""
    ex = mag >> 7
    m = mag & 127
    if ex == 0:  # subnormal: m * 2^-133, normalise the mantissa
        p = 31 - cuda.clz(int32(m))
        e = p - 133
        mm = (m << (7 - p)) & 127
    else:
        e = ex - 127
        mm = m
    return float32(float64(e) + tab[mm])


@cuda.jit(device=True, inline=True)
def _logfmt_params(amax_bits, amin_bits, tab):
    """(encoded, log_amin, inv_step, step) of a division from its bf16 (amax, amin) bits, as
    reference.logfmt10_params; sender and receiver both derive them, so both agree on the
    division's size without a flag on the wire."""
    if amax_bits == 0 or amax_bits >= 0x7F80:  # all zero, or inf/NaN inside: send raw
        return False, float32(0), float32(0), float32(0)
    la = _log2_mag(amax_bits, tab)
    lm = la - float32(32.0)
    lmin = lm
    if amin_bits != 0:
        lmin = max(_log2_mag(amin_bits, tab), lm)
    enc = la < float32(0) and lmin < la
    d = la - lmin
    if not enc:
        return False, lmin, float32(0), float32(0)
    return True, lmin, float32(510.0) / d, d / float32(510.0)


@cuda.jit(device=True)
def _logfmt_code(bits, lmin, inv_step, tab):
    """9-bit magnitude code of one bf16 (bits) in an encoded division."""
    mag = int32(bits & 0x7FFF)
    if mag == 0:
        return int32(0)
    t = (_log2_mag(mag, tab) - lmin) * inv_step
    r = rint_f32(t)
    if not (r > float32(-1.0)):
        return int32(0)
    return int32(1) + int32(min(r, float32(510.0)))


@cuda.jit(device=True, inline=True)
def _logfmt_pack8(a, b, c, d, lmin, inv_step, tab):
    """Codes of 8 bf16 (four words) as (low 64 bits, high 8 bits, 8 sign bits): value i's 9-bit
    magnitude at bit 9i of a 72-bit integer."""
    lo = uint64(0)
    signs = int32(0)
    m = _logfmt_code(a & uint32(0xFFFF), lmin, inv_step, tab)
    lo |= uint64(m)
    m = _logfmt_code(a >> uint32(16), lmin, inv_step, tab)
    lo |= uint64(m) << uint64(9)
    m = _logfmt_code(b & uint32(0xFFFF), lmin, inv_step, tab)
    lo |= uint64(m) << uint64(18)
    m = _logfmt_code(b >> uint32(16), lmin, inv_step, tab)
    lo |= uint64(m) << uint64(27)
    m = _logfmt_code(c & uint32(0xFFFF), lmin, inv_step, tab)
    lo |= uint64(m) << uint64(36)
    m = _logfmt_code(c >> uint32(16), lmin, inv_step, tab)
    lo |= uint64(m) << uint64(45)
    m = _logfmt_code(d & uint32(0xFFFF), lmin, inv_step, tab)
    lo |= uint64(m) << uint64(54)
    m7 = _logfmt_code(d >> uint32(16), lmin, inv_step, tab)
    lo |= uint64(m7 & 1) << uint64(63)
    hi = int32(m7 >> 1)
    # sign of value i = bit 15 of its bf16: bits 15 and 31 of each word
    signs = _sign_pair(a) | (_sign_pair(b) << 2) | (_sign_pair(c) << 4) | (_sign_pair(d) << 6)
    return lo, hi, signs


@cuda.jit(device=True, inline=True)
def _sign_pair(w):
    """The sign bits of the two bf16 in a word, low value first, as a 2-bit int32."""
    return int32((w >> uint32(15)) & uint32(1)) | (int32((w >> uint32(31)) & uint32(1)) << 1)


@cuda.jit(device=True, inline=True)
def _logfmt_value(code, signs, i, lmin, step):
    """Decoded float32 of magnitude code ``code`` with sign bit ``i`` of ``signs``."""
    v = float32(0)
    if code != 0:
        v = ptx.ex2_approx(float32(code - 1) * step + lmin)
    if (signs >> uint32(i)) & uint32(1):
        v = -v
    return v


# ---------------------------------------------------------------------------------------------
# Dispatch, send phase
# ---------------------------------------------------------------------------------------------

def _make_last_block_takes_over(use_nvshmem):
    """Step 3 of both send kernels, in one place: a device function that every thread of every
    block calls once its stores are issued, and that returns True in the one block that drew the
    last ticket, which then publishes the counts (dispatch) or flags (combine).

    Release chain: every thread's stores -> block barrier -> thread 0's system-scope fence (it
    is cumulative: the barrier put the whole block's stores before it) + ticket atomic -> the
    last block's thread 0 draws the last ticket (it has seen all G increments), fences again
    (acquire) -> (NVSHMEM path: quiet, which completes this PE's puts) -> barrier -> zero the
    other half's ``num_sig`` signal words -> barrier. The caller then publishes from ONE warp
    (``publish_warp``), which fences first: its relaxed system-scope stores are releases that
    the receivers' ld.acquire.sys pair with. One fence per block and one more in the last
    block's publishing warp, where a fence per thread (one MEMBAR.SYS per warp, 16 a block)
    was paid before: cooperative groups' grid sync and NCCL's flag posts rest on the same
    barrier-then-one-fence pattern. ``last`` is the kernel's ``int32[1]`` shared array."""
    if use_nvshmem:
        import nvshmem.bindings.device.numba as nvb

    @cuda.jit(device=True, inline=True)
    def last_block_takes_over(ws_addr, last, tid, base, other_sig_off, num_sig):
        cuda.syncthreads()
        if tid == 0:
            ptx.fence_acq_rel_sys()  # after the barrier: the whole block's stores, then the ticket
            done = ptx.atomic_add_gpu_i32(ws_addr, 1)
            is_last = done == cuda.gridDim.x - 1
            if is_last:
                ptx.fence_acq_rel_sys()   # acquire: every block's stores, through their tickets
                if use_nvshmem:
                    nvb.quiet()
            last[0] = 1 if is_last else 0
        cuda.syncthreads()
        if last[0] == 0:
            return False
        other = ptx.ptr_i32(base + uint64(other_sig_off))
        i = tid
        while i < num_sig:
            other[i] = 0       # the other half's signals, for the next call
            i += THREADS
        cuda.syncthreads()
        return True

    return last_block_takes_over


@cuda.jit(device=True, inline=True)
def publish_warp(warp):
    """True in the one warp of the last block that publishes counts or flags, after its release
    fence (cumulative over the block's barrier that precedes it in the caller)."""
    if warp != 0:
        return False
    ptx.fence_acq_rel_sys()
    return True


DISPATCH_SEND_SIG = ("void(uint64, uint64, int32, int32, uint64, uint64, int64, int64, int64, "
                     "int64, uint64)")


def make_dispatch_send(num_ranks, num_experts, hidden, num_topk, max_tokens, use_fp8,
                       round_scale, vec16, use_nvshmem):
    """Arguments: x (bf16 [T, H]), topk_idx (int64 [T, K]), T, rank, peer table (uint64 [R]),
    my symmetric base, send/recv/sig/other-sig offsets of this call's half, workspace."""
    R, E, H, K, M = num_ranks, num_experts, hidden, num_topk, max_tokens
    L = E // R
    S = H // 128
    MSG = 16 + 2 * H                                   # reference dispatch_msg_bytes
    USED = 16 + H + 4 * S if use_fp8 else 16 + 2 * H   # bytes of a message actually sent
    N16 = (USED + 15) // 16
    N4 = (USED + 3) // 4
    UNITS = H // 16                                    # FP8: 16 channels per lane, 8 lanes/scale
    ROW16 = H // 8                                     # BF16: 16-byte vectors per row
    if use_nvshmem:
        import nvshmem.bindings.device.numba as nvb
    last_block_takes_over = _make_last_block_takes_over(use_nvshmem)

    def dispatch_send(x_addr, topk_addr, num_tokens, rank, bufs_addr, base, send_off, recv_off,
                      sig_off, other_sig_off, ws_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        last = cuda.shared.array(1, int32)
        bufs = ptx.ptr_u64(bufs_addr)
        topk = ptx.ptr_i64(topk_addr)
        ws = ptx.ptr_i32(ws_addr)

        t = cuda.blockIdx.x
        while t < num_tokens:
            msg = base + uint64(send_off + int64(t) * MSG)
            row = x_addr + uint64(int64(t) * (2 * H))
            if tid == 0:
                _st16(msg, uint32(t), uint32(0), uint32(0), uint32(0), vec16)
            # 1. The row into msg[t]: FP8 with one scale per 128 channels, or BF16 as is.
            if use_fp8:
                ubase = 0
                while ubase + warp * 32 < UNITS:          # warp-uniform: shuffles see 32 lanes
                    u = ubase + tid
                    ok = u < UNITS
                    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = uint32(0)
                    if ok:
                        a0, a1, a2, a3 = ptx.ld_nc_v4(row + uint64(u * 32))
                        b0, b1, b2, b3 = ptx.ld_nc_v4(row + uint64(u * 32 + 16))
                    m = max(_bf16_mag_max4(a0, a1, a2, a3), _bf16_mag_max4(b0, b1, b2, b3))
                    m = max(m, cuda.shfl_xor_sync(FULL, m, 4))
                    m = max(m, cuda.shfl_xor_sync(FULL, m, 2))
                    m = max(m, cuda.shfl_xor_sync(FULL, m, 1))
                    scale, scale_inv = _fp8_scales(ptx.bf16_to_f32(uint16(m)), round_scale)
                    if ok:
                        _st16(msg + uint64(16 + u * 16), _e4m3x4(a0, a1, scale),
                              _e4m3x4(a2, a3, scale), _e4m3x4(b0, b1, scale),
                              _e4m3x4(b2, b3, scale), vec16)
                        if (u & 7) == 0:
                            ptx.ptr_f32(msg + uint64(16 + H))[u >> 3] = scale_inv
                    ubase += THREADS
            else:
                i = tid
                while i < ROW16:
                    a0, a1, a2, a3 = ptx.ld_nc_v4(row + uint64(i * 16))
                    _st16(msg + uint64(16 + i * 16), a0, a1, a2, a3, vec16)
                    i += THREADS
            if use_nvshmem:
                ptx.fence_acq_rel_sys()   # the NIC may read msg[t]: make it visible system-wide
            cuda.syncthreads()

            # 2. Warp k sends slot k: take the next free slot of expert e, store the message.
            k = warp
            while k < K:
                e = topk[int64(t) * K + k]
                if e >= 0:
                    slot = int32(0)
                    if lane == 0:
                        slot = ptx.atomic_add_gpu_i32(ws_addr + uint64(4 * (1 + e)), 1)
                    slot = cuda.shfl_sync(FULL, slot, 0)
                    if slot < M:  # more than M hits on one expert (duplicate ids) are dropped
                        dst = int32(e // L)
                        le = int64(e - dst * L)
                        off = recv_off + ((le * R + rank) * M + slot) * MSG
                        peer = bufs[dst]
                        if peer != 0:
                            if vec16:
                                _wcopy16(peer + uint64(off), msg, 0, N16, lane, False)
                            else:
                                _wcopy4(peer + uint64(off), msg, 0, N4, lane)
                        elif use_nvshmem:
                            nvb.uint8_put_nbi_warp(ptx.ptr_u8(base + uint64(off)), ptx.ptr_u8(msg),
                                                   uint64(N16 * 16), int32(dst))
                k += WARPS
            t += cuda.gridDim.x

        # 3. The last block to finish publishes the counts (one relaxed system-scope store per
        #    count after the takeover's fences: a release).
        if last_block_takes_over(ws_addr, last, tid, base, other_sig_off, E):
            if publish_warp(warp):
                e = lane
                while e < E:
                    n = min(ptx.ld_volatile_i32(ws_addr + uint64(4 * (1 + e))), M)
                    ws[1 + e] = 0
                    dst = int32(e // L)
                    off = sig_off + 4 * ((e - dst * L) * R + rank)
                    peer = bufs[dst]
                    if peer != 0:
                        ptx.st_relaxed_sys_i32(peer + uint64(off), -n - 1)
                    elif use_nvshmem:
                        nvb.int_p(ptx.ptr_i32(base + uint64(off)), int32(-n - 1), int32(dst))
                    e += 32
            if tid == 0:
                ws[0] = 0

    return dispatch_send


# ---------------------------------------------------------------------------------------------
# Dispatch, receive phase
# ---------------------------------------------------------------------------------------------

DISPATCH_RECV_SIG = ("void(int32, uint64, int64, int64, uint64, uint64, uint64, uint64, uint64, "
                     "uint64, uint64, int64, uint64)")


def make_dispatch_recv(num_ranks, num_experts, hidden, max_tokens, use_fp8, use_ue8m0, vec16):
    """Arguments: rank, my symmetric base, recv/sig offsets of the half, packed_recv_x,
    packed_recv_x_scales (column-major storage [L, S, R*M]), src_info, layout_range, recv_count,
    cumulative stats (0 = none), wait-cost stats (int64 [R], ns, 0 = none), timeout_ns,
    err_addr."""
    R, E, H, M = num_ranks, num_experts, hidden, max_tokens
    L = E // R
    R1 = R + 1                           # shared-array sizes must be plain constants
    RM = R * M
    S = H // 128
    S4 = S // 4
    MSG = 16 + 2 * H
    ROWB = H if use_fp8 else 2 * H       # bytes of one packed_recv_x row
    DATA16 = ROWB // 16
    DATA4 = ROWB // 4

    def dispatch_recv(rank, base, recv_off, sig_off, out_x, out_scales, out_src, out_layout,
                      out_count, stats_addr, wait_addr, timeout_ns, err_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        cnt = cuda.shared.array(R, int32)
        pre = cuda.shared.array(R1, int32)
        src_info = ptx.ptr_i32(out_src)
        layout = ptx.ptr_i64(out_layout)

        le = cuda.blockIdx.x
        while le < L:
            # 1. How many messages each source sent to local expert le (one thread per source).
            s = tid
            while s < R:
                addr = base + uint64(sig_off + 4 * (le * R + s))
                start = ptx.globaltimer()
                v = ptx.ld_acquire_sys_i32(addr)
                while v == 0:
                    if timed_out(start, timeout_ns):
                        record_timeout(err_addr, _DISPATCH, rank, s, le, 1, 0,
                                       ptx.globaltimer() - start)
                        v = -1     # give up: treat as an empty block
                        break
                    v = ptx.ld_acquire_sys_i32(addr)
                if wait_addr != 0:
                    # Time spent waiting for source s, summed over my experts (DeepEP counts
                    # clock cycles; nanoseconds read the same across GPUs and clocks).
                    ptx.atomic_add_gpu_u64(wait_addr + uint64(8 * s), ptx.globaltimer() - start)
                cnt[s] = min(max(-v - 1, 0), M)
                s += THREADS
            cuda.syncthreads()
            if tid == 0:
                acc = int32(0)
                for r in range(R):
                    pre[r] = acc
                    layout[le * R + r] = (int64(acc) << 32) | int64(cnt[r])
                    acc += cnt[r]
                pre[R] = acc
                ptx.ptr_i32(out_count)[le] = acc
                if stats_addr != 0:
                    ptx.atomic_add_gpu_i32(stats_addr + uint64(4 * le), acc)
            cuda.syncthreads()

            # 2. Unpack: source blocks in rank order, a warp per message.
            total = pre[R]
            j = warp
            while j < total:
                src = 0
                while pre[src + 1] <= j:
                    src += 1
                slot = base + uint64(recv_off + (int64(le * R + src) * M + (j - pre[src])) * MSG)
                row = int64(le) * RM + j
                if vec16:
                    _wcopy16(out_x + uint64(row * ROWB), slot + uint64(16), 0, DATA16, lane, False)
                else:
                    _wcopy4(out_x + uint64(row * ROWB), slot + uint64(16), 0, DATA4, lane)
                if lane == 0:
                    src_info[row] = ptx.ptr_i32(slot)[0]
                if use_fp8:
                    scales = ptx.ptr_f32(slot + uint64(16 + H))
                    if use_ue8m0:
                        q = lane
                        while q < S4:
                            word = uint32(0)
                            for b in range(4):
                                bits = ptx.bitcast_f32_u32(scales[4 * q + b])
                                word |= ((bits >> uint32(23)) & uint32(0xFF)) << uint32(8 * b)
                            ptx.ptr_u32(out_scales)[(int64(le) * S4 + q) * RM + j] = word
                            q += 32
                    else:
                        q = lane
                        while q < S:
                            ptx.ptr_f32(out_scales)[(int64(le) * S + q) * RM + j] = scales[q]
                            q += 32
                j += WARPS
            cuda.syncthreads()
            le += cuda.gridDim.x

    return dispatch_recv


# ---------------------------------------------------------------------------------------------
# Combine, send phase
# ---------------------------------------------------------------------------------------------

COMBINE_SEND_SIG = ("void(uint64, uint64, uint64, int32, uint64, uint64, int64, int64, int64, "
                    "int64, uint64, uint64)")


def make_combine_send(num_ranks, num_experts, hidden, max_tokens, use_logfmt, zero_copy, vec16,
                      use_nvshmem):
    """Arguments: x (bf16 [L, R*M, H]; unused with zero_copy), src_info, layout_range, rank,
    peer table, my symmetric base, send/recv/sig/other-sig offsets, workspace, log2 table."""
    R, E, H, M = num_ranks, num_experts, hidden, max_tokens
    L = E // R
    L1 = L + 1                               # shared-array sizes must be plain constants
    RM = R * M
    D = H // 128
    CMSG = 4 * D + 2 * H                     # reference combine_msg_bytes
    ROW16 = H // 8
    ROW4 = H // 2
    NCH = 1 if use_logfmt else CHUNKS
    CH16 = (ROW16 + NCH - 1) // NCH
    CH4 = (ROW4 + NCH - 1) // NCH
    META_D = D if use_logfmt else 1
    TAB = 128 if use_logfmt else 1
    if use_nvshmem:
        import nvshmem.bindings.device.numba as nvb
    encode_row = _make_logfmt_encoder(H, vec16) if use_logfmt else None
    last_block_takes_over = _make_last_block_takes_over(use_nvshmem)

    def combine_send(x_addr, src_addr, layout_addr, rank, bufs_addr, base, send_off, recv_off,
                     sig_off, other_sig_off, ws_addr, tab_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        pre = cuda.shared.array(L1, int32)
        last = cuda.shared.array(1, int32)
        meta = cuda.shared.array((WARPS, META_D), int32)
        offs = cuda.shared.array((WARPS, META_D), int32)
        tab = cuda.shared.array(TAB, float64)
        bufs = ptx.ptr_u64(bufs_addr)
        layout = ptx.ptr_i64(layout_addr)
        src_info = ptx.ptr_i32(src_addr)
        if use_logfmt:
            if tid < 128:
                tab[tid] = ptx.ptr_f64(tab_addr)[tid]

        # 1. Rows received per local expert, and their prefix (every block computes it).
        le = tid
        while le < L:
            n = int64(0)
            for s in range(R):
                n += layout[le * R + s] & 0xFFFFFFFF
            pre[le + 1] = int32(n)
            le += THREADS
        if tid == 0:
            pre[0] = 0
        cuda.syncthreads()
        if warp == 0:
            carry = int32(0)
            c0 = 0
            while c0 < L:
                v = int32(0)
                if c0 + lane < L:
                    v = pre[c0 + lane + 1]
                inc = _warp_inclusive_sum(v, lane)
                if c0 + lane < L:
                    pre[c0 + lane + 1] = carry + inc
                carry += cuda.shfl_sync(FULL, inc, 31)
                c0 += 32
        cuda.syncthreads()

        # 2. Every (row, chunk) of my received rows: back to its source rank, at slot
        #    (my global expert, its token index).
        units = pre[L] * NCH
        u = cuda.blockIdx.x * WARPS + warp
        while u < units:
            r = u // NCH
            c = u - r * NCH
            lo = 0
            hi = L
            while hi - lo > 1:
                mid = (lo + hi) >> 1
                if pre[mid] <= r:
                    lo = mid
                else:
                    hi = mid
            le = lo
            j = r - pre[le]
            dst = int32(0)
            for s in range(R):
                v = layout[le * R + s]
                b = int32(v >> 32)
                if j >= b and j < b + int32(v & 0xFFFFFFFF):
                    dst = int32(s)
            t = src_info[int64(le) * RM + j]
            slot_off = recv_off + (int64(rank * L + le) * M + t) * CMSG
            staged = base + uint64(send_off + (int64(le) * RM + j) * CMSG)
            if zero_copy:
                src_row = staged
            else:
                src_row = x_addr + uint64((int64(le) * RM + j) * (2 * H))
            peer = bufs[dst]
            if use_logfmt:
                target = staged
                if peer != 0:
                    target = peer + uint64(slot_off)
                nbytes = encode_row(target, src_row, lane, warp, meta, offs, tab)
                if peer == 0:
                    if use_nvshmem:
                        ptx.fence_acq_rel_sys()
                        cuda.syncwarp(FULL)
                        nvb.uint8_put_nbi_warp(ptx.ptr_u8(base + uint64(slot_off)),
                                               ptx.ptr_u8(staged), uint64(nbytes), int32(dst))
            elif peer != 0:
                if vec16:
                    i0 = c * CH16
                    i1 = min(i0 + CH16, ROW16)
                    # The zero-copy buffer was written by the caller's kernels on this stream;
                    # x is a plain input.
                    _wcopy16(peer + uint64(slot_off), src_row, i0, i1, lane, not zero_copy)
                else:
                    i0 = c * CH4
                    _wcopy4(peer + uint64(slot_off), src_row, i0, min(i0 + CH4, ROW4), lane)
            elif use_nvshmem:
                i0 = c * CH4
                i1 = min(i0 + CH4, ROW4)
                if zero_copy:
                    pass  # the row is already in the (symmetric) send buffer
                else:
                    _wcopy4(staged, src_row, i0, i1, lane)
                    ptx.fence_acq_rel_sys()
                    cuda.syncwarp(FULL)
                nvb.uint8_put_nbi_warp(ptx.ptr_u8(base + uint64(slot_off + i0 * 4)),
                                       ptx.ptr_u8(staged + uint64(i0 * 4)),
                                       uint64((i1 - i0) * 4), int32(dst))
            u += cuda.gridDim.x * WARPS

        # 3. The last block (the other half's signals zeroed): flag[me] = 1 at every rank.
        if last_block_takes_over(ws_addr, last, tid, base, other_sig_off, E):
            if publish_warp(warp):
                d = lane
                while d < R:
                    peer = bufs[d]
                    if peer != 0:
                        ptx.st_relaxed_sys_i32(peer + uint64(sig_off + 4 * rank), 1)
                    elif use_nvshmem:
                        nvb.int_p(ptx.ptr_i32(base + uint64(sig_off + 4 * rank)), int32(1),
                                  int32(d))
                    d += 32
            if tid == 0:
                ptx.ptr_i32(ws_addr)[0] = 0

    return combine_send


def _make_logfmt_encoder(hidden, vec16):
    """Device function encoding one bf16 row (a warp) into the LogFMT-10 wire format at ``dst``;
    returns the bytes written. Pass 1 takes each division's (amax, amin); then sizes, offsets and
    the meta words; pass 2 re-reads the row (from L1) and writes codes or raw bf16."""
    H = hidden
    D = H // 128

    @cuda.jit(device=True, inline=True)
    def encode_row(dst, src, lane, warp, meta, offs, tab):
        half = lane >> 4
        sub = lane & 15
        # pass 1: per division the largest and smallest non-zero magnitude (16 lanes each)
        d0 = 0
        while d0 < D:
            d = d0 + half
            mx = int32(0)
            mn = int32(0xFFFF)
            if d < D:
                a0, a1, a2, a3 = ptx.ld_nc_v4(src + uint64((d * 16 + sub) * 16))
                mx = _bf16_mag_max4(a0, a1, a2, a3)
                for w in (a0, a1, a2, a3):
                    lo = int32(w & uint32(0x7FFF))
                    hi = int32((w >> uint32(16)) & uint32(0x7FFF))
                    if lo != 0:
                        mn = min(mn, lo)
                    if hi != 0:
                        mn = min(mn, hi)
            for delta in (8, 4, 2, 1):
                mx = max(mx, cuda.shfl_xor_sync(FULL, mx, delta))
                mn = min(mn, cuda.shfl_xor_sync(FULL, mn, delta))
            if sub == 0 and d < D:
                if mn == 0xFFFF:
                    mn = 0
                meta[warp, d] = mx | (mn << 16)
            d0 += 2
        cuda.syncwarp(FULL)
        # sizes -> offsets; the meta words go to the head of the row
        carry = int32(0)
        d0 = 0
        while d0 < D:
            d = d0 + lane
            size = int32(0)
            if d < D:
                m = meta[warp, d]
                enc, lmin, inv_step, step = _logfmt_params(m & 0xFFFF, (m >> 16) & 0xFFFF, tab)
                size = 160 if enc else 256
                ptx.ptr_u32(dst)[d] = uint32(m)
            inc = _warp_inclusive_sum(size, lane)
            if d < D:
                offs[warp, d] = carry + inc - size
            carry += cuda.shfl_sync(FULL, inc, 31)
            d0 += 32
        cuda.syncwarp(FULL)
        # pass 2: codes (a lane pair per 16 values) or raw bf16
        d0 = 0
        while d0 < D:
            d = d0 + half
            a0 = a1 = a2 = a3 = uint32(0)
            enc = False
            lmin = inv_step = float32(0)
            payload = dst
            if d < D:
                a0, a1, a2, a3 = ptx.ld_nc_v4(src + uint64((d * 16 + sub) * 16))
                m = meta[warp, d]
                enc, lmin, inv_step, step = _logfmt_params(m & 0xFFFF, (m >> 16) & 0xFFFF, tab)
                payload = dst + uint64(4 * D + offs[warp, d])
            lo = uint64(0)
            hi = int32(0)
            signs = int32(0)
            if enc:
                lo, hi, signs = _logfmt_pack8(a0, a1, a2, a3, lmin, inv_step, tab)
            other_lo = cuda.shfl_xor_sync(FULL, int32(lo & uint64(0xFFFFFFFF)), 1)
            other_signs = cuda.shfl_xor_sync(FULL, signs, 1)
            if d < D:
                if enc:
                    g = ptx.ptr_u32(payload + uint64(20 * (sub >> 1)))
                    if (sub & 1) == 0:
                        g[0] = uint32(lo & uint64(0xFFFFFFFF))
                        g[1] = uint32(lo >> uint64(32))
                        g[2] = uint32(hi) | (uint32(other_lo) << uint32(8))
                    else:
                        g[3] = uint32((lo >> uint64(24)) & uint64(0xFFFFFFFF))
                        g[4] = (uint32(lo >> uint64(56)) | (uint32(hi) << uint32(8))
                                | (uint32(other_signs) << uint32(16))
                                | (uint32(signs) << uint32(24)))
                else:
                    _st16(payload + uint64(16 * sub), a0, a1, a2, a3, vec16)
            d0 += 2
        return 4 * D + carry

    return encode_row


# ---------------------------------------------------------------------------------------------
# Combine, receive phase
# ---------------------------------------------------------------------------------------------

COMBINE_RECV_SIG = ("void(uint64, uint64, uint64, int32, int32, uint64, int64, int64, uint64, "
                    "uint64, int64, uint64)")


def make_combine_recv(num_ranks, num_experts, hidden, num_topk, max_tokens, use_logfmt, vec16):
    """Arguments: topk_idx (int64 [T, K]), topk_weights (float32 [T, K]), out (bf16 [T, H]), T,
    rank, my symmetric base, recv/sig offsets of the half, log2 table, wait-cost stats (int64
    [R], ns, 0 = none), timeout_ns, err_addr."""
    R, E, H, K, M = num_ranks, num_experts, hidden, num_topk, max_tokens
    D = H // 128
    CMSG = 4 * D + 2 * H
    ROW16 = H // 8
    KD = K * D if use_logfmt else 1
    TAB = 128 if use_logfmt else 1

    def combine_recv(topk_addr, w_addr, out_addr, num_tokens, rank, base, recv_off, sig_off,
                     tab_addr, wait_addr, timeout_ns, err_addr):
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        experts = cuda.shared.array(K, int64)
        weights = cuda.shared.array(K, float32)
        offs = cuda.shared.array(KD, int32)       # LogFMT: payload offset * 2 + encoded
        lmins = cuda.shared.array(KD, float32)
        steps = cuda.shared.array(KD, float32)
        tab = cuda.shared.array(TAB, float64)
        if use_logfmt:
            if tid < 128:
                tab[tid] = ptx.ptr_f64(tab_addr)[tid]

        # 1. Every rank has stored all the rows it owes me (also with no tokens: see the top).
        s = tid
        while s < R:
            addr = base + uint64(sig_off + 4 * s)
            start = ptx.globaltimer()
            v = ptx.ld_acquire_sys_i32(addr)
            while v == 0:
                if timed_out(start, timeout_ns):
                    record_timeout(err_addr, _COMBINE, rank, s, -1, 1, 0,
                                   ptx.globaltimer() - start)
                    break
                v = ptx.ld_acquire_sys_i32(addr)
            if wait_addr != 0 and cuda.blockIdx.x == 0:
                # Every block waits for the same flags: count block 0's wait once.
                ptx.atomic_add_gpu_u64(wait_addr + uint64(8 * s), ptx.globaltimer() - start)
            s += THREADS
        cuda.syncthreads()

        # 2. A block per token: out[t] = sum over valid k of w_k * row[e_k][t].
        t = cuda.blockIdx.x
        while t < num_tokens:
            if tid < K:
                e = ptx.ptr_i64(topk_addr)[int64(t) * K + tid]
                experts[tid] = e
                weights[tid] = ptx.ptr_f32(w_addr)[int64(t) * K + tid] if e >= 0 else float32(0)
            cuda.syncthreads()
            if use_logfmt:
                k = warp
                while k < K:
                    e = experts[k]
                    if e >= 0:
                        slot = base + uint64(recv_off + (e * M + t) * CMSG)
                        carry = int32(0)
                        d0 = 0
                        while d0 < D:
                            d = d0 + lane
                            size = int32(0)
                            enc = False
                            if d < D:
                                m = ptx.ptr_u32(slot)[d]
                                enc, lmin, inv_step, step = _logfmt_params(
                                    int32(m & uint32(0xFFFF)), int32(m >> uint32(16)), tab)
                                size = 160 if enc else 256
                                lmins[k * D + d] = lmin
                                steps[k * D + d] = step
                            inc = _warp_inclusive_sum(size, lane)
                            if d < D:
                                offs[k * D + d] = (carry + inc - size) * 2 + (1 if enc else 0)
                            carry += cuda.shfl_sync(FULL, inc, 31)
                            d0 += 32
                    k += WARPS
                cuda.syncthreads()
            j = tid
            while j < ROW16:
                acc = cuda.local.array(8, float32)
                for q in range(8):
                    acc[q] = float32(0)
                if use_logfmt:
                    d = j >> 4
                    sub = j & 15
                    for k in range(K):
                        e = experts[k]
                        if e >= 0:
                            w = weights[k]
                            slot = base + uint64(recv_off + (e * M + t) * CMSG)
                            o = offs[k * D + d]
                            payload = slot + uint64(4 * D + (o >> 1))
                            if (o & 1) != 0:
                                g = ptx.ptr_u32(payload + uint64(20 * (sub >> 1)))
                                w0 = g[0]
                                w1 = g[1]
                                w2 = g[2]
                                w3 = g[3]
                                w4 = g[4]
                                if (sub & 1) == 0:
                                    bits = uint64(w0) | (uint64(w1) << uint64(32))
                                    top = w2 & uint32(0xFF)
                                    sg = w4 >> uint32(16)
                                else:
                                    bits = (uint64(w2 >> uint32(8)) | (uint64(w3) << uint64(24))
                                            | (uint64(w4) << uint64(56)))
                                    top = (w4 >> uint32(8)) & uint32(0xFF)
                                    sg = w4 >> uint32(24)
                                lmin = lmins[k * D + d]
                                step = steps[k * D + d]
                                for q in range(7):
                                    code = int32((bits >> uint64(9 * q)) & uint64(0x1FF))
                                    acc[q] += w * _logfmt_value(code, sg, q, lmin, step)
                                code = int32(bits >> uint64(63)) | int32(top << uint32(1))
                                acc[7] += w * _logfmt_value(code, sg, 7, lmin, step)
                            else:
                                p = ptx.ptr_u32(payload + uint64(16 * sub))
                                for q in range(4):
                                    lo, hi = ptx.bf16x2_to_f32x2(p[q])
                                    acc[2 * q] += w * lo
                                    acc[2 * q + 1] += w * hi
                else:
                    # all K loads first, then the sums: K rows in flight per thread
                    vals = cuda.local.array((K, 4), uint32)
                    for k in range(K):
                        e = experts[k]
                        if e >= 0:
                            src = base + uint64(recv_off + (e * M + t) * CMSG + j * 16)
                            if vec16:
                                a0, a1, a2, a3 = ptx.ld_v4(src)
                            else:
                                p = ptx.ptr_u32(src)
                                a0 = p[0]
                                a1 = p[1]
                                a2 = p[2]
                                a3 = p[3]
                            vals[k, 0] = a0
                            vals[k, 1] = a1
                            vals[k, 2] = a2
                            vals[k, 3] = a3
                        else:
                            for q in range(4):
                                vals[k, q] = uint32(0)
                    for k in range(K):
                        if experts[k] >= 0:
                            w = weights[k]
                            for q in range(4):
                                lo, hi = ptx.bf16x2_to_f32x2(vals[k, q])
                                acc[2 * q] += w * lo
                                acc[2 * q + 1] += w * hi
                ptx.st_v4(out_addr + uint64((int64(t) * ROW16 + j) * 16),
                          ptx.cvt_bf16x2(acc[0], acc[1]), ptx.cvt_bf16x2(acc[2], acc[3]),
                          ptx.cvt_bf16x2(acc[4], acc[5]), ptx.cvt_bf16x2(acc[6], acc[7]))
                j += THREADS
            cuda.syncthreads()
            t += cuda.gridDim.x

    return combine_recv


# ---------------------------------------------------------------------------------------------
# One launch per call: send and receive phases in one cooperative kernel
# ---------------------------------------------------------------------------------------------
#
# Without a hook the two phases of a call need not be two launches: one kernel runs a block's
# share of the send phase, then its share of the receive phase (both are grid-stride loops, so
# any grid size works for each). What the boundary between two launches gave for free must then
# come from the launch: a receiving block spins until the LAST send block of every peer (this
# rank included) has published its counts or flags, so every block of the grid must be resident
# at once, or a spinning block could hold the SM a not-yet-started send block needs. A
# cooperative launch guarantees that (the driver refuses a grid that does not fit), and the host
# sizes the grid from the kernel's occupancy. No grid-wide barrier is needed between the phases:
# the publish -> acquire pairs of the two-launch design already order them.
#
# Saved: one launch on the host (~4-6 us of the eager step) and one kernel boundary on the GPU.
# The phases' static shared arrays add up in one kernel (numba cannot alias them), so a call
# whose two phases need more than FUSED_SHARED_LIMIT bytes keeps two launches.
#
# Arguments: the send kernel's, then the receive kernel's (the shared scalars, rank and offsets,
# appear twice), so the host builds each list once for either mode.

FUSED_SHARED_LIMIT = 40 * 1024   # static shared memory is capped at 48 KB a block

DISPATCH_SIG = DISPATCH_SEND_SIG[:-1] + ", " + DISPATCH_RECV_SIG[len("void("):]
COMBINE_SIG = COMBINE_SEND_SIG[:-1] + ", " + COMBINE_RECV_SIG[len("void("):]


def make_dispatch(num_ranks, num_experts, hidden, num_topk, max_tokens, use_fp8, round_scale,
                  use_ue8m0, vec16, use_nvshmem):
    """Dispatch in one launch: ``make_dispatch_send``'s arguments, then
    ``make_dispatch_recv``'s."""
    send = cuda.jit(device=True, inline=True)(make_dispatch_send(
        num_ranks, num_experts, hidden, num_topk, max_tokens, use_fp8, round_scale, vec16,
        use_nvshmem))
    recv = cuda.jit(device=True, inline=True)(make_dispatch_recv(
        num_ranks, num_experts, hidden, max_tokens, use_fp8, use_ue8m0, vec16))

    def dispatch(x_addr, topk_addr, num_tokens, rank, bufs_addr, base, send_off, recv_off,
                 sig_off, other_sig_off, ws_addr, r_rank, r_base, r_recv_off, r_sig_off, out_x,
                 out_scales, out_src, out_layout, out_count, stats_addr, wait_addr, timeout_ns,
                 err_addr):
        send(x_addr, topk_addr, num_tokens, rank, bufs_addr, base, send_off, recv_off, sig_off,
             other_sig_off, ws_addr)
        cuda.syncthreads()
        recv(r_rank, r_base, r_recv_off, r_sig_off, out_x, out_scales, out_src, out_layout,
             out_count, stats_addr, wait_addr, timeout_ns, err_addr)

    return dispatch


def make_combine(num_ranks, num_experts, hidden, num_topk, max_tokens, use_logfmt, zero_copy,
                 vec16, use_nvshmem):
    """Combine in one launch: ``make_combine_send``'s arguments, then
    ``make_combine_recv``'s."""
    send = cuda.jit(device=True, inline=True)(make_combine_send(
        num_ranks, num_experts, hidden, max_tokens, use_logfmt, zero_copy, vec16, use_nvshmem))
    recv = cuda.jit(device=True, inline=True)(make_combine_recv(
        num_ranks, num_experts, hidden, num_topk, max_tokens, use_logfmt, vec16))

    def combine(x_addr, src_addr, layout_addr, rank, bufs_addr, base, send_off, recv_off, sig_off,
                other_sig_off, ws_addr, tab_addr, topk_addr, w_addr, out_addr, num_tokens, r_rank,
                r_base, r_recv_off, r_sig_off, r_tab_addr, wait_addr, timeout_ns, err_addr):
        send(x_addr, src_addr, layout_addr, rank, bufs_addr, base, send_off, recv_off, sig_off,
             other_sig_off, ws_addr, tab_addr)
        cuda.syncthreads()
        recv(topk_addr, w_addr, out_addr, num_tokens, r_rank, r_base, r_recv_off, r_sig_off,
             r_tab_addr, wait_addr, timeout_ns, err_addr)

    return combine


def _static_shared_bytes(factory, c):
    """Bytes of the static shared arrays a phase kernel declares (mirrors the factories above;
    a test compares it with the compiled kernels)."""
    R, E, H = c["num_ranks"], c["num_experts"], c["hidden"]
    L, D = E // R, H // 128
    if factory is make_dispatch_send:
        return 4
    if factory is make_dispatch_recv:
        return 4 * R + 4 * (R + 1)
    logfmt = c["use_logfmt"]
    tab = 8 * (128 if logfmt else 1)
    if factory is make_combine_send:
        return 4 * (L + 1) + 4 + 2 * 4 * WARPS * (D if logfmt else 1) + tab
    if factory is make_combine_recv:
        K = c["num_topk"]
        return 8 * K + 4 * K + 3 * 4 * (K * D if logfmt else 1) + tab
    raise ValueError(f"factory: not a low-latency phase kernel: {factory!r}")


def fused_kernel(specs):
    """The one-launch spec ``(factory, signature, get_kernel keywords)`` for a call's
    ``[send spec, recv spec]`` (from ``dispatch_kernels`` / ``combine_kernels``), or None when
    the two phases' shared arrays together pass FUSED_SHARED_LIMIT. The launch bound makes
    ptxas keep registers low enough for a 512-thread block to be resident."""
    (send_f, _, send_c), (_, _, recv_c) = specs
    if sum(_static_shared_bytes(f, c) for f, _, c in specs) > FUSED_SHARED_LIMIT:
        return None
    if send_f is make_dispatch_send:
        return (make_dispatch, DISPATCH_SIG,
                dict(send_c, use_ue8m0=recv_c["use_ue8m0"], launch_bounds=THREADS))
    return (make_combine, COMBINE_SIG,
            dict(send_c, num_topk=recv_c["num_topk"], launch_bounds=THREADS))


def with_fused(specs):
    """``specs`` (a call's send and recv specs) plus its one-launch spec when there is one:
    every kernel a call with these options may launch (for compiling ahead of time)."""
    fused = fused_kernel(specs)
    return list(specs) + ([fused] if fused is not None else [])


# ---------------------------------------------------------------------------------------------
# clean_low_latency_buffer
# ---------------------------------------------------------------------------------------------

CLEAN_SIG = "void(uint64, int64, uint64, int32)"


def make_clean():
    """Arguments: address and int32 count of the signal words (both halves), workspace and its
    int32 count. Zeroes them; the host brackets it with NVSHMEM barriers."""

    def clean(sig_addr, num_sig, ws_addr, num_ws):
        i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        sig = ptx.ptr_i32(sig_addr)
        ws = ptx.ptr_i32(ws_addr)
        k = int64(i)
        while k < num_sig:
            sig[k] = 0
            k += stride
        k = int64(i)
        while k < num_ws:
            ws[k] = 0
            k += stride

    return clean


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

def _int(name, v, minimum):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return int(v)


class LowLatencyContext:
    """What every low-latency launch needs: the symmetric buffer and its layout, the half the
    next call uses, the peer table, the workspace and the timeout record.

    Args:
        sym_buffer: a ``numba_ep.memory.SymmetricBuffer`` (or anything with ``ptr``, ``nbytes``,
            ``peer_ptrs`` [R] (0 = not NVLink-mapped), ``peer_ptrs_dev`` (CuPy uint64 [R]) and
            ``local`` (CuPy uint8 view of this rank's copy)) of at least
            ``reference.get_low_latency_rdma_size_hint(M, H, R, E)`` bytes.
        rank, num_ranks: this rank and the EP group size ``R`` (the NVSHMEM PEs).
        num_max_dispatch_tokens_per_rank: ``M``, the same on every rank; ``T <= M`` per call.
        hidden: ``H``, a multiple of 128 (multiples of 512 take the 16-byte vector path).
        num_experts: ``E``, a multiple of ``R``, at most 4096 per rank.
        timeout_s: how long a receive phase waits for a peer before giving up and recording
            which peer it waited for (the next call, or ``check()``, raises CommTimeoutError).
            None: env ``NUMBA_EP_TIMEOUT_S`` or 100 s.
        num_sms: blocks of the grid-wide phases (default: the device's SM count).
        transport: ``"auto"`` (default; env ``NUMBA_EP_LL_TRANSPORT`` overrides): NVLink stores
            to the peers NVSHMEM maps, NVSHMEM puts to the others; ``"nvshmem"``: NVSHMEM puts
            and signals to every other rank, as to peers on other nodes, so that the network
            path can be tested on one host (NVSHMEM then moves the data over NVLink itself).
        fuse: a call without a receive hook runs both phases in one cooperative launch
            (default True; env ``NUMBA_EP_LL_FUSE=0`` turns it off); False: two launches, as
            in hook mode. The attribute of the same name may be changed between calls.

    Construction validates and computes the layout only; device state (workspace, error
    record, tables) is created on the first launch. The buffer must be zero (a new
    SymmetricBuffer is) or cleaned with ``clean_low_latency_buffer`` (collective) after any
    other use. All ranks must make the same sequence of low-latency calls.
    """

    def __init__(self, sym_buffer, rank, num_ranks, num_max_dispatch_tokens_per_rank, hidden,
                 num_experts, timeout_s=None, num_sms=None, transport=None, fuse=None):
        from numba_ep import reference
        from numba_ep.kernels.waits import timeout_ns

        R = _int("num_ranks", num_ranks, 1)
        self.rank = _int("rank", rank, 0)
        if self.rank >= R:
            raise ValueError(f"rank: expected a rank in [0, {R}), got {rank}")
        M = _int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, 1)
        H = _int("hidden", hidden, 128)
        E = _int("num_experts", num_experts, 1)
        if H % 128:
            raise ValueError(f"hidden: expected a multiple of 128, got {H}")
        if E % R:
            raise ValueError(f"num_experts: expected a multiple of num_ranks={R}, got {E}")
        if E // R > MAX_LOCAL_EXPERTS:
            raise ValueError(f"num_experts: at most {MAX_LOCAL_EXPERTS} experts per rank, got "
                             f"{E // R}")
        for attr in ("ptr", "nbytes", "peer_ptrs"):
            if not hasattr(sym_buffer, attr):
                raise TypeError(f"sym_buffer: expected a numba_ep.memory.SymmetricBuffer (no "
                                f"'{attr}' on {type(sym_buffer).__name__})")
        need = reference.get_low_latency_rdma_size_hint(M, H, R, E)
        if int(sym_buffer.nbytes) < need:
            raise ValueError(
                f"sym_buffer: low-latency mode with M={M}, H={H}, R={R}, E={E} needs "
                f"{need} bytes (get_low_latency_rdma_size_hint), the buffer has "
                f"{int(sym_buffer.nbytes)}")
        peers = [int(p) for p in sym_buffer.peer_ptrs]
        if len(peers) != R:
            raise ValueError(f"sym_buffer: peer_ptrs has {len(peers)} entries, num_ranks is {R}")
        if peers[self.rank] != int(sym_buffer.ptr):
            raise ValueError("sym_buffer: peer_ptrs[rank] must be the buffer's own address")
        if num_sms is not None:
            num_sms = _int("num_sms", num_sms, 1)
        if transport is None:
            transport = os.environ.get("NUMBA_EP_LL_TRANSPORT", "").strip() or "auto"
        if transport not in ("auto", "nvshmem"):
            raise ValueError(f"transport: expected 'auto' or 'nvshmem' (or env "
                             f"NUMBA_EP_LL_TRANSPORT), got {transport!r}")
        if transport == "nvshmem":  # every other rank as if unmapped (address 0)
            peers = [p if r == self.rank else 0 for r, p in enumerate(peers)]
        if fuse is None:
            env = os.environ.get("NUMBA_EP_LL_FUSE", "").strip()
            if env not in ("", "0", "1"):
                raise ValueError(f"NUMBA_EP_LL_FUSE: expected 0 or 1, got {env!r}")
            fuse = env != "0"
        if not isinstance(fuse, (bool, np.bool_)):
            raise TypeError(f"fuse: expected a bool, got {type(fuse).__name__}")

        self.buffer = sym_buffer
        self.transport = transport
        self.num_ranks, self.num_experts = R, E
        self.num_max_dispatch_tokens_per_rank = M
        self.hidden = H
        self.num_local_experts = E // R
        self.layout = lay = reference.low_latency_layout(M, H, R, E)
        #: byte offsets (send, recv, signal, other half's signal) of half 0 and half 1
        self._halves = tuple((lay["send_offsets"][h], lay["recv_offsets"][h],
                              lay["signal_offsets"][h], lay["signal_offsets"][1 - h])
                             for h in (0, 1))
        self.base = int(sym_buffer.ptr)
        self.peer_ptrs = peers
        #: some peer is not NVLink-mapped: the send kernels are the NVSHMEM specialisation
        self.use_nvshmem = any(p == 0 for p in peers)
        #: every row and slot of the layout is 16-byte aligned (H % 512 == 0)
        self.vec16 = H % 512 == 0
        #: the half (0 or 1) the next dispatch or combine uses; flips on every call
        self.buffer_idx = 0
        self.timeout_s = timeout_s
        self.timeout_ns = timeout_ns(timeout_s)
        #: calls without a hook run as one cooperative launch (see make_dispatch)
        self.fuse = bool(fuse)
        self._num_sms = num_sms
        self._ready = False
        self._kernels = {}      # call options -> (send, recv, one-launch or None), _kernels_for
        self.errors = None
        self.workspace = None
        self.bufs = 0

    def _prepare(self):
        """Device state, created on the first launch (on the current CUDA device)."""
        if self._ready:
            return
        import cupy

        from numba_ep.kernels.waits import error_record

        peer_table = None
        if self.transport == "auto":  # the buffer's own table holds the NVLink addresses
            peer_table = getattr(self.buffer, "peer_ptrs_dev", None)
        if peer_table is None:
            peer_table = cupy.asarray(np.asarray(self.peer_ptrs, dtype=np.uint64))
        if self._num_sms is None:
            self._num_sms = int(cupy.cuda.Device().attributes["MultiProcessorCount"])
        self._set_device_state(error_record(), peer_table,
                               cupy.zeros(1 + self.num_experts, dtype=cupy.int32),
                               cupy.asarray(log2_table()))

    def _set_device_state(self, errors, peer_table, workspace, log2):
        """Keep the device objects every launch passes, and their addresses: the launches read
        these attributes, not the objects (an eager call's host time is what decoding waits
        for). Tests hand in fakes here."""
        self.errors, self._peer_table, self.workspace, self._log2 = (errors, peer_table,
                                                                      workspace, log2)
        self.bufs = _addr(peer_table)
        self.errors_addr = int(errors.device_address)
        self.workspace_addr = _addr(workspace)
        self.log2_addr = _addr(log2)
        self._ready = True

    @property
    def num_sms(self):
        if self._num_sms is None:
            self._prepare()
        return self._num_sms

    def check(self):
        """Raise CommTimeoutError if a kernel recorded a timeout (a host read, no sync)."""
        if self.errors is not None:
            self.errors.check()

    def __repr__(self):
        return (f"LowLatencyContext(rank={self.rank}/{self.num_ranks}, "
                f"M={self.num_max_dispatch_tokens_per_rank}, H={self.hidden}, "
                f"E={self.num_experts}, half={self.buffer_idx}, nvshmem={self.use_nvshmem})")


# Kernel specifications: the one place that turns a call's options into kernel constants.

def dispatch_kernels(ctx, num_topk, use_fp8=True, round_scale=False, use_ue8m0=False):
    """``[(factory, signature, constants)]`` of the send and receive kernels of a dispatch."""
    common = dict(num_ranks=ctx.num_ranks, num_experts=ctx.num_experts, hidden=ctx.hidden,
                  max_tokens=ctx.num_max_dispatch_tokens_per_rank, use_fp8=bool(use_fp8),
                  vec16=ctx.vec16)
    return [(make_dispatch_send, DISPATCH_SEND_SIG,
             dict(common, num_topk=int(num_topk), round_scale=bool(round_scale) and bool(use_fp8),
                  use_nvshmem=ctx.use_nvshmem)),
            (make_dispatch_recv, DISPATCH_RECV_SIG,
             dict(common, use_ue8m0=bool(use_ue8m0) and bool(use_fp8)))]


def combine_kernels(ctx, num_topk, use_logfmt=False, zero_copy=False):
    """``[(factory, signature, constants)]`` of the send and receive kernels of a combine."""
    common = dict(num_ranks=ctx.num_ranks, num_experts=ctx.num_experts, hidden=ctx.hidden,
                  max_tokens=ctx.num_max_dispatch_tokens_per_rank, use_logfmt=bool(use_logfmt),
                  vec16=ctx.vec16)
    return [(make_combine_send, COMBINE_SEND_SIG,
             dict(common, zero_copy=bool(zero_copy), use_nvshmem=ctx.use_nvshmem)),
            (make_combine_recv, COMBINE_RECV_SIG, dict(common, num_topk=int(num_topk)))]


def _get(spec):
    from numba_ep.launch import get_kernel

    factory, sig, constants = spec
    return get_kernel(factory, sig, **constants)


class _Kernels:
    """The kernels of one kind of call: ``send`` and ``recv`` (two launches: hook mode, or
    ``fuse=False``) and ``fused`` (one launch; None when it would not fit). Each is compiled
    or loaded on first use, so a caller that never uses hooks never builds the phase kernels."""

    def __init__(self, specs):
        self._specs = specs

    @functools.cached_property
    def send(self):
        return _get(self._specs[0])

    @functools.cached_property
    def recv(self):
        return _get(self._specs[1])

    @functools.cached_property
    def fused(self):
        spec = fused_kernel(self._specs)
        return None if spec is None else _get(spec)

    @functools.cached_property
    def fused_max_grid(self):
        """The largest grid of ``fused`` whose blocks are all resident at once (a cooperative
        launch needs that). A context, and so its kernels, stays on one device."""
        return self.fused.max_resident_blocks(THREADS)


def _kernels_for(ctx, kind, *options):
    """The ``_Kernels`` of a ``kind`` ("dispatch" / "combine") call with these options,
    memoised on the context: the specs hold ~10 constants, too many to rebuild every call."""
    key = (kind,) + options
    ks = ctx._kernels.get(key)
    if ks is None:
        specs = dispatch_kernels(ctx, *options) if kind == "dispatch" else combine_kernels(
            ctx, *options)
        ks = ctx._kernels[key] = _Kernels(specs)
    return ks


def _launch_call(ctx, ks, send_grid, send_args, recv_grid, recv_args, return_recv_hook, stream,
                 what):
    """Launch a call's phases: with a hook, the send phase now and the receive phase when the
    hook is called; without, one cooperative launch of both (``ctx.fuse``, when the kernel
    fits) or two launches back to back. Returns the hook or None."""
    if not return_recv_hook and ctx.fuse:
        fused = ks.fused
        if fused is not None:
            grid = min(max(send_grid, recv_grid), ks.fused_max_grid)
            fused.launch(grid, THREADS, *send_args, *recv_args, stream=stream, cooperative=True)
            return None
    ks.send.launch(send_grid, THREADS, *send_args, stream=stream)

    def launch_recv(s):
        ks.recv.launch(recv_grid, THREADS, *recv_args, stream=s)

    if return_recv_hook:
        return _Hook(launch_recv, stream, what)
    launch_recv(stream)
    return None


# Argument checks work on anything with __cuda_array_interface__ (CuPy, torch, numba), so
# that they run, and can be tested, before any device work.

def _cai(name, a):
    try:
        iface = a.__cuda_array_interface__
    except AttributeError:
        raise TypeError(f"{name}: expected a CUDA array (CuPy, or anything with "
                        f"__cuda_array_interface__), got {type(a).__name__}") from None
    return iface


def _meta(name, a):
    """(shape, dtype, byte strides or None when C-contiguous, address) of a device array.

    CuPy arrays are read directly: building ``__cuda_array_interface__`` asks the runtime for
    the current stream and costs several microseconds, on every call of a latency-bound API."""
    if is_cupy(a):
        return a.shape, a.dtype, None if cupy_c_contiguous(a) else a.strides, a.data.ptr
    iface = _cai(name, a)
    return (tuple(int(v) for v in iface["shape"]), np.dtype(iface["typestr"]),
            iface.get("strides"), int(iface["data"][0]))


def _check(name, a, dtypes, ndim=None, shape=None, contiguous=True, align=None):
    """Validate a device array (dtype, shape, C order, address alignment); return its address.
    Rows of x and out are moved with 16-byte vector accesses, hence ``align=16`` for them."""
    got_shape, dtype, strides, ptr = _meta(name, a)
    if dtype not in dtypes:
        want = " or ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {dtype}")
    if ndim is not None and len(got_shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {got_shape}")
    if shape is not None and got_shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {got_shape}")
    if contiguous and strides is not None:
        step = dtype.itemsize
        for n, st in zip(reversed(got_shape), reversed(strides)):
            if n > 1 and st != step:
                raise ValueError(f"{name}: expected a C-contiguous array, got strides "
                                 f"{tuple(strides)}")
            step *= n
    _check_aligned(name, ptr, dtype.itemsize if align is None else align)
    return ptr


def _check_aligned(name, ptr, align):
    if ptr % align:
        raise ValueError(f"{name}: the data address must be a multiple of {align} bytes, got "
                         f"0x{ptr:x}")


def _shape(a):
    if is_cupy(a):
        return a.shape
    return tuple(int(v) for v in a.__cuda_array_interface__["shape"])


def _addr(a):
    if a is None:
        return 0
    if is_cupy(a):
        return a.data.ptr
    if is_torch(a):   # the Buffer passes torch tensors through (checked=True)
        return a.data_ptr()
    return int(a.__cuda_array_interface__["data"][0])


def _cupy_empty(shape, dtype):
    import cupy

    return cupy.empty(shape, dtype=dtype)


def _check_topk(topk_idx, num_tokens=None):
    _check("topk_idx", topk_idx, (np.int64,), ndim=2)
    T, K = _shape(topk_idx)
    if num_tokens is not None and T != num_tokens:
        raise ValueError(f"topk_idx: expected {num_tokens} rows (one per token of x), got {T}")
    if not 1 <= K <= MAX_TOPK:
        raise ValueError(f"topk_idx: top-k must be in [1, {MAX_TOPK}], got {K}")
    return T, K


def _check_hook_flag(return_recv_hook):
    if not isinstance(return_recv_hook, (bool, np.bool_)):
        raise TypeError(f"return_recv_hook: expected a bool, got {type(return_recv_hook).__name__}")


def clean_low_latency_buffer(ctx, stream=None, host_barrier=None):
    """Zero both halves' signal words and the workspace between two barriers. Collective: every
    rank calls it. Needed after other kernels used the buffer, after a timeout, or to restart a
    sequence of calls; resets the half index to 0.

    The barriers are NVSHMEM barriers on ``stream`` (the host does not wait; capturable in a
    CUDA graph), or with ``host_barrier`` (a callable that returns once every rank called it,
    e.g. a group's ``barrier``) host waits: this PE's puts completed and ``stream`` drained,
    then ``host_barrier()``, before and after the clean kernel. NVSHMEM's barriers never time
    out, so a rank that never comes leaves the stream waiting for ever; a group's barrier
    raises instead, naming it."""
    import cupy
    import nvshmem.bindings as nvb

    from numba_ep.launch import stream_handle

    ctx._prepare()
    lay = ctx.layout
    h = stream_handle(stream)

    def barrier():
        if host_barrier is None:
            nvb.barrier_all_on_stream(h)
        else:
            nvb.quiet_on_stream(h)   # local: no peer waits
            cupy.cuda.runtime.streamSynchronize(h)
            host_barrier()

    barrier()
    _get((make_clean, CLEAN_SIG, {})).launch(
        32, 256, ctx.base + lay["signal_offsets"][0], 2 * lay["signal_bytes"] // 4,
        _addr(ctx.workspace), ctx.workspace.size, stream=stream)
    barrier()
    ctx.buffer_idx = 0


class _Hook:
    """The receive phase of one call; calling it (once) launches it."""

    def __init__(self, launch, stream, what):
        self._launch = launch
        self._stream = stream
        self._what = what
        self.called = False

    def __call__(self, stream=None):
        """Launch the receive phase on ``stream`` (default: the call's stream)."""
        if self.called:
            raise RuntimeError(f"{self._what}: the receive hook was already called")
        self.called = True
        self._launch(self._stream if stream is None else stream)

    def __repr__(self):
        return f"<{self._what} receive hook{' (done)' if self.called else ''}>"


def low_latency_dispatch(ctx, x, topk_idx, use_fp8=True, round_scale=False, use_ue8m0=False,
                         cumulative_local_expert_recv_stats=None, return_recv_hook=False,
                         stream=None, wait_recv_cost_stats=None, checked=False, empty=None):
    """Send every (token, top-k slot) to its expert's rank; receive the tokens of my experts.

    Args:
        ctx: the LowLatencyContext (M, H, E, R come from it).
        x: ``[T, H]`` bf16 bits (uint16 or int16), C-contiguous, ``0 <= T <= M``.
        topk_idx: ``[T, K]`` int64 global expert ids in ``[-1, E)`` (-1: none),
            ``1 <= K <= 16``. Ids are not range-checked on the device.
        use_fp8: quantise to float8_e4m3fn with one float32 scale per 128 channels (else BF16).
        round_scale: every scale a power of two. use_ue8m0: return the scales as packed UE8M0
            exponents (needs use_fp8, round_scale and ``H % 512 == 0``).
        cumulative_local_expert_recv_stats: optional int32 ``[L]``, incremented by the number of
            tokens each local expert received.
        wait_recv_cost_stats: optional int64 ``[R]``: entry r grows by the nanoseconds the
            receive phase spent waiting for rank r's tokens, summed over my local experts
            (DeepEP's dispatch_wait_recv_cost_stats, which counts clock cycles instead).
        return_recv_hook: launch only the send phase and return a hook that launches the
            receive phase (call it before the next low-latency call).
        stream: CuPy/torch/cuda.core stream or handle (default: CuPy's current stream).
        checked: the caller (``Buffer``) has checked every argument already (CuPy arrays or
            CUDA torch tensors), and the error record; only the addresses' alignment is
            checked here.
        empty: ``empty(shape, dtype)`` allocates each output on the caller's stream, dtype in
            the CuPy convention below (the Buffer hands torch callers torch tensors this way);
            default ``cupy.empty`` on CuPy's current stream.

    Returns ``(recv_x, recv_x_scales, recv_count, src_info, layout_range, hook)``, arrays made
    by ``empty`` (CuPy arrays by default):
        recv_x ``[L, R*M, H]`` uint8 (e4m3 bytes) or uint16 (bf16 bits); recv_x_scales
        ``[L, R*M, H/128]`` float32 or ``[L, R*M, H/512]`` int32 (UE8M0), a transposed view of
        column-major storage ``[L, S, R*M]``, or None for BF16; recv_count ``[L]`` int32;
        src_info ``[L, R*M]`` int32 (token index at the source rank); layout_range ``[L, R]``
        int64 = ``(begin << 32) | count`` with source blocks in rank order; hook or None.
        Only the first recv_count[i] rows of expert i are written. All are filled once the
        receive phase has run on ``stream``; nothing here waits on the host.
    """
    R, E, H, M, L = (ctx.num_ranks, ctx.num_experts, ctx.hidden,
                     ctx.num_max_dispatch_tokens_per_rank, ctx.num_local_experts)
    stats = cumulative_local_expert_recv_stats
    if checked:
        T, K = x.shape[0], topk_idx.shape[1]
        _check_aligned("x", _addr(x), 16)
    else:
        _check("x", x, (np.uint16, np.int16), ndim=2, align=16)
        T, hx = _shape(x)
        if hx != H:
            raise ValueError(f"x: expected hidden size {H} (the context's), got shape {(T, hx)}")
        if T > M:
            raise ValueError(f"x: {T} tokens, more than num_max_dispatch_tokens_per_rank={M}")
        _, K = _check_topk(topk_idx, T)
        if use_ue8m0 and not (round_scale and use_fp8):
            raise ValueError("use_ue8m0=True needs use_fp8=True and round_scale=True")
        if use_ue8m0 and H % 512:
            raise ValueError(f"use_ue8m0=True needs a hidden size that is a multiple of 512, "
                             f"got {H}")
        if stats is not None:
            _check("cumulative_local_expert_recv_stats", stats, (np.int32,), shape=(L,))
        if wait_recv_cost_stats is not None:
            _check("wait_recv_cost_stats", wait_recv_cost_stats, (np.int64,), shape=(R,))
        _check_hook_flag(return_recv_hook)
    use_fp8, round_scale, use_ue8m0 = bool(use_fp8), bool(round_scale), bool(use_ue8m0)

    ctx._prepare()
    if not checked:   # (the Buffer checked the error record already)
        ctx.check()
    RM = R * M
    S = H // 128
    empty = _cupy_empty if empty is None else empty
    recv_x = empty((L, RM, H), np.uint8 if use_fp8 else np.uint16)
    scales = None
    if use_fp8:
        scales = empty((L, S // 4, RM) if use_ue8m0 else (L, S, RM),
                       np.int32 if use_ue8m0 else np.float32)
    recv_count = empty((L,), np.int32)
    src_info = empty((L, RM), np.int32)
    layout_range = empty((L, R), np.int64)

    h = ctx.buffer_idx
    ctx.buffer_idx ^= 1
    send_off, recv_off, sig_off, other_sig_off = ctx._halves[h]
    hook = _launch_call(
        ctx, _kernels_for(ctx, "dispatch", K, use_fp8, round_scale, use_ue8m0),
        max(1, min(T, ctx._num_sms)),
        (_addr(x), _addr(topk_idx), T, ctx.rank, ctx.bufs, ctx.base, send_off, recv_off, sig_off,
         other_sig_off, ctx.workspace_addr),
        L,
        (ctx.rank, ctx.base, recv_off, sig_off, _addr(recv_x), _addr(scales), _addr(src_info),
         _addr(layout_range), _addr(recv_count), _addr(stats), _addr(wait_recv_cost_stats),
         ctx.timeout_ns, ctx.errors_addr),
        return_recv_hook, stream, "low_latency_dispatch")
    scales_view = None if scales is None else scales.swapaxes(1, 2)
    return recv_x, scales_view, recv_count, src_info, layout_range, hook


def next_combine_buffer(ctx):
    """The send rows of the half the next low-latency call uses: a CuPy uint16 (bf16 bits)
    view ``[L, R*M, H]`` with row stride ``H + H/128*2`` elements, on the symmetric buffer.
    Write the expert outputs here, then call ``low_latency_combine(..., zero_copy=True)`` as the
    very next low-latency call (passing this view as x) to skip one copy."""
    import cupy

    L, R, M, H = (ctx.num_local_experts, ctx.num_ranks, ctx.num_max_dispatch_tokens_per_rank,
                  ctx.hidden)
    local = getattr(ctx.buffer, "local", None)
    if local is None:
        raise TypeError("next_combine_buffer: the context's buffer has no CuPy 'local' view")
    cmsg = ctx.layout["combine_msg_bytes"]
    send_off = ctx.layout["send_offsets"][ctx.buffer_idx]
    ptr = local.data + (ctx.base - int(local.data.ptr) + send_off)
    return cupy.ndarray((L, R * M, H), dtype=cupy.uint16, memptr=ptr,
                        strides=(R * M * cmsg, cmsg, 2))


def low_latency_combine(ctx, x, topk_idx, topk_weights, src_info, layout_range, use_logfmt=False,
                        zero_copy=False, out=None, return_recv_hook=False, stream=None,
                        wait_recv_cost_stats=None, checked=False, empty=None):
    """Send my experts' outputs back to the tokens' ranks; take each token's weighted sum.

    Args:
        ctx: the LowLatencyContext.
        x: ``[L, R*M, H]`` bf16 bits (uint16/int16), C-contiguous: my local experts' outputs in
            the packed layout of the matching dispatch (only rows below recv_count are read).
            With ``zero_copy`` the outputs must already be in ``next_combine_buffer(ctx)`` and x
            (normally that view) is only shape-checked.
        topk_idx: ``[T, K]`` int64, this rank's ORIGINAL routing (the dispatch's topk_idx).
        topk_weights: ``[T, K]`` float32.
        src_info ``[L, R*M]`` int32, layout_range ``[L, R]`` int64: from the dispatch.
        use_logfmt: LogFMT-10 on the wire (``H <= 16384``; not with zero_copy).
        zero_copy: see x.
        out: optional ``[T, H]`` uint16/int16 output, written in place.
        return_recv_hook, stream: as in low_latency_dispatch.
        wait_recv_cost_stats: optional int64 ``[R]``: entry r grows by the nanoseconds the
            receive phase waited for rank r's rows (DeepEP's combine_wait_recv_cost_stats,
            in clock cycles there).
        checked, empty: as in low_latency_dispatch.

    Returns ``(out [T, H] bf16 bits, hook or None)``:
    ``out[t] = bf16(sum over k with topk_idx[t, k] >= 0 of topk_weights[t, k] * y[t, k])`` where
    ``y[t, k]`` is the output row of expert ``topk_idx[t, k]`` for token t, summed in float32
    (k ascending). A token listing the same expert twice gets one of the two rows twice.
    """
    R, E, H, M, L = (ctx.num_ranks, ctx.num_experts, ctx.hidden,
                     ctx.num_max_dispatch_tokens_per_rank, ctx.num_local_experts)
    RM = R * M
    use_logfmt, zero_copy = bool(use_logfmt), bool(zero_copy)
    if checked:
        T, K = topk_idx.shape
        _check_aligned("x", _addr(x), 2 if zero_copy else 16)
        if out is not None:
            _check_aligned("out", _addr(out), 16)
    else:
        if use_logfmt and zero_copy:
            raise ValueError("use_logfmt=True cannot be combined with zero_copy=True")
        if use_logfmt and H > LOGFMT_MAX_HIDDEN:
            raise ValueError(f"use_logfmt=True supports hidden sizes up to {LOGFMT_MAX_HIDDEN}, "
                             f"got {H}")
        _check("x", x, (np.uint16, np.int16), shape=(L, RM, H), contiguous=not zero_copy,
               align=2 if zero_copy else 16)
        T, K = _check_topk(topk_idx)
        if T > M:
            raise ValueError(f"topk_idx: {T} tokens, more than num_max_dispatch_tokens_per_rank="
                             f"{M}")
        _check("topk_weights", topk_weights, (np.float32,), shape=(T, K))
        _check("src_info", src_info, (np.int32,), shape=(L, RM))
        _check("layout_range", layout_range, (np.int64,), shape=(L, R))
        if out is not None:
            _check("out", out, (np.uint16, np.int16), shape=(T, H), align=16)
        if wait_recv_cost_stats is not None:
            _check("wait_recv_cost_stats", wait_recv_cost_stats, (np.int64,), shape=(R,))
        _check_hook_flag(return_recv_hook)

    ctx._prepare()
    if not checked:   # (the Buffer checked the error record already)
        ctx.check()
    if out is None:
        out = (_cupy_empty if empty is None else empty)((T, H), np.uint16)
    h = ctx.buffer_idx
    ctx.buffer_idx ^= 1
    send_off, recv_off, sig_off, other_sig_off = ctx._halves[h]
    hook = _launch_call(
        ctx, _kernels_for(ctx, "combine", K, use_logfmt, zero_copy),
        ctx._num_sms,
        (0 if zero_copy else _addr(x), _addr(src_info), _addr(layout_range), ctx.rank, ctx.bufs,
         ctx.base, send_off, recv_off, sig_off, other_sig_off, ctx.workspace_addr,
         ctx.log2_addr),
        max(1, min(T, ctx._num_sms)),
        (_addr(topk_idx), _addr(topk_weights), _addr(out), T, ctx.rank, ctx.base, recv_off,
         sig_off, ctx.log2_addr, _addr(wait_recv_cost_stats), ctx.timeout_ns,
         ctx.errors_addr),
        return_recv_hook, stream, "low_latency_combine")
    return out, hook
