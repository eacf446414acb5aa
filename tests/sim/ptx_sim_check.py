"""Runs small kernels that use numba_ep.kernels.ptx under the numba CUDA simulator and checks them.

Run as a script (``python tests/sim/ptx_sim_check.py``): it sets NUMBA_ENABLE_CUDASIM=1 itself,
before numba is imported, and exits non-zero with a message on the first failing check. It is driven
by tests/test_ptx_compile.py::test_simulator_fallbacks in a subprocess, because the simulator must
be chosen before numba is first imported.

Every kernel takes scalar arguments only: host NumPy arrays are passed by address
(``arr.ctypes.data``), exactly as the GPU path passes device addresses.
"""
import os
import sys

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numba_ep  # noqa: E402,F401  (NumPy shim before numba.cuda)
import numpy as np  # noqa: E402
import numba  # noqa: E402
from numba import cuda  # noqa: E402

from numba_ep.kernels import ptx  # noqa: E402

assert ptx.SIMULATOR, "the simulator was not selected"


def addr(a):
    return np.uint64(a.ctypes.data)


# --- typed pointers -----------------------------------------------------------------------------

@cuda.jit
def k_pointers(src_f32, dst_f32, src_i64, dst_u16, n):
    i = cuda.grid(1)
    if i < n:
        s = ptx.ptr_f32(src_f32)
        d = ptx.ptr_f32(dst_f32)
        d[i] = s[i] * 2 + 1
        q = ptx.ptr_i64(src_i64)
        q[i] = q[i] - 7
        h = ptx.ptr_u16(dst_u16)
        h[i] = i * 1000  # wraps modulo 2**16 like a C store


def check_pointers():
    n = 100
    a = np.arange(n, dtype=np.float32) / 3
    b = np.zeros(n, np.float32)
    c = np.arange(n, dtype=np.int64) * 10**12
    h = np.zeros(n, np.uint16)
    k_pointers[4, 32](addr(a), addr(b), addr(c), addr(h), n)
    np.testing.assert_array_equal(b, a * np.float32(2) + np.float32(1))
    np.testing.assert_array_equal(c, np.arange(n, dtype=np.int64) * 10**12 - 7)
    np.testing.assert_array_equal(h, (np.arange(n) * 1000) % 65536)
    p = ptx.ptr_u32(addr(h))
    assert p[0] == 1000 << 16  # little-endian: h[0] = 0, h[1] = 1000
    assert isinstance(p[0], np.uint32)


# --- acquire / release, atomics -----------------------------------------------------------------

@cuda.jit
def k_release_acquire(data, flag, out, n, timeout_ns):
    # Block 0 produces, block 1 consumes (the simulator runs block 0 to completion first, so this
    # only proves that the calls work on host memory, not their ordering).
    t = cuda.threadIdx.x
    d = ptx.ptr_i32(data)
    if cuda.blockIdx.x == 0:
        d[t] = t * t + 1
        cuda.syncthreads()
        if t == 0:
            ptx.fence_acq_rel_sys()
            ptx.st_release_sys_i32(flag, n)
    else:
        start = ptx.globaltimer()
        seen = ptx.ld_acquire_sys_i32(flag)
        while seen != n:
            if ptx.globaltimer() - start > timeout_ns:
                break
            ptx.nanosleep(100)
            seen = ptx.ld_acquire_sys_i32(flag)
        o = ptx.ptr_i32(out)
        o[t] = d[t] if seen == n else -1


@cuda.jit
def k_atomics(counter_i32, counter_u64, olds, sub_target, cas_target):
    i = cuda.grid(1)
    o = ptx.ptr_i32(olds)
    o[i] = ptx.atomic_add_sys_i32(counter_i32, 1)
    ptx.atomic_add_sys_u64(counter_u64, numba.uint64(1) << numba.uint64(40))
    ptx.atomic_sub_sys_i32(sub_target, 3)
    ptx.red_add_release_sys_i32(sub_target, 1)
    # exactly one thread wins the CAS 0 -> i+1
    ptx.atomic_cas_sys_i32(cas_target, 0, i + 1)


def check_sync_and_atomics():
    n = 32
    data = np.zeros(n, np.int32)
    flag = np.zeros(1, np.int32)
    out = np.zeros(n, np.int32)
    k_release_acquire[2, n](addr(data), addr(flag), addr(out), n, 10**9)
    np.testing.assert_array_equal(out, np.arange(n) ** 2 + 1)
    assert ptx.ld_acquire_sys_i32(addr(flag)) == n
    assert ptx.ld_volatile_u32(addr(flag)) == n

    nthreads = 64
    c32 = np.zeros(1, np.int32)
    c64 = np.zeros(1, np.uint64)
    olds = np.full(nthreads, -1, np.int32)
    sub = np.zeros(1, np.int32)
    cas = np.zeros(1, np.int32)
    k_atomics[2, 32](addr(c32), addr(c64), addr(olds), addr(sub), addr(cas))
    assert c32[0] == nthreads
    np.testing.assert_array_equal(np.sort(olds), np.arange(nthreads))
    assert c64[0] == nthreads << 40
    assert sub[0] == -2 * nthreads
    assert 1 <= cas[0] <= nthreads

    # 64-bit CAS and wrap-around of 32-bit atomics, called directly on host memory
    w = np.array([2**31 - 1], np.int32)
    assert ptx.atomic_add_sys_i32(addr(w), 1) == 2**31 - 1 and w[0] == -(2**31)
    u = np.array([5], np.uint64)
    assert ptx.atomic_cas_sys_u64(addr(u), 4, 9) == 5 and u[0] == 5
    assert ptx.atomic_cas_sys_u64(addr(u), 5, 2**63) == 5 and u[0] == 2**63
    ptx.st_release_gpu_u64(addr(u), 2**64 - 1)
    assert ptx.ld_acquire_gpu_u64(addr(u)) == 2**64 - 1


# --- elect_sync ---------------------------------------------------------------------------------

@cuda.jit
def k_elect(counter, lanes):
    if ptx.elect_sync():
        ptx.atomic_add_sys_i32(counter, 1)
        p = ptx.ptr_i32(lanes)
        p[cuda.grid(1) // 32] = cuda.threadIdx.x % 32


def check_elect():
    counter = np.zeros(1, np.int32)
    lanes = np.full(4, -1, np.int32)
    k_elect[2, 64](addr(counter), addr(lanes))
    assert counter[0] == 4, counter  # one lane per warp, 4 warps
    np.testing.assert_array_equal(lanes, 0)


# --- 16-byte vectors, shared memory, mbarrier + bulk copies -------------------------------------

@cuda.jit
def k_v4_copy(src, dst, n16):
    i = cuda.grid(1)
    if i < n16:
        off = numba.uint64(i * 16)
        a, b, c, d = ptx.ld_nc_v4(src + off)
        ptx.st_na_v4(dst + off, a, b, c, d)


NBYTES = 512


@cuda.jit
def k_bulk_roundtrip(src, dst, dst2):
    buf = cuda.shared.array(NBYTES, numba.uint8)
    bar_slot = cuda.shared.array(1, numba.uint64)
    t = cuda.threadIdx.x
    sbuf = ptx.shared_addr(buf)
    bar = ptx.shared_addr(bar_slot)
    if t == 0:
        ptx.mbarrier_init(bar, 1)
        ptx.fence_mbarrier_init()
    cuda.syncthreads()
    if t == 0:
        # two halves, the expect_tx arriving between them
        ptx.bulk_load_g2s(sbuf, src, NBYTES // 2, bar)
        ptx.mbarrier_arrive_expect_tx(bar, NBYTES)
        ptx.bulk_load_g2s(sbuf + NBYTES // 2, src + NBYTES // 2, NBYTES // 2, bar)
    ok = ptx.mbarrier_wait_parity_timeout(bar, 0, 10**9)
    # phase 0 is complete: parity 0 now reads as done, parity 1 (the next phase) as pending
    done0 = ptx.mbarrier_try_wait_parity(bar, 0)
    done1 = ptx.mbarrier_try_wait_parity(bar, 1)
    if t == 0 and ok and done0 and not done1:
        ptx.fence_proxy_async_shared_cta()
        ptx.bulk_store_s2g(dst, sbuf, NBYTES)
        ptx.bulk_commit_group()
        ptx.bulk_wait_group_0()
    cuda.syncthreads()
    # every thread also copies 16 bytes of shared memory out with the v4 shared accessors
    if t < NBYTES // 16:
        a, b, c, d = ptx.ld_shared_v4(sbuf + t * 16)
        ptx.st_v4(dst2 + numba.uint64(t * 16), a, b, c, d)


def check_vectors_and_bulk():
    src = np.random.default_rng(1).integers(0, 2**32, NBYTES // 4, dtype=np.uint32)
    dst = np.zeros_like(src)
    k_v4_copy[2, 32](addr(src), addr(dst), NBYTES // 16)
    np.testing.assert_array_equal(dst, src)

    dst = np.zeros_like(src)
    dst2 = np.zeros_like(src)
    k_bulk_roundtrip[1, 64](addr(src), addr(dst), addr(dst2))
    np.testing.assert_array_equal(dst, src)
    np.testing.assert_array_equal(dst2, src)

    try:  # the emulation enforces the hardware's size rule
        ptx.bulk_store_s2g(addr(dst), addr(src), 24)
    except ValueError:
        pass
    else:
        raise AssertionError("bulk copy of 24 bytes was accepted")


# --- FP8 / BF16 conversions ---------------------------------------------------------------------

@cuda.jit
def k_convert(x, e4m3_out, bf16_out, dec_out, n_pairs):
    i = cuda.grid(1)
    if i < n_pairs:
        xs = ptx.ptr_f32(x)
        lo = xs[2 * i]
        hi = xs[2 * i + 1]
        e = ptx.ptr_u16(e4m3_out)
        packed = ptx.cvt_e4m3x2(lo, hi)
        e[i] = packed
        b = ptx.ptr_u32(bf16_out)
        packed_bf = ptx.cvt_bf16x2(lo, hi)
        b[i] = packed_bf
        d = ptx.ptr_f32(dec_out)
        f0, f1 = ptx.e4m3x2_to_f32x2(packed)
        g0, g1 = ptx.bf16x2_to_f32x2(packed_bf)
        d[4 * i] = f0
        d[4 * i + 1] = f1
        d[4 * i + 2] = g0
        d[4 * i + 3] = g1


def check_conversions():
    import ml_dtypes

    # (value, e4m3 byte): exact values, ties to even, saturation, denormals, signed zero, NaN
    cases = [
        (1.0, 0x38), (-1.0, 0xB8), (448.0, 0x7E), (-448.0, 0xFE), (500.0, 0x7E), (1e30, 0x7E),
        (np.inf, 0x7E), (-np.inf, 0xFE), (464.0, 0x7E), (0.0, 0x00), (-0.0, 0x80),
        (2.0**-9, 0x01), (2.0**-10, 0x00), (1.5 * 2.0**-10, 0x01), (3 * 2.0**-10, 0x02),
        (1.0625, 0x38), (1.1875, 0x3A), (2.0**-6, 0x08), (np.nan, 0x7F), (-np.nan, 0x7F),
    ]
    vals = np.array([c[0] for c in cases], np.float32)
    want_e4m3 = np.array([c[1] for c in cases], np.uint8)
    # bf16: ties to even (0x3F808000 -> 0x3F80, 0x3F818000 -> 0x3F82), overflow to inf, NaN
    bf_bits_in = np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00000001, 0x80008001,
                           0x7FC00001, 0x3F800001, 0xFF800000], np.uint32)
    bf_want = np.array([0x3F80, 0x3F82, 0x7F80, 0x0000, 0x8001, 0x7FFF, 0x3F80, 0xFF80], np.uint16)
    x = np.concatenate([vals, bf_bits_in.view(np.float32)])
    assert x.size % 2 == 0
    n_pairs = x.size // 2
    e = np.zeros(n_pairs, np.uint16)
    b = np.zeros(n_pairs, np.uint32)
    dec = np.zeros(4 * n_pairs, np.float32)
    k_convert[1, 32](addr(x), addr(e), addr(b), addr(dec), n_pairs)

    e_bytes = e.view(np.uint8)  # little-endian: lo lands first, as in the source array
    np.testing.assert_array_equal(e_bytes[: len(cases)], want_e4m3)
    bf_halves = b.view(np.uint16)
    np.testing.assert_array_equal(bf_halves[len(cases):], bf_want)

    dec = dec.reshape(n_pairs, 4)
    want_dec = e_bytes.view(ml_dtypes.float8_e4m3fn).astype(np.float32).reshape(n_pairs, 2)
    np.testing.assert_array_equal(dec[:, :2], want_dec)  # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(dec[:, 2:].reshape(-1).view(np.uint32),
                                  bf_halves.astype(np.uint32) << 16)

    assert ptx.bitcast_f32_u32(np.float32(1.0)) == 0x3F800000
    assert ptx.bitcast_u32_f32(0xC0000000) == np.float32(-2.0)
    assert ptx.bf16_to_f32(ptx.cvt_bf16(np.float32(3.0))) == np.float32(3.0)


CHECKS = [check_pointers, check_sync_and_atomics, check_elect, check_vectors_and_bulk,
          check_conversions]

if __name__ == "__main__":
    for check in CHECKS:
        check()
        print(f"{check.__name__}: ok", flush=True)
    print("ALL OK")
