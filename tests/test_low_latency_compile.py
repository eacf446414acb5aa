"""CPU-only checks of numba_ep.kernels.low_latency (no GPU needed).

- Every kernel specialisation compiles for sm_90 (numba -> PTX, then ptxas through nvJitLink),
  and its PTX holds the instructions the design relies on: the FP8 cast, acquire/release
  signalling, 16-byte vector copies, bounded waits, registers (not local memory) for the
  combine's eight rows in flight.
- The NVSHMEM specialisation of the send kernels (chosen when a peer is not NVLink-mapped)
  compiles and links NVSHMEM's device code (slow: ~10 s a kernel).
- The LogFMT-10 device arithmetic, emulated in NumPy with the kernel's own formulas, matches
  the reference: exact log2 of every bf16 magnitude, and the lane-pair bit packing.
- Host-side validation raises clear errors before any device work.
"""
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)
from numba_ep import reference as ref
from numba_ep.kernels import ptx as P

pytestmark = pytest.mark.skipif(P.SIMULATOR, reason="compile tests need the real CUDA target, "
                                "not NUMBA_ENABLE_CUDASIM=1")

from numba_ep.kernels import low_latency as ll  # noqa: E402

CC = (9, 0)
I = P.INTRINSICS


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def fake_buffer(M, H, R, E, unmapped=(), extra=0):
    """A stand-in for SymmetricBuffer: addresses only, nothing on a device."""
    base = 1 << 32
    peers = [0 if r in unmapped else base + (r << 36) for r in range(R)]
    peers[0] = base
    return SimpleNamespace(ptr=base, nbytes=ref.get_low_latency_rdma_size_hint(M, H, R, E) + extra,
                           peer_ptrs=peers)


def fake_ctx(R=2, M=128, H=7168, E=288, rank=0, unmapped=(), **kw):
    buf = fake_buffer(M, H, R, E, unmapped)
    if rank:
        buf.ptr = buf.peer_ptrs[rank] = (1 << 32) + (rank << 40)
    return ll.LowLatencyContext(buf, rank, R, M, H, E, **kw)


class FakeArray:
    """Anything with __cuda_array_interface__ passes the launchers' checks."""

    def __init__(self, shape, dtype, strides=None, ptr=1 << 20):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": np.dtype(dtype).str,
                                         "data": (ptr, False), "strides": strides,
                                         "version": 3}


def build(spec):
    """(ptx text, cubin bytes) of one kernel specification: numba -> PTX -> ptxas. Also checks
    ptxas's report: no register spills, and at most 128 registers a thread (the kernels run
    512-thread blocks: 65536 registers / 512)."""
    from cuda.core import Linker, LinkerOptions, ObjectCode
    from numba import cuda

    from numba_ep.launch import parse_signature

    factory, sig, constants = spec
    constants = dict(constants)
    bounds = constants.pop("launch_bounds", None)
    text, _ = cuda.compile(factory(**constants), parse_signature(sig), device=False, cc=CC,
                           output="ptx", abi="numba", launch_bounds=bounds)
    linker = Linker(ObjectCode.from_ptx(text.encode()),
                    options=LinkerOptions(arch="sm_90", verbose=True))
    cubin = bytes(linker.link("cubin").code)
    log = linker.get_info_log() or ""
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", log)]
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert regs and max(regs) <= 128, f"{factory.__name__}: registers {regs}"
    assert not any(spills), f"{factory.__name__}: register spills\n{log}"
    return text, cubin


def uses_local_memory(text):
    return re.search(r"\b(ld|st)\.local\b", text) is not None


def assert_has(text, *fragments):
    for f in fragments:
        assert f in text, f"PTX lacks {f!r}"


# ---------------------------------------------------------------------------------------------
# kernels compile, with the instructions they must contain
# ---------------------------------------------------------------------------------------------

def test_dispatch_send_fp8(sm90):
    ctx = fake_ctx()
    send, _ = ll.dispatch_kernels(ctx, 8, use_fp8=True, round_scale=False)
    assert send[2]["use_nvshmem"] is False and send[2]["vec16"] is True
    text, cubin = build(send)
    assert_has(text, I["cvt_e4m3x2"], "div.rn.f32",            # bit-exact cast
               I["ld_nc_v4"], I["st_v4"], I["st_na_v4"],          # 16-byte copies
               I["atomic_add_gpu_i32"], I["fence_acq_rel_sys"], I["st_relaxed_sys_i32"])
    assert "nvshmem" not in text
    assert not uses_local_memory(text)


def test_send_kernels_fence_once_a_block_not_once_a_thread(sm90):
    """The send phases' release chain costs three system-scope fences in the code (thread 0's
    release before its ticket, its acquire in the last block, the publishing warp's release),
    each executed by one thread or one warp: not a fence by every thread of every block (one
    MEMBAR.SYS per warp, 16 a block, on the send's critical path)."""
    ctx = fake_ctx()
    send, recv = ll.dispatch_kernels(ctx, 8, use_fp8=True, round_scale=False)
    csend, crecv = ll.combine_kernels(ctx, 8, use_logfmt=False, zero_copy=False)
    for spec in (send, csend, ll.fused_kernel((send, recv)), ll.fused_kernel((csend, crecv))):
        text, _ = build(spec)
        assert text.count(I["fence_acq_rel_sys"]) == 3, spec[0].__name__


def test_dispatch_send_round_scale_bf16_and_unaligned(sm90):
    ctx = fake_ctx()
    text, _ = build(ll.dispatch_kernels(ctx, 8, use_fp8=True, round_scale=True)[0])
    assert_has(text, I["cvt_e4m3x2"])
    # H = 640 is not a multiple of 512: the layout is only 4-byte aligned, copies use words
    ctx = fake_ctx(R=2, M=32, H=640, E=12)
    send, _ = ll.dispatch_kernels(ctx, 5, use_fp8=False)
    assert send[2]["vec16"] is False and send[2]["round_scale"] is False
    text, _ = build(send)
    assert re.search(r"\bld(\.global)?\.u32", text) and re.search(r"\bst(\.global)?\.u32", text)


def test_dispatch_recv(sm90):
    ctx = fake_ctx()
    _, recv = ll.dispatch_kernels(ctx, 8, use_fp8=True, round_scale=True, use_ue8m0=True)
    text, _ = build(recv)
    assert_has(text, I["ld_acquire_sys_i32"], I["globaltimer"], I["st_release_sys_u64"],
               I["ld_v4"], I["st_na_v4"], I["atomic_add_gpu_i32"],
               I["atomic_add_gpu_u64"])                       # wait-cost stats
    assert not uses_local_memory(text)
    _, recv = ll.dispatch_kernels(fake_ctx(R=2, M=32, H=640, E=12), 5, use_fp8=True)
    build(recv)


def test_combine_send(sm90):
    ctx = fake_ctx()
    send, _ = ll.combine_kernels(ctx, 8)
    text, _ = build(send)
    assert_has(text, I["ld_nc_v4"], I["st_na_v4"], I["fence_acq_rel_sys"],
               I["st_relaxed_sys_i32"], I["atomic_add_gpu_i32"])
    assert not uses_local_memory(text)
    send, _ = ll.combine_kernels(fake_ctx(R=2, M=32, H=640, E=12), 5, zero_copy=True)
    build(send)


def test_combine_send_logfmt(sm90):
    send, _ = ll.combine_kernels(fake_ctx(), 8, use_logfmt=True)
    text, _ = build(send)
    # exact log2 (float64 add, rounded once to float32), ties-to-even rounding, IEEE division
    assert_has(text, "cvt.rni.f32.f32", "cvt.rn.f32.f64", "div.rn.f32", "shfl.sync.bfly.b32")
    assert re.search(r"\badd(\.rn)?\.f64", text)


def test_combine_recv(sm90):
    _, recv = ll.combine_kernels(fake_ctx(), 8)
    text, _ = build(recv)
    assert_has(text, I["ld_acquire_sys_i32"], I["ld_v4"], I["cvt_bf16x2"], I["st_v4"],
               I["atomic_add_gpu_u64"])                       # wait-cost stats
    # the K = 8 rows a thread sums are all loaded before the first is used (8 loads in flight)
    lines = text.splitlines()
    loads = [i for i, line in enumerate(lines) if I["ld_v4"] in line]
    assert len(loads) >= 8
    between = "\n".join(lines[loads[0]:loads[7]])
    assert not re.search(r"\b(fma|mul|add)\.(rn\.)?f32", between), \
        "the top-k rows must be loaded before they are summed"
    assert not uses_local_memory(text)


def test_combine_recv_logfmt_unaligned(sm90):
    _, recv = ll.combine_kernels(fake_ctx(R=2, M=32, H=640, E=12), 16, use_logfmt=True)
    text, _ = build(recv)
    assert_has(text, I["ex2_approx"], I["ld_acquire_sys_i32"])


@pytest.mark.parametrize("kind, options", [
    ("dispatch", dict(use_fp8=True, round_scale=True, use_ue8m0=True)),
    ("dispatch", dict(use_fp8=False)),
    ("combine", dict()),
    ("combine", dict(use_logfmt=True)),
    ("combine", dict(zero_copy=True)),
])
def test_one_launch_kernels(sm90, kind, options):
    """Send and receive in one kernel: both phases' instructions are there (the publish after
    the ticket, the bounded acquire waits, 16-byte copies), a 512-thread block fits (build checks
    registers and spills; the launch bound is in the PTX), and the arguments are the send
    kernel's followed by the receive kernel's."""
    specs = (ll.dispatch_kernels if kind == "dispatch" else ll.combine_kernels)(
        fake_ctx(), 8, **options)
    fused = ll.fused_kernel(specs)
    assert fused is not None
    factory, sig, constants = fused
    assert constants["launch_bounds"] == ll.THREADS
    assert sig == specs[0][1][:-1] + ", " + specs[1][1][len("void("):]
    text, _ = build(fused)
    assert_has(text, I["atomic_add_gpu_i32"], I["fence_acq_rel_sys"], I["st_relaxed_sys_i32"],
               I["ld_acquire_sys_i32"], I["globaltimer"], ".maxntid 512")
    if kind == "dispatch":
        assert_has(text, I["ld_nc_v4"])   # the token rows, read once
    elif not options.get("use_logfmt"):   # LogFMT's receive reads 32-bit code words instead
        assert_has(text, I["ld_v4"])      # the received rows, K in flight
    assert not uses_local_memory(text)
    assert ll.with_fused(specs) == list(specs) + [fused]
    # the estimate that decides fusion is what the kernel declares
    declared = sum(int(n) for n in re.findall(r"\.shared \.align \d+ \.b8 \S+\[(\d+)\]", text))
    assert declared == sum(ll._static_shared_bytes(f, c) for f, _, c in specs)


def test_one_launch_is_skipped_when_shared_arrays_would_not_fit():
    """At H = 16384 with top-16 LogFMT and 4096 local experts the two combine phases declare
    ~57 KB of static shared memory together (the cap is 48 KB): two launches stay."""
    ctx = fake_ctx(R=2, M=8, H=16384, E=8192)
    specs = ll.combine_kernels(ctx, 16, use_logfmt=True)
    total = sum(ll._static_shared_bytes(f, c) for f, _, c in specs)
    assert total > 48 * 1024
    assert ll.fused_kernel(specs) is None
    assert ll.with_fused(specs) == list(specs)
    # the same call without LogFMT needs ~17 KB: one launch
    assert ll.fused_kernel(ll.combine_kernels(ctx, 16)) is not None
    # dispatch keeps only a few words per rank in shared memory
    assert ll.fused_kernel(ll.dispatch_kernels(ctx, 16)) is not None


def test_clean(sm90):
    text, _ = build((ll.make_clean, ll.CLEAN_SIG, {}))
    assert "st.global.u32" in text


@pytest.mark.slow
def test_nvshmem_send_kernels(sm90):
    """With an unmapped peer the send kernels are the NVSHMEM specialisation; they link."""
    from numba_ep.launch import compile_cubin, parse_signature

    ctx = fake_ctx(unmapped=(1,))
    assert ctx.use_nvshmem
    start = time.monotonic()
    for spec in (ll.dispatch_kernels(ctx, 8)[0], ll.combine_kernels(ctx, 8, use_logfmt=True)[0]):
        factory, sig, constants = spec
        assert constants["use_nvshmem"] is True
        cubin, meta = compile_cubin(factory(**constants), parse_signature(sig), CC)
        assert meta["nvshmem"], "the kernel must need nvshmem.core.library_init after loading"
        assert b"nvshmem" in cubin
    # the receive kernels read local memory only: never the NVSHMEM specialisation
    assert "use_nvshmem" not in ll.dispatch_kernels(ctx, 8)[1][2]
    assert "use_nvshmem" not in ll.combine_kernels(ctx, 8)[1][2]
    print(f"two NVSHMEM kernels compiled in {time.monotonic() - start:.1f} s")


# ---------------------------------------------------------------------------------------------
# layout facts the kernels rely on
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M,H,R,E", [(128, 7168, 2, 288), (128, 4096, 8, 256), (1, 512, 1, 1),
                                     (64, 2560, 4, 64), (7, 1536, 3, 9)])
def test_layout_is_16_byte_aligned_when_hidden_is_a_multiple_of_512(M, H, R, E):
    lay = ref.low_latency_layout(M, H, R, E)
    assert lay["combine_msg_bytes"] % 16 == 0 and lay["dispatch_msg_bytes"] % 16 == 0
    for key in ("send_offsets", "recv_offsets", "signal_offsets"):
        assert all(o % 16 == 0 for o in lay[key])
    assert lay["signal_bytes"] >= E * 4


@pytest.mark.parametrize("M,H,R,E", [(32, 640, 2, 12), (3, 128, 1, 5), (5, 384, 3, 3)])
def test_layout_is_word_aligned_otherwise(M, H, R, E):
    lay = ref.low_latency_layout(M, H, R, E)
    assert lay["combine_msg_bytes"] % 4 == 0 and lay["dispatch_msg_bytes"] % 16 == 0
    for key in ("send_offsets", "recv_offsets", "signal_offsets"):
        assert all(o % 4 == 0 for o in lay[key])


# ---------------------------------------------------------------------------------------------
# LogFMT-10: the kernel's arithmetic, emulated, against the reference
# ---------------------------------------------------------------------------------------------

def _device_log2(mag):
    """NumPy twin of low_latency._log2_mag (float64 table, one float64 add, round to float32)."""
    tab = ll.log2_table()
    mag = np.asarray(mag, dtype=np.int64)
    ex, m = mag >> 7, mag & 127
    p = np.floor(np.log2(np.maximum(m, 1))).astype(np.int64)      # 31 - clz(m)
    sub = ex == 0
    e = np.where(sub, p - 133, ex - 127)
    mm = np.where(sub, (m << np.maximum(7 - p, 0)) & 127, m)
    return (e.astype(np.float64) + tab[mm]).astype(np.float32)


def test_device_log2_is_exact_for_every_bf16_magnitude():
    mags = np.arange(1, 0x7F80)                      # every positive finite bf16
    values = (mags.astype(np.uint32) << 16).view(np.float32)
    got = _device_log2(mags)
    want = ref.log2_f32(values)
    bad = np.nonzero(got.view(np.uint32) != want.view(np.uint32))[0]
    assert bad.size == 0, f"log2 differs for bf16 magnitude 0x{int(mags[bad[0]]):04x}"


def _kernel_pack_group(codes16):
    """The five words of 16 codes as the kernel's lane pair writes them."""
    c = [int(v) for v in codes16]
    mags, signs = [v & 0x1FF for v in c], [(v >> 9) & 1 for v in c]

    def half(h):  # what _logfmt_pack8 returns for values 8h .. 8h+7
        lo = 0
        for i in range(7):
            lo |= mags[8 * h + i] << (9 * i)
        lo |= (mags[8 * h + 7] & 1) << 63
        hi = mags[8 * h + 7] >> 1
        sg = sum(signs[8 * h + i] << i for i in range(8))
        return lo, hi, sg

    (elo, ehi, esg), (olo, ohi, osg) = half(0), half(1)
    M32 = 0xFFFFFFFF
    w = [elo & M32, elo >> 32, (ehi | ((olo & M32) << 8)) & M32,            # even lane
         (olo >> 24) & M32, ((olo >> 56) | (ohi << 8) | (esg << 16) | (osg << 24)) & M32]
    return np.array(w, dtype=np.uint32)


def _kernel_unpack_half(w, h):
    """The eight codes of half ``h`` as combine_recv decodes them from the five words."""
    w = [int(v) for v in w]
    if h == 0:
        bits, top, sg = w[0] | (w[1] << 32), w[2] & 0xFF, w[4] >> 16
    else:
        bits = ((w[2] >> 8) | (w[3] << 24) | (w[4] << 56)) & ((1 << 64) - 1)
        top, sg = (w[4] >> 8) & 0xFF, w[4] >> 24
    out = []
    for q in range(8):
        m = (bits >> (9 * q)) & 0x1FF if q < 7 else (bits >> 63) | (top << 1)
        out.append(m | (((sg >> q) & 1) << 9))
    return out


def test_logfmt_lane_pair_packing_matches_reference():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 1024, size=(200, 16))
    codes[0] = 0
    codes[1] = 1023
    for row in codes:
        want = ref.logfmt10_pack_codes(row.astype(np.uint16))
        got = _kernel_pack_group(row)
        assert (got == want).all(), (row, got, want)
        assert _kernel_unpack_half(got, 0) + _kernel_unpack_half(got, 1) == [int(v) for v in row]


def test_logfmt_codes_of_the_device_formula_match_reference():
    """Per-value code with the kernel's float32 steps (log2, subtract, multiply, rint)."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 1024)) * rng.choice([1e-3, 0.05, 0.3, 3.0], (64, 1))
         ).astype(np.float32)
    x[3, :128] = 0
    x[4, 5] = 0
    enc = ref.logfmt10_encode(x)
    bits = enc.raw.view(np.uint16).reshape(64, 8, 128).astype(np.int64)
    mag = bits & 0x7FFF
    p = ref.logfmt10_params(enc.amax, enc.amin)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lg = _device_log2(np.maximum(mag, 1))
        diff = (lg - p.log_amin[..., None]).astype(np.float32)
        t = (diff * p.inv_step[..., None]).astype(np.float32)
        r = np.rint(t)
        c = np.where((mag == 0) | ~(r > -1), 0, 1 + np.minimum(r, 510))
    c = np.nan_to_num(c).astype(np.int64)
    c = np.where(p.encoded[..., None], c | ((bits >> 15) << 9), 0).astype(np.uint16)
    assert p.encoded.any() and (~p.encoded).any()
    assert (c.reshape(64, 1024) == enc.codes).all()


# ---------------------------------------------------------------------------------------------
# host-side validation: clear errors before any device work
# ---------------------------------------------------------------------------------------------

def test_context_validation():
    with pytest.raises(ValueError, match="multiple of num_ranks"):
        ll.LowLatencyContext(fake_buffer(8, 256, 2, 4), 0, 2, 8, 256, 5)
    with pytest.raises(ValueError, match="multiple of 128"):
        ll.LowLatencyContext(fake_buffer(8, 256, 2, 4), 0, 2, 8, 200, 4)
    small = fake_buffer(8, 256, 2, 4, extra=-128)
    with pytest.raises(ValueError, match="needs .* bytes .*get_low_latency_rdma_size_hint"):
        ll.LowLatencyContext(small, 0, 2, 8, 256, 4)
    with pytest.raises(ValueError, match="rank"):
        ll.LowLatencyContext(fake_buffer(8, 256, 2, 4), 2, 2, 8, 256, 4)
    with pytest.raises(ValueError, match="peer_ptrs has 2 entries"):
        ll.LowLatencyContext(fake_buffer(8, 256, 2, 4, extra=1 << 20), 0, 3, 8, 256, 6)
    with pytest.raises(TypeError, match="SymmetricBuffer"):
        ll.LowLatencyContext(object(), 0, 1, 8, 256, 4)
    with pytest.raises(TypeError, match="num_max_dispatch_tokens_per_rank"):
        ll.LowLatencyContext(fake_buffer(8, 256, 2, 4), 0, 2, 8.0, 256, 4)
    ctx = fake_ctx(R=2, M=8, H=256, E=4, unmapped=(1,))
    assert ctx.use_nvshmem and not ctx.vec16 and ctx.num_local_experts == 2


def _dispatch_args(T=4, H=7168, K=8):
    return FakeArray((T, H), np.uint16), FakeArray((T, K), np.int64)


@pytest.mark.parametrize("change,error,match", [
    (dict(x=FakeArray((129, 7168), np.uint16), topk_idx=FakeArray((129, 8), np.int64)),
     ValueError, "more than num_max_dispatch_tokens_per_rank=128"),
    (dict(x=FakeArray((4, 7168), np.float32)), TypeError, "dtype uint16 or int16"),
    (dict(x=FakeArray((4, 4096), np.uint16)), ValueError, "hidden size 7168"),
    (dict(x=np.zeros((4, 7168), np.uint16)), TypeError, "CUDA array"),
    (dict(x=FakeArray((4, 7168), np.uint16, strides=(2, 8))), ValueError, "C-contiguous"),
    (dict(topk_idx=FakeArray((4, 8), np.int32)), TypeError, "int64"),
    (dict(topk_idx=FakeArray((5, 8), np.int64)), ValueError, "4 rows"),
    (dict(topk_idx=FakeArray((4, 17), np.int64)), ValueError, r"top-k must be in \[1, 16\]"),
    (dict(use_ue8m0=True), ValueError, "round_scale"),
    (dict(cumulative_local_expert_recv_stats=FakeArray((100,), np.int32)), ValueError,
     r"shape \(144,\)"),
    (dict(return_recv_hook=1), TypeError, "bool"),
    (dict(x=FakeArray((4, 7168), np.uint16, ptr=(1 << 20) + 8)), ValueError, "multiple of 16"),
])
def test_dispatch_validation(change, error, match):
    ctx = fake_ctx()
    x, topk = _dispatch_args()
    kw = dict(x=x, topk_idx=topk)
    kw.update(change)
    with pytest.raises(error, match=match):
        ll.low_latency_dispatch(ctx, **kw)
    assert ctx.buffer_idx == 0 and not ctx._ready  # nothing happened


def test_dispatch_validation_ue8m0_needs_hidden_multiple_of_512():
    ctx = fake_ctx(R=2, M=8, H=640, E=4)
    x, topk = _dispatch_args(T=2, H=640, K=2)
    with pytest.raises(ValueError, match="multiple of 512"):
        ll.low_latency_dispatch(ctx, x, topk, round_scale=True, use_ue8m0=True)


def _combine_args(ctx, T=4, K=8):
    L, RM, H = ctx.num_local_experts, ctx.num_ranks * ctx.num_max_dispatch_tokens_per_rank, \
        ctx.hidden
    return dict(x=FakeArray((L, RM, H), np.uint16), topk_idx=FakeArray((T, K), np.int64),
                topk_weights=FakeArray((T, K), np.float32),
                src_info=FakeArray((L, RM), np.int32),
                layout_range=FakeArray((L, ctx.num_ranks), np.int64))


@pytest.mark.parametrize("change,error,match", [
    (dict(use_logfmt=True, zero_copy=True), ValueError, "cannot be combined"),
    (dict(x=FakeArray((144, 256, 4096), np.uint16)), ValueError, r"shape \(144, 256, 7168\)"),
    (dict(topk_weights=FakeArray((4, 8), np.float64)), TypeError, "float32"),
    (dict(topk_weights=FakeArray((4, 7), np.float32)), ValueError, r"shape \(4, 8\)"),
    (dict(topk_idx=FakeArray((129, 8), np.int64), topk_weights=FakeArray((129, 8), np.float32)),
     ValueError, "more than num_max_dispatch_tokens_per_rank"),
    (dict(src_info=FakeArray((144, 256), np.int64)), TypeError, "int32"),
    (dict(layout_range=FakeArray((144, 3), np.int64)), ValueError, r"shape \(144, 2\)"),
    (dict(out=FakeArray((4, 7000), np.uint16)), ValueError, r"shape \(4, 7168\)"),
    (dict(return_recv_hook="yes"), TypeError, "bool"),
])
def test_combine_validation(change, error, match):
    ctx = fake_ctx()
    kw = _combine_args(ctx)
    kw.update(change)
    with pytest.raises(error, match=match):
        ll.low_latency_combine(ctx, **kw)
    assert ctx.buffer_idx == 0 and not ctx._ready


def test_combine_zero_copy_accepts_the_strided_send_view():
    """With zero_copy, x is the strided next_combine_buffer view: only its shape is checked."""
    ctx = fake_ctx()
    kw = _combine_args(ctx)
    cmsg = ctx.layout["combine_msg_bytes"]
    kw["x"] = FakeArray((144, 256, 7168), np.uint16, strides=(256 * cmsg, cmsg, 2))
    with pytest.raises(ValueError, match="C-contiguous"):
        ll.low_latency_combine(ctx, **kw)
    ll._check("x", kw["x"], (np.uint16,), shape=(144, 256, 7168), contiguous=False)


def test_kernel_specs():
    ctx = fake_ctx()
    (s, _, sc), (r, _, rc) = ll.dispatch_kernels(ctx, 8, use_fp8=False, round_scale=True)
    assert s is ll.make_dispatch_send and r is ll.make_dispatch_recv
    assert sc["round_scale"] is False and rc["use_ue8m0"] is False and sc["num_topk"] == 8
    (s, _, sc), (r, _, rc) = ll.combine_kernels(ctx, 4, use_logfmt=True)
    assert sc["use_logfmt"] and rc["use_logfmt"] and rc["num_topk"] == 4
    assert sc["use_nvshmem"] is False
    assert fake_ctx(unmapped=(1,)).use_nvshmem


def test_checks_read_cupy_metadata_directly():
    """CuPy arrays skip __cuda_array_interface__; empty ones (strides all 0) are C-contiguous,
    as a GPU run with zero tokens found out, and strided ones are still rejected."""
    from kernels_for_tests import cupy_view

    for shape, strides in (((0, 7168), (0, 0)), ((0, 7168), None), ((1, 7168), None),
                           ((128, 7168), None)):
        a = cupy_view(shape, np.uint16, strides)
        assert ll._check("x", a, (np.uint16, np.int16), ndim=2, align=16) == (1 << 20)
        assert ll._shape(a) == shape and ll._addr(a) == (1 << 20)
    with pytest.raises(ValueError, match="x: expected a C-contiguous array"):
        ll._check("x", cupy_view((4, 8), np.uint16, (32, 2)), (np.uint16,), ndim=2)
    with pytest.raises(TypeError, match="topk_idx: expected dtype int64, got int32"):
        ll._check_topk(cupy_view((4, 8), np.int32))


def test_transport_nvshmem_treats_every_other_rank_as_remote(monkeypatch):
    """transport="nvshmem" (or NUMBA_EP_LL_TRANSPORT=nvshmem): NVSHMEM puts to every other rank,
    so one host can test the path peers on other nodes take; the own address stays."""
    auto = fake_ctx(R=4, rank=2)
    assert not auto.use_nvshmem and auto.transport == "auto"
    ctx = fake_ctx(R=4, rank=2, transport="nvshmem")
    assert ctx.use_nvshmem and ctx.transport == "nvshmem"
    assert [p != 0 for p in ctx.peer_ptrs] == [False, False, True, False]
    assert ctx.peer_ptrs[2] == auto.peer_ptrs[2]
    (s, _, sc), _ = ll.dispatch_kernels(ctx, 8)
    assert sc["use_nvshmem"] is True
    assert not fake_ctx(R=1, transport="nvshmem").use_nvshmem  # no other rank
    monkeypatch.setenv("NUMBA_EP_LL_TRANSPORT", "nvshmem")
    assert fake_ctx(R=2).use_nvshmem
    monkeypatch.setenv("NUMBA_EP_LL_TRANSPORT", "rdma")
    with pytest.raises(ValueError, match="transport: expected 'auto' or 'nvshmem'"):
        fake_ctx(R=2)


class _RecordingKernel:
    """Stands in for a CompiledKernel: records launches; holds 2 blocks an SM on 132 SMs."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def max_resident_blocks(self, block):
        return 2 * 132

    def launch(self, grid, block, *args, stream=None, cooperative=None):
        self.log.append((self.name, grid, block, args, bool(cooperative)))


def _launch_log(monkeypatch, fuse, hook, call, T=4, **ctx_kw):
    """The launches one dispatch or combine makes, with kernels and device state faked."""
    ctx = fake_ctx(fuse=fuse, num_sms=132, **ctx_kw)
    ctx._set_device_state(SimpleNamespace(device_address=1 << 13, check=lambda: None),
                          FakeArray((2,), np.uint64, ptr=1 << 12),
                          FakeArray((289,), np.int32, ptr=1 << 14),
                          FakeArray((128,), np.float64, ptr=1 << 15))
    log = []
    ks = ll._Kernels(None)   # its kernels set here; fused_max_grid still asks ks.fused
    ks.send, ks.recv, ks.fused = (_RecordingKernel(n, log) for n in ("send", "recv", "fused"))
    monkeypatch.setattr(ll, "_kernels_for", lambda *a: ks)
    empty = lambda shape, dtype: FakeArray(shape, dtype, ptr=1 << 16)  # noqa: E731
    if call == "dispatch":
        res = ll.low_latency_dispatch(ctx, FakeArray((T, 7168), np.uint16),
                                      FakeArray((T, 8), np.int64), use_fp8=False,
                                      return_recv_hook=hook, stream=7, empty=empty)
    else:
        kw = _combine_args(ctx, T)
        res = ll.low_latency_combine(ctx, **kw, return_recv_hook=hook, stream=7, empty=empty)
    return log, res[-1]


@pytest.mark.parametrize("call", ["dispatch", "combine"])
def test_calls_without_a_hook_are_one_cooperative_launch(monkeypatch, call):
    """fuse (the default): one cooperative launch whose arguments are the send kernel's then the
    receive kernel's, on a grid that covers both phases and fits the device; fuse=False and
    hook mode: the two phase kernels, the second only when the hook is called."""
    (fused,), hook = _launch_log(monkeypatch, True, False, call)
    split, _ = _launch_log(monkeypatch, False, False, call)
    assert hook is None
    assert [n for n, *_ in split] == ["send", "recv"]
    assert fused[0] == "fused" and fused[4] is True and fused[2] == ll.THREADS
    assert fused[3] == split[0][3] + split[1][3]
    assert not split[0][4] and not split[1][4]
    # the receive grid of a dispatch is one block per local expert (144), of a combine one per
    # token (4), the send grid one per token (4) or one per SM (132): the larger one
    assert fused[1] == max(split[0][1], split[1][1]) == (144 if call == "dispatch" else 132)
    hooked, hook = _launch_log(monkeypatch, True, True, call)
    assert [n for n, *_ in hooked] == ["send"]
    hook()
    assert [n for n, *_ in hooked] == ["send", "recv"] and hooked[1][3] == split[1][3]


def test_one_launch_grid_is_capped_at_what_the_device_holds(monkeypatch):
    """4096 experts on 2 ranks: 2048 receiving blocks would not all be resident (2 x 132 fit),
    so the grid is 264 and each block takes several experts (the loops are grid-strided)."""
    (fused,), _ = _launch_log(monkeypatch, True, False, "dispatch", E=4096)
    assert fused[1] == 264


def test_fuse_option_and_environment(monkeypatch):
    assert fake_ctx().fuse is True
    assert fake_ctx(fuse=False).fuse is False
    monkeypatch.setenv("NUMBA_EP_LL_FUSE", "0")
    assert fake_ctx().fuse is False and fake_ctx(fuse=True).fuse is True
    monkeypatch.setenv("NUMBA_EP_LL_FUSE", "yes")
    with pytest.raises(ValueError, match="NUMBA_EP_LL_FUSE: expected 0 or 1"):
        fake_ctx()
    with pytest.raises(TypeError, match="fuse: expected a bool"):
        fake_ctx(fuse=1)


def test_each_kernel_of_a_call_is_built_on_first_use(monkeypatch):
    """A caller that never asks for hooks never compiles the phase kernels, and each kernel is
    built once however often it is launched."""
    built = []
    monkeypatch.setattr(ll, "_get", lambda spec: built.append(spec[0].__name__) or spec[0])
    ks = ll._Kernels(ll.dispatch_kernels(fake_ctx(), 8))
    assert built == []
    assert ks.fused is ll.make_dispatch and ks.fused is ll.make_dispatch
    assert built == ["make_dispatch"]
    assert ks.send is ll.make_dispatch_send and ks.recv is ll.make_dispatch_recv
    assert built == ["make_dispatch", "make_dispatch_send", "make_dispatch_recv"]
    big = ll._Kernels(ll.combine_kernels(fake_ctx(R=2, M=8, H=16384, E=8192), 16,
                                         use_logfmt=True))
    assert big.fused is None and built[-1] == "make_dispatch_recv"   # too large: nothing built
