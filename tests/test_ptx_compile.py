"""CPU-only checks of numba_ep.kernels.ptx: every intrinsic compiles for sm_90, emits the PTX it
promises, and ptxas (through nvJitLink) accepts the result; the host conversions are bit-exact
against an independent integer reference; and the simulator fallbacks compute the right values
(in a subprocess, because the simulator must be chosen before numba is imported).

No GPU is needed for any test here.
"""
import inspect
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)
import numba
import numpy as np
import pytest
from numba import cuda, types

from numba_ep.kernels import ptx as P

pytestmark = pytest.mark.skipif(P.SIMULATOR, reason="compile tests need the real CUDA target, "
                                "not NUMBA_ENABLE_CUDASIM=1")

CC = (9, 0)
U64, I64, F32 = types.uint64, types.int64, types.float32


@pytest.fixture
def fake_sm90(monkeypatch):
    """Kernels that call @cuda.jit(device=True) functions ask for the current device while
    compiling; report a compute capability 9.0 device so that works without a GPU."""
    import numba.cuda.dispatcher as dispatcher

    monkeypatch.setattr(dispatcher, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=CC))


def compile_ptx(pyfunc, sig):
    text, _ = cuda.compile(pyfunc, sig, device=False, cc=CC, output="ptx", abi="numba")
    return text


def compile_cubin(pyfunc, sig):
    """PTX -> cubin through nvJitLink (runs ptxas on the CPU): catches bad PTX strings."""
    from numba.cuda import compiler

    lib, _ = compiler._compile_pyfunc_with_fixup(pyfunc, sig, device=False, abi="numba", cc=CC)
    return lib.get_cubin(cc=CC)


def body_lines(text):
    """Instruction lines of a PTX text (comments and declarations dropped), whitespace squeezed."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("//"):
            out.append(re.sub(r"\s+", " ", line))
    return out


def param_register(text, index, kind):
    """The register a kernel parameter of the given index is loaded into (``ld.param.<kind>``)."""
    m = re.search(rf"ld\.param\.{kind}\s+(%\w+), \[\w+_param_{index}\]", text)
    assert m, f"no ld.param.{kind} of param {index}"
    return m.group(1)


# --------------------------------------------------------------------------------------------------
# Typed pointers
# --------------------------------------------------------------------------------------------------

def k_ptr_f32(src, dst, i, v):
    s = P.ptr_f32(src)
    d = P.ptr_f32(dst)
    d[i] = s[i + 1] * v


def k_ptr_all(a, b, i):
    P.ptr_u8(b)[i] = P.ptr_u8(a)[i]
    P.ptr_u16(b)[i] = P.ptr_u16(a)[i]
    P.ptr_u32(b)[i] = P.ptr_u32(a)[i]
    P.ptr_u64(b)[i] = P.ptr_u64(a)[i]
    P.ptr_f64(b)[i] = P.ptr_f64(a)[i] + 1.0
    # signed element types sign-extend when widened
    P.ptr_i64(b)[i + 1] = P.ptr_i8(a)[i + 1] + P.ptr_i16(a)[i + 1] + P.ptr_i32(a)[i + 1]


def test_pointer_store_emits_st_global():
    text = compile_ptx(k_ptr_f32, (U64, U64, I64, F32))
    assert "st.global.f32" in text
    assert "ld.global.f32" in text


def test_pointer_types():
    text = compile_ptx(k_ptr_all, (U64, U64, I64))
    for frag in ("ld.global.u8", "st.global.u8", "ld.global.u16", "st.global.u16",
                 "ld.global.u32", "st.global.u32", "ld.global.u64", "st.global.u64",
                 "ld.global.f64", "st.global.f64", "ld.global.s8", "ld.global.s16",
                 "ld.global.s32"):
        assert frag in text, frag


def k_float_address(a, x):
    P.ptr_f32(a * x)[0] = 1.0


def test_float_address_is_rejected_with_advice():
    with pytest.raises(Exception, match="address is a float"):
        compile_ptx(k_float_address, (U64, types.float64))


def k_int_address(a, i):
    P.ptr_f32(a + numba.uint64(i * 4))[0] = 1.0
    P.ptr_f32(a + i)[1] = 2.0  # numba-cuda types uint64 + int64 as int64 (NumPy: float64)
    P.st_release_sys_i32(i, 1)  # any integer type is accepted as an address; literals as values


def test_integer_addresses_of_any_width():
    text = compile_ptx(k_int_address, (U64, I64))
    assert "st.release.sys.global.s32" in text


# --------------------------------------------------------------------------------------------------
# Loads, stores, atomics, fences
# --------------------------------------------------------------------------------------------------

def k_loads_stores(a, b):
    x = P.ld_acquire_sys_u32(a) + P.ld_acquire_gpu_u32(a) + P.ld_volatile_u32(a)
    y = P.ld_acquire_sys_i32(a) + P.ld_acquire_gpu_i32(a) + P.ld_volatile_i32(a)
    z = P.ld_acquire_sys_u64(a) + P.ld_acquire_gpu_u64(a) + P.ld_volatile_u64(a)
    P.st_release_sys_u32(b, x)
    P.st_release_gpu_u32(b, x)
    P.st_relaxed_sys_u32(b, x)
    P.st_release_sys_i32(b, y)
    P.st_release_gpu_i32(b, y)
    P.st_relaxed_sys_i32(b, y)
    P.st_release_sys_u64(b, z)
    P.st_release_gpu_u64(b, z)
    P.st_relaxed_sys_u64(b, z)


def test_loads_and_stores():
    text = compile_ptx(k_loads_stores, (U64, U64))
    for frag in ("ld.acquire.sys.global.u32", "ld.acquire.gpu.global.u32", "ld.volatile.global.u32",
                 "ld.acquire.sys.global.s32", "ld.acquire.gpu.global.s32", "ld.volatile.global.s32",
                 "ld.acquire.sys.global.u64", "ld.acquire.gpu.global.u64", "ld.volatile.global.u64",
                 "st.release.sys.global.u32", "st.release.gpu.global.u32",
                 "st.relaxed.sys.global.u32", "st.release.sys.global.s32",
                 "st.release.gpu.global.s32", "st.relaxed.sys.global.s32",
                 "st.release.sys.global.u64", "st.release.gpu.global.u64",
                 "st.relaxed.sys.global.u64"):
        assert frag in text, frag


def k_spin(flag, out):
    while P.ld_acquire_sys_u32(flag) == 0:
        pass
    P.ptr_u32(out)[0] = P.ld_acquire_sys_u32(flag)


def test_spin_load_stays_in_the_loop():
    """side_effect + memory clobber: the acquire load is re-executed on every iteration (not
    hoisted out of the loop, not merged with the load after it)."""
    lines = body_lines(compile_ptx(k_spin, (U64, U64)))
    loads = [i for i, ln in enumerate(lines) if ln.startswith("ld.acquire.sys.global.u32")]
    assert len(loads) >= 2, lines  # LLVM rotates the loop: a load before it, one inside, one after
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\$\w+:$", ln)}
    back_edges = [(labels[m.group(1)], i) for i, ln in enumerate(lines)
                  for m in [re.search(r"bra(?:\.uni)? (\$\w+);", ln)] if m and m.group(1) in labels
                  and labels[m.group(1)] < i]
    assert any(start < ld < end for start, end in back_edges for ld in loads), lines


def k_atomics(a, v):
    r = P.atomic_add_sys_i32(a, v) + P.atomic_sub_sys_i32(a, v)
    r += P.atomic_add_release_gpu_i32(a, v) + P.atomic_add_release_sys_i32(a, v)
    r += P.atomic_add_acq_rel_sys_i32(a, v) + P.atomic_add_gpu_i32(a, v)
    r += P.atomic_max_gpu_i32(a, v) + P.atomic_exch_sys_i32(a, v)
    r += P.atomic_cas_sys_i32(a, 0, v) + P.atomic_cas_gpu_i32(a, 0, v)
    r64 = P.atomic_add_sys_u64(a, 1) + P.atomic_add_gpu_u64(a, 1) + P.atomic_cas_sys_u64(a, 0, 1)
    P.red_add_release_sys_i32(a, r)
    P.red_add_release_gpu_i32(a, r)
    P.red_add_gpu_i32(a, r)
    P.red_add_sys_i32(a, r)
    P.ptr_u64(a)[1] = r64


def test_atomics():
    text = compile_ptx(k_atomics, (U64, types.int32))
    for frag in ("atom.sys.global.add.s32", "atom.release.gpu.global.add.s32",
                 "atom.release.sys.global.add.s32", "atom.acq_rel.sys.global.add.s32",
                 "atom.gpu.global.add.s32", "atom.gpu.global.max.s32", "atom.sys.global.exch.b32",
                 "atom.sys.global.cas.b32", "atom.gpu.global.cas.b32", "atom.sys.global.add.u64",
                 "atom.gpu.global.add.u64", "atom.sys.global.cas.b64",
                 "red.release.sys.global.add.s32", "red.release.gpu.global.add.s32",
                 "red.gpu.global.add.s32", "red.sys.global.add.s32"):
        assert frag in text, frag
    # atomic_sub adds the negation: a neg.s32 (or sub from 0) feeds the second atom.add
    assert re.search(r"(neg\.s32|sub\.s32)", text)


def k_fences_timer(out):
    P.fence_acq_rel_cta()
    P.fence_acq_rel_gpu()
    P.fence_acq_rel_sys()
    P.fence_proxy_async_shared_cta()
    P.fence_mbarrier_init()
    t0 = P.globaltimer()
    P.nanosleep(1000)
    P.bar_sync(2, 32)
    t1 = P.globaltimer()
    P.ptr_u64(out)[0] = t1 - t0 + P.smid()
    if P.elect_sync():
        P.ptr_u64(out)[1] = 1


def test_fences_timer_elect():
    text = compile_ptx(k_fences_timer, (U64,))
    for frag in ("fence.acq_rel.cta;", "fence.acq_rel.gpu;", "fence.acq_rel.sys;",
                 "fence.proxy.async.shared::cta;", "fence.mbarrier_init.release.cluster;",
                 "%globaltimer", "nanosleep.u32", "%smid", "elect.sync", "bar.sync"):
        assert frag in text, frag
    assert text.count("%globaltimer") == 2  # two reads, not merged into one


# --------------------------------------------------------------------------------------------------
# Vector memory ops, shared memory, mbarriers, bulk copies
# --------------------------------------------------------------------------------------------------

def k_copy_v4(src, dst, n16):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n16:
        off = numba.uint64(i) * numba.uint64(16)
        a, b, c, d = P.ld_nc_v4(src + off)
        P.st_na_v4(dst + off, a, b, c, d)
        e, f, g, h = P.ld_v4(src + off)
        P.st_v4(dst + off, e, f, g, h)
        w, x, y, z = P.ld_volatile_v4(src + off)
        P.st_v4(dst + off, w, x, y, z)
        i += stride


def test_vector_ops_are_16_bytes():
    text = compile_ptx(k_copy_v4, (U64, U64, I64))
    assert re.search(r"ld\.global\.nc\.L1::no_allocate\.L2::256B\.v4\.u32 \{%r\d+, %r\d+, %r\d+, "
                     r"%r\d+\}, \[%rd\d+\];", text)
    assert re.search(r"st\.global\.L1::no_allocate\.v4\.u32 \[%rd\d+\], \{%r\d+, %r\d+, %r\d+, "
                     r"%r\d+\};", text)
    assert "ld.global.v4.u32" in text
    assert "ld.volatile.global.v4.u32" in text
    assert "st.global.v4.u32" in text


NB = 1024


def k_bulk(src, dst, n):
    buf = cuda.shared.array(NB, numba.uint8, alignment=128)
    bars = cuda.shared.array(1, numba.uint64)
    sbuf = P.shared_addr(buf)
    bar = P.shared_addr(bars)
    if cuda.threadIdx.x == 0:
        P.mbarrier_init(bar, 1)
        P.fence_mbarrier_init()
    cuda.syncthreads()
    phase = 0
    for it in range(n):
        off = numba.uint64(it) * numba.uint64(NB)
        if cuda.threadIdx.x == 0:
            P.bulk_load_g2s(sbuf, src + off, NB, bar)
            P.mbarrier_arrive_expect_tx(bar, NB)
        P.mbarrier_wait_parity(bar, phase)
        phase ^= 1
        a, b, c, d = P.ld_shared_v4(sbuf + cuda.threadIdx.x * 16)
        P.st_shared_v4(sbuf + cuda.threadIdx.x * 16, ~a, ~b, ~c, ~d)
        P.fence_proxy_async_shared_cta()
        cuda.syncthreads()
        if cuda.threadIdx.x == 0:
            P.bulk_store_s2g(dst + off, sbuf, NB)
            P.bulk_commit_group()
            P.bulk_wait_group_read_0()
        cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        P.bulk_wait_group_0()


def test_bulk_copy_and_mbarrier():
    text = compile_ptx(k_bulk, (U64, U64, I64))
    for frag in ("cvta.to.shared", "mbarrier.init.shared::cta.b64", "mbarrier.arrive.expect_tx",
                 "mbarrier.try_wait.parity", "fence.mbarrier_init.release.cluster",
                 "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes",
                 "cp.async.bulk.global.shared::cta.bulk_group", "cp.async.bulk.commit_group",
                 "cp.async.bulk.wait_group.read 0", "cp.async.bulk.wait_group 0",
                 "fence.proxy.async.shared::cta", "ld.shared.v4.u32", "st.shared.v4.u32"):
        assert frag in text, frag
    assert ".shared .align 128 .b8" in text


def k_mbar_misc(out):
    bars = cuda.shared.array(2, numba.uint64)
    lock = cuda.shared.array(1, numba.int32)
    bar = P.shared_addr(bars)
    P.mbarrier_init(bar + 8, 2)
    P.mbarrier_expect_tx(bar + 8, 16)
    P.mbarrier_arrive(bar + 8)
    ok = P.mbarrier_try_wait_parity(bar + 8, 0)
    ok2 = P.mbarrier_wait_parity_timeout(bar + 8, 0, 1000)
    lk = P.shared_addr(lock)
    while P.atomic_cas_acquire_cta_shared_i32(lk, 0, 1) != 0:
        pass
    P.atomic_exch_release_cta_shared_i32(lk, P.ld_acquire_cta_shared_i32(lk) - 1)
    P.ptr_u32(out)[0] = ok + ok2
    P.bulk_wait_group_read(2)
    P.bulk_wait_group(3)
    pol = P.createpolicy_evict_first()
    P.bulk_load_g2s_hint(bar, out, 16, bar + 8, pol)
    P.bulk_store_s2g_hint(out, bar, 16, P.createpolicy_evict_normal())


def test_mbarrier_misc_and_hints():
    text = compile_ptx(k_mbar_misc, (U64,))
    for frag in ("mbarrier.expect_tx.relaxed.cta.shared::cta.b64",
                 "mbarrier.arrive.shared::cta.b64",
                 "atom.acquire.cta.shared::cta.cas.b32", "atom.release.cta.shared::cta.exch.b32",
                 "ld.acquire.cta.shared::cta.s32", "cp.async.bulk.wait_group.read 2;",
                 "cp.async.bulk.wait_group 3;", "createpolicy.fractional.L2::evict_first.b64",
                 "createpolicy.fractional.L2::evict_normal.b64",
                 "complete_tx::bytes.L2::cache_hint", "bulk_group.L2::cache_hint"):
        assert frag in text, frag


def k_wait_group_runtime(n):
    P.bulk_wait_group_read(n)


def test_wait_group_needs_a_constant():
    with pytest.raises(Exception, match="compile-time integer constant"):
        compile_ptx(k_wait_group_runtime, (I64,))


# --------------------------------------------------------------------------------------------------
# Conversions
# --------------------------------------------------------------------------------------------------

def k_e4m3(lo, hi, out):
    P.ptr_u16(out)[0] = P.cvt_e4m3x2(lo, hi)


def k_bf16(lo, hi, out):
    P.ptr_u32(out)[0] = P.cvt_bf16x2(lo, hi)


def test_cvt_e4m3x2_puts_lo_in_the_low_byte():
    """PTX's first source goes to the upper byte, so hi must be the first source operand."""
    text = compile_ptx(k_e4m3, (F32, F32, U64))
    lo, hi = param_register(text, 0, "f32"), param_register(text, 1, "f32")
    assert re.search(rf"cvt\.rn\.satfinite\.e4m3x2\.f32 %rs\d+, {hi}, {lo};", text), text


def test_cvt_bf16x2_puts_lo_in_the_low_half():
    text = compile_ptx(k_bf16, (F32, F32, U64))
    lo, hi = param_register(text, 0, "f32"), param_register(text, 1, "f32")
    assert re.search(rf"cvt\.rn\.bf16x2\.f32 %r\d+, {hi}, {lo};", text), text


def k_decode(packed8, packed16, out):
    f0, f1 = P.e4m3x2_to_f32x2(packed8)
    g0, g1 = P.bf16x2_to_f32x2(packed16)
    o = P.ptr_f32(out)
    o[0] = f0
    o[1] = f1
    o[2] = g0
    o[3] = g1
    o[4] = P.bf16_to_f32(P.cvt_bf16(f0))
    o[5] = P.bitcast_u32_f32(P.bitcast_f32_u32(f1) ^ numba.uint32(0x80000000))
    o[6] = P.ex2_approx(f0) + P.lg2_approx(f1)


def test_decoders():
    text = compile_ptx(k_decode, (types.uint16, types.uint32, U64))
    for frag in ("cvt.rn.f16x2.e4m3x2", "cvt.f32.f16", "cvt.rn.bf16.f32", "ex2.approx.ftz.f32",
                 "lg2.approx.ftz.f32"):
        assert frag in text, frag


def k_mixed_numbers(out, x):
    # float64 and integer arguments are converted to float32; integers to the intrinsic's width
    P.ptr_u16(out)[0] = P.cvt_e4m3x2(x * 2.0, 1)


def test_conversions_accept_other_numbers():
    assert "cvt.rn.satfinite.e4m3x2.f32" in compile_ptx(k_mixed_numbers, (U64, types.float64))


# --------------------------------------------------------------------------------------------------
# Device functions (need the fake sm_90 device) and the everything-kernel assembled by ptxas
# --------------------------------------------------------------------------------------------------

@cuda.jit(device=True)
def wait_flag(flag, expected, timeout_ns):
    """A bounded acquire spin, the shape every receive loop has."""
    start = P.globaltimer()
    while P.ld_acquire_sys_i32(flag) < expected:
        if P.globaltimer() - start > timeout_ns:
            return False
        P.nanosleep(64)
    return True


def k_uses_device_function(flag, out):
    P.ptr_i32(out)[0] = 1 if wait_flag(flag, 3, 1000000) else -1


def test_device_function_calls(fake_sm90):
    text = compile_ptx(k_uses_device_function, (U64, U64))
    assert "ld.acquire.sys.global.s32" in text and "%globaltimer" in text


def k_everything(a, b, x, n):
    t = cuda.threadIdx.x
    pf = P.ptr_f32(b)
    pf[t] = x
    P.ptr_u8(a)[t] = P.ptr_i8(a)[t] + P.ptr_u16(a)[t] + P.ptr_i16(a)[t]
    P.ptr_i64(a)[t] = P.ptr_u32(a)[t] + P.ptr_i32(a)[t] + P.ptr_i64(a)[t + 1]
    P.ptr_f64(a)[t] = P.ptr_u64(a)[t]
    s = P.ld_acquire_sys_u32(a) + P.ld_acquire_gpu_u32(a) + P.ld_volatile_u32(a)
    si = P.ld_acquire_sys_i32(a) + P.ld_acquire_gpu_i32(a) + P.ld_volatile_i32(a)
    s64 = P.ld_acquire_sys_u64(a) + P.ld_acquire_gpu_u64(a) + P.ld_volatile_u64(a)
    P.st_release_sys_u32(b, s)
    P.st_release_gpu_u32(b, s)
    P.st_relaxed_sys_u32(b, s)
    P.st_release_sys_i32(b, si)
    P.st_release_gpu_i32(b, si)
    P.st_relaxed_sys_i32(b, si)
    P.st_release_sys_u64(b, s64)
    P.st_release_gpu_u64(b, s64)
    P.st_relaxed_sys_u64(b, s64)
    r = P.atomic_add_sys_i32(b, 1) + P.atomic_sub_sys_i32(b, 2) + P.atomic_add_release_gpu_i32(b, 3)
    r += P.atomic_add_release_sys_i32(b, 4) + P.atomic_add_acq_rel_sys_i32(b, 5)
    r += P.atomic_add_gpu_i32(b, 6) + P.atomic_max_gpu_i32(b, 7) + P.atomic_exch_sys_i32(b, 8)
    r += P.atomic_cas_sys_i32(b, 0, 9) + P.atomic_cas_gpu_i32(b, 1, 2)
    r64 = P.atomic_add_sys_u64(b, 1) + P.atomic_add_gpu_u64(b, 2) + P.atomic_cas_sys_u64(b, 3, 4)
    P.red_add_release_sys_i32(b, r)
    P.red_add_release_gpu_i32(b, r)
    P.red_add_gpu_i32(b, r)
    P.red_add_sys_i32(b, r)
    P.st_relaxed_sys_u64(b, r64)
    P.fence_acq_rel_cta()
    P.fence_acq_rel_gpu()
    P.fence_acq_rel_sys()
    P.fence_proxy_async_shared_cta()
    P.fence_mbarrier_init()
    now = P.globaltimer()
    P.nanosleep(100)
    P.bar_sync(1, 64)
    if P.elect_sync():
        P.ptr_u64(a)[0] = now + P.smid()
    v0, v1, v2, v3 = P.ld_nc_v4(a)
    w0, w1, w2, w3 = P.ld_v4(a + 16)
    z0, z1, z2, z3 = P.ld_volatile_v4(a + 32)
    P.st_na_v4(b, v0, v1, v2, v3)
    P.st_v4(b + 16, w0, w1, w2, w3)
    buf = cuda.shared.array(512, numba.uint8, alignment=128)
    bars = cuda.shared.array(2, numba.uint64)
    lock = cuda.shared.array(1, numba.int32)
    sa = P.shared_addr(buf)
    bar = P.shared_addr(bars)
    P.st_shared_v4(sa, z0, z1, z2, z3)
    q0, q1, q2, q3 = P.ld_shared_v4(sa + 16)
    P.st_v4(b + 32, q0, q1, q2, q3)
    lk = P.shared_addr(lock)
    while P.atomic_cas_acquire_cta_shared_i32(lk, 0, 1) != 0:
        pass
    P.atomic_exch_release_cta_shared_i32(lk, P.ld_acquire_cta_shared_i32(lk))
    if t == 0:
        P.mbarrier_init(bar, 1)
        P.mbarrier_init(bar + 8, 1)
        P.fence_mbarrier_init()
    cuda.syncthreads()
    if t == 0:
        P.bulk_load_g2s(sa, a, 128, bar)
        P.bulk_load_g2s_hint(sa + 128, a + 128, 128, bar, P.createpolicy_evict_first())
        P.mbarrier_arrive_expect_tx(bar, 256)
        P.mbarrier_expect_tx(bar + 8, 0)
        P.mbarrier_arrive(bar + 8)
        P.mbarrier_wait_parity(bar, 0)
        ok = P.mbarrier_try_wait_parity(bar, 0)
        ok2 = P.mbarrier_wait_parity_timeout(bar + 8, 0, n)
        P.bulk_store_s2g(b, sa, 128)
        P.bulk_store_s2g_hint(b + 128, sa + 128, 128, P.createpolicy_evict_normal())
        P.bulk_commit_group()
        P.bulk_wait_group_read_0()
        P.bulk_wait_group_0()
        P.bulk_wait_group_read(1)
        P.bulk_wait_group(2)
        if not (ok and ok2):
            P.trap()
    h = P.cvt_e4m3x2(x, x * 2)
    f0, f1 = P.e4m3x2_to_f32x2(h)
    bb = P.cvt_bf16x2(f0, f1)
    g0, g1 = P.bf16x2_to_f32x2(bb)
    g2 = P.bf16_to_f32(P.cvt_bf16(g0))
    u = P.bitcast_f32_u32(g1 + g2 + P.ex2_approx(x) + P.lg2_approx(x))
    pf[t + 1] = P.bitcast_u32_f32(u)


EVERYTHING_SIG = (U64, U64, F32, U64)


def test_everything_kernel_uses_every_intrinsic():
    """Keeps the ptxas test below complete: a new intrinsic must be added to k_everything."""
    src = inspect.getsource(k_everything)
    unused = [name for name in P.__all__ if f"P.{name}(" not in src]
    assert not unused, f"add these to k_everything: {unused}"


def test_every_intrinsic_emits_its_ptx():
    text = compile_ptx(k_everything, EVERYTHING_SIG)
    missing = [(name, frag) for name, frag in P.INTRINSICS.items() if frag and frag not in text]
    assert not missing


def test_ptxas_accepts_all_inline_asm():
    """nvJitLink assembles the PTX for sm_90 on the CPU; a typo in any asm string fails here."""
    obj = compile_cubin(k_everything, EVERYTHING_SIG)
    code = obj.code if hasattr(obj, "code") else obj
    assert bytes(code[:4]) == b"\x7fELF"


def test_every_intrinsic_is_documented():
    for name in P.__all__:
        doc = getattr(P, name).__doc__ or ""
        assert doc.startswith(name), name
        assert "emits" in doc or "LLVM" in doc or "loops" in doc, name
        assert P.FALLBACKS[name].__doc__ == doc, name


# --------------------------------------------------------------------------------------------------
# Host conversions: bit-exact against an independent integer reference
# --------------------------------------------------------------------------------------------------

def ref_e4m3(x):
    """float -> e4m3fn byte, satfinite, round to nearest even, NaN -> 0x7F (plain Python)."""
    if math.isnan(x):
        return 0x7F
    sign = 0x80 if math.copysign(1.0, x) < 0 else 0
    a = abs(x)
    if a > 448.0:  # values in (448, 464) round to 448 anyway; beyond saturate
        return sign | 0x7E
    if a == 0.0:
        return sign
    exp = max(math.frexp(a)[1] - 1, -6)  # a = 1.m * 2**exp, or subnormal below 2**-6
    step = 2.0 ** (exp - 3)  # 3 mantissa bits
    q = round(a / step)  # exact division by a power of two; round() is half-to-even
    if q == 16:  # rounded up into the next binade
        exp, q = exp + 1, 8
    if q >= 8:  # normal
        return sign | ((exp + 7) << 3) | (q - 8)
    return sign | q  # subnormal (exp == -6): value q * 2**-9


def ref_bf16(bits):
    """float32 bits -> bfloat16 bits, round to nearest even, NaN -> 0x7FFF."""
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return 0x7FFF
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF


def conversion_inputs():
    rng = np.random.default_rng(0)
    all_bf16 = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    # values just around e4m3 rounding boundaries: every e4m3 value and the midpoints, +-1 ulp
    grid = np.arange(256, dtype=np.uint8)
    import ml_dtypes

    e = grid.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    e = e[np.isfinite(e)]
    e.sort()
    mids = (e[1:].astype(np.float64) + e[:-1]) / 2
    near = np.concatenate([mids, e]).astype(np.float32)
    near = np.concatenate([near, np.nextafter(near, np.float32(np.inf)),
                           np.nextafter(near, np.float32(-np.inf))])
    rand = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    normal = rng.normal(0, 100, 20000).astype(np.float32)
    return np.concatenate([all_bf16, near, rand, normal,
                           np.array([448, 464, 465, 480, -464, 1e38, np.inf, -np.inf, np.nan],
                                    np.float32)])


def test_host_e4m3_matches_reference():
    x = conversion_inputs()
    got = P.f32_to_e4m3_bits(x)
    want = np.array([ref_e4m3(float(v)) for v in x], np.uint8)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(float(x[i]), hex(got[i]), hex(want[i])) for i in bad[:10]]


def test_host_bf16_matches_reference():
    x = conversion_inputs()
    bits = x.view(np.uint32)
    got = P.f32_to_bf16_bits(x)
    want = np.array([ref_bf16(int(b)) for b in bits], np.uint16)
    bad = np.nonzero(got != want)[0]
    assert bad.size == 0, [(hex(bits[i]), hex(got[i]), hex(want[i])) for i in bad[:10]]


def test_host_decoders_roundtrip():
    b = np.arange(256, dtype=np.uint8)
    f = P.e4m3_bits_to_f32(b)
    finite = ~np.isnan(f)
    assert set(np.nonzero(~finite)[0]) == {0x7F, 0xFF}
    np.testing.assert_array_equal(P.f32_to_e4m3_bits(f[finite]), b[finite])
    h = np.arange(1 << 16, dtype=np.uint16)
    g = P.bf16_bits_to_f32(h)
    ok = ~np.isnan(g)
    np.testing.assert_array_equal(P.f32_to_bf16_bits(g[ok]), h[ok])


def test_scalar_fallbacks_pack_in_array_order():
    fb = P.FALLBACKS
    assert fb["cvt_e4m3x2"](1.0, -2.0) == 0xC0 << 8 | 0x38
    assert fb["cvt_bf16x2"](1.0, -2.0) == 0xC000 << 16 | 0x3F80
    f0, f1 = fb["e4m3x2_to_f32x2"](0xC038)
    assert (f0, f1) == (1.0, -2.0)
    g0, g1 = fb["bf16x2_to_f32x2"](0xC0003F80)
    assert (g0, g1) == (1.0, -2.0)


def test_host_pointer_fallback():
    a = np.arange(8, dtype=np.int32)
    p = P.FALLBACKS["ptr_i32"](a.ctypes.data + 8)
    assert p[0] == 2 and p[-1] == 1
    p[1] = -5
    assert a[3] == -5
    with pytest.raises(TypeError, match="float"):
        P.FALLBACKS["ptr_i32"](float(a.ctypes.data))


# --------------------------------------------------------------------------------------------------
# The simulator fallbacks, end to end (subprocess: the simulator is chosen at numba import)
# --------------------------------------------------------------------------------------------------

def test_simulator_fallbacks():
    script = os.path.join(os.path.dirname(__file__), "sim", "ptx_sim_check.py")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL OK" in proc.stdout


# --------------------------------------------------------------------------------------------------
# The GPU tests' kernels compile for sm_90 here (their typing errors show up in CPU CI)
# --------------------------------------------------------------------------------------------------

def load_gpu_test_module():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "gpu", "test_ptx_gpu.py")
    spec = importlib.util.spec_from_file_location("_numba_ep_test_ptx_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_test_kernels_compile(fake_sm90):
    gpu = load_gpu_test_module()
    for kernel, sig in gpu.KERNELS:
        text = compile_ptx(kernel.py_func, sig)
        assert ".entry" in text, kernel.py_func.__name__
