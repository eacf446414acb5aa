"""GPU checks of numba_ep.kernels.ptx: each intrinsic does on the hardware what its docstring says.

Needs one CUDA GPU of compute capability 9.0 or newer (bulk copies, mbarrier transaction counts,
elect.sync); every test skips with a reason otherwise. Device memory is CuPy's; kernels take only
scalars, global addresses as ``np.uint64(arr.data.ptr)``, launched through the numba dispatcher.
Every spin-wait inside these kernels is bounded by %globaltimer, so a broken primitive fails a test
instead of hanging the GPU.

``KERNELS`` lists every kernel with the argument types its test launches it with, so that
tests/test_ptx_compile.py can compile them all for sm_90 on a CPU.
"""
import time

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)
import numba
import numpy as np
import pytest
from numba import cuda, types

from numba_ep.kernels import ptx as P

pytestmark = pytest.mark.gpu

TIMEOUT_NS = 5_000_000_000  # 5 s: far above any legitimate wait here
U64, I64, I32, F32 = types.uint64, types.int64, types.int32, types.float32


@pytest.fixture(autouse=True)
def _need_sm90():
    if P.SIMULATOR:
        pytest.skip("NUMBA_ENABLE_CUDASIM=1: the simulator cannot run inline PTX")
    if not cuda.is_available():
        pytest.skip("no CUDA GPU (numba.cuda.is_available() is False)")
    cc = cuda.get_current_device().compute_capability
    if tuple(cc) < (9, 0):
        pytest.skip(f"needs compute capability >= 9.0, this GPU is {cc}")


@pytest.fixture
def cp():
    return pytest.importorskip("cupy")


def addr(a):
    """The uint64 device address of a CuPy array."""
    return np.uint64(a.data.ptr)


def run(kernel, grid, block, *args):
    kernel[grid, block](*args)
    cuda.synchronize()


u64 = numba.uint64  # in kernels: u64(x) converts to uint64, for address arithmetic


# --------------------------------------------------------------------------------------------------
# Typed pointers, scalar loads and stores
# --------------------------------------------------------------------------------------------------

@cuda.jit
def k_ptr_f32(src, dst, n):
    i = cuda.grid(1)
    if i < n:
        s = P.ptr_f32(src)
        d = P.ptr_f32(dst)
        d[i] = s[i] * 2 + 1


def test_ptr_f32_loads_and_stores(cp):
    n = 10_001
    x = cp.arange(n, dtype=cp.float32) / 7
    y = cp.zeros(n, cp.float32)
    run(k_ptr_f32, (n + 255) // 256, 256, addr(x), addr(y), np.int64(n))
    np.testing.assert_array_equal(y.get(), x.get() * np.float32(2) + np.float32(1))


@cuda.jit
def k_scalar_ops(src32, src64, out32, out64, n):
    """out32 rows: 0-2 u32 loads (acquire.sys, acquire.gpu, volatile), 3-5 the same as i32,
    6-8 u32 stores (release.sys, release.gpu, relaxed.sys), 9-11 the same as i32.
    out64 rows: 0-2 u64 loads, 3-5 u64 stores."""
    i = cuda.grid(1)
    if i < n:
        a32 = src32 + u64(4 * i)
        a64 = src64 + u64(8 * i)
        o32 = P.ptr_u32(out32)
        i32 = P.ptr_i32(out32)
        o64 = P.ptr_u64(out64)
        o32[0 * n + i] = P.ld_acquire_sys_u32(a32)
        o32[1 * n + i] = P.ld_acquire_gpu_u32(a32)
        o32[2 * n + i] = P.ld_volatile_u32(a32)
        i32[3 * n + i] = P.ld_acquire_sys_i32(a32)
        i32[4 * n + i] = P.ld_acquire_gpu_i32(a32)
        i32[5 * n + i] = P.ld_volatile_i32(a32)
        v = P.ptr_u32(src32)[i]
        w = P.ptr_i32(src32)[i]
        P.st_release_sys_u32(out32 + u64(4 * (6 * n + i)), v)
        P.st_release_gpu_u32(out32 + u64(4 * (7 * n + i)), v)
        P.st_relaxed_sys_u32(out32 + u64(4 * (8 * n + i)), v)
        P.st_release_sys_i32(out32 + u64(4 * (9 * n + i)), w)
        P.st_release_gpu_i32(out32 + u64(4 * (10 * n + i)), w)
        P.st_relaxed_sys_i32(out32 + u64(4 * (11 * n + i)), w)
        o64[0 * n + i] = P.ld_acquire_sys_u64(a64)
        o64[1 * n + i] = P.ld_acquire_gpu_u64(a64)
        o64[2 * n + i] = P.ld_volatile_u64(a64)
        z = P.ptr_u64(src64)[i]
        P.st_release_sys_u64(out64 + u64(8 * (3 * n + i)), z)
        P.st_release_gpu_u64(out64 + u64(8 * (4 * n + i)), z)
        P.st_relaxed_sys_u64(out64 + u64(8 * (5 * n + i)), z)


def test_scalar_loads_and_stores_keep_every_bit(cp):
    n = 4096
    rng = np.random.default_rng(3)
    s32 = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    s32[:4] = [0, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF]
    s64 = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    s64[:3] = [0, 2**64 - 1, 2**63]
    src32, src64 = cp.asarray(s32), cp.asarray(s64)
    out32 = cp.zeros((12, n), cp.uint32)
    out64 = cp.zeros((6, n), cp.uint64)
    run(k_scalar_ops, n // 128, 128, addr(src32), addr(src64), addr(out32), addr(out64),
        np.int64(n))
    for row, got in enumerate(out32.get()):
        np.testing.assert_array_equal(got, s32, err_msg=f"out32 row {row}")
    for row, got in enumerate(out64.get()):
        np.testing.assert_array_equal(got, s64, err_msg=f"out64 row {row}")


# --------------------------------------------------------------------------------------------------
# 16-byte vector copies
# --------------------------------------------------------------------------------------------------

@cuda.jit
def k_copy_v4(src, dst, n16, mode):
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n16:
        off = u64(i) * u64(16)
        if mode == 0:
            a, b, c, d = P.ld_nc_v4(src + off)
            P.st_na_v4(dst + off, a, b, c, d)
        elif mode == 1:
            a, b, c, d = P.ld_v4(src + off)
            P.st_v4(dst + off, a, b, c, d)
        else:
            a, b, c, d = P.ld_volatile_v4(src + off)
            P.st_na_v4(dst + off, a, b, c, d)
        i += stride


@pytest.mark.parametrize("mode", [0, 1, 2], ids=["ld_nc_v4+st_na_v4", "ld_v4+st_v4",
                                                  "ld_volatile_v4+st_na_v4"])
def test_vector_copy_is_exact(cp, mode):
    nbytes = (1 << 20) + 48
    src = cp.asarray(np.random.default_rng(mode).integers(0, 256, nbytes, dtype=np.uint8))
    dst = cp.zeros(nbytes + 16, cp.uint8)  # one spare vector: must stay untouched
    run(k_copy_v4, 64, 256, addr(src), addr(dst), np.int64(nbytes // 16), np.int32(mode))
    np.testing.assert_array_equal(dst[:nbytes].get(), src.get())
    assert int(dst[nbytes:].sum()) == 0


# --------------------------------------------------------------------------------------------------
# mbarrier + 1-D bulk copies global -> shared -> global
# --------------------------------------------------------------------------------------------------

CHUNK = 4096  # bytes per stage; 256 threads x 16 bytes


@cuda.jit
def k_bulk_roundtrip(src, dst, dst_inv, nbytes, errors):
    """Each block walks chunks b, b + grid, ...: bulk-load a chunk into shared memory (mbarrier
    with expect_tx, phase flipping every chunk), bulk-store it unchanged to dst, then invert it in
    shared memory with generic v4 stores, fence.proxy.async, and bulk-store it to dst_inv."""
    buf = cuda.shared.array(CHUNK, numba.uint8, alignment=128)
    bar_slot = cuda.shared.array(1, numba.uint64)
    t = cuda.threadIdx.x
    sbuf = P.shared_addr(buf)
    bar = P.shared_addr(bar_slot)
    if t == 0:
        P.mbarrier_init(bar, 1)
        P.fence_mbarrier_init()
    cuda.syncthreads()
    policy = P.createpolicy_evict_first()
    phase = 0
    chunk = cuda.blockIdx.x
    while chunk * CHUNK < nbytes:
        off = chunk * CHUNK
        nb = min(CHUNK, nbytes - off)
        if t == 0:
            if chunk % 2 == 0:
                P.bulk_load_g2s(sbuf, src + u64(off), nb, bar)
            else:
                P.bulk_load_g2s_hint(sbuf, src + u64(off), nb, bar, policy)
            P.mbarrier_arrive_expect_tx(bar, nb)
        if not P.mbarrier_wait_parity_timeout(bar, phase, TIMEOUT_NS):
            P.atomic_add_gpu_i32(errors, 1)
        phase ^= 1
        if t == 0:
            P.bulk_store_s2g(dst + u64(off), sbuf, nb)
            P.bulk_commit_group()
            P.bulk_wait_group_read_0()  # shared source read: safe to overwrite
        cuda.syncthreads()
        if t * 16 < nb:
            a, b, c, d = P.ld_shared_v4(sbuf + t * 16)
            P.st_shared_v4(sbuf + t * 16, ~a, ~b, ~c, ~d)
        P.fence_proxy_async_shared_cta()  # generic writes -> visible to the bulk-copy engine
        cuda.syncthreads()
        if t == 0:
            P.bulk_store_s2g_hint(dst_inv + u64(off), sbuf, nb, P.createpolicy_evict_normal())
            P.bulk_commit_group()
            P.bulk_wait_group_read(0)
        cuda.syncthreads()
        chunk += cuda.gridDim.x
    if t == 0:
        P.bulk_wait_group_0()


@pytest.mark.parametrize("nbytes", [16, 4096, 4096 * 37 + 1040])
def test_bulk_copy_roundtrip(cp, nbytes):
    src = cp.asarray(np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8))
    dst = cp.zeros(nbytes + 16, cp.uint8)
    inv = cp.zeros(nbytes + 16, cp.uint8)
    errors = cp.zeros(1, cp.int32)
    run(k_bulk_roundtrip, 8, CHUNK // 16, addr(src), addr(dst), addr(inv), np.int64(nbytes),
        addr(errors))
    assert int(errors[0]) == 0, "mbarrier wait timed out"
    np.testing.assert_array_equal(dst[:nbytes].get(), src.get())
    np.testing.assert_array_equal(inv[:nbytes].get(), ~src.get())
    assert int(dst[nbytes:].sum()) == 0 and int(inv[nbytes:].sum()) == 0


@cuda.jit
def k_mbarrier_semantics(src, out):
    """out[0]: phase 0 of a 64-arrival barrier complete after 64 arrivals (1 = yes)
    out[1]: parity 1 (the next phase) reads as not complete (1 = right)
    out[2]: a 2-arrival barrier with one arrival times out (1 = right)
    out[3]: elapsed ns of that timed-out wait
    out[4]: expect_tx without the bytes keeps the phase open (1 = right)
    out[5]: the bytes of a 16-byte bulk load then complete it (1 = right)"""
    bars = cuda.shared.array(3, numba.uint64)
    buf = cuda.shared.array(16, numba.uint8, alignment=16)
    t = cuda.threadIdx.x
    b0 = P.shared_addr(bars)
    o = P.ptr_u64(out)
    if t == 0:
        P.mbarrier_init(b0, 64)
        P.mbarrier_init(b0 + 8, 2)
        P.mbarrier_init(b0 + 16, 1)
        P.fence_mbarrier_init()
    cuda.syncthreads()
    P.mbarrier_arrive(b0)
    done = P.mbarrier_wait_parity_timeout(b0, 0, TIMEOUT_NS)
    cuda.syncthreads()
    if t == 0:
        o[0] = 1 if done else 0
        o[1] = 0 if P.mbarrier_try_wait_parity(b0, 1) else 1
        P.mbarrier_arrive(b0 + 8)
        start = P.globaltimer()
        timed_out = not P.mbarrier_wait_parity_timeout(b0 + 8, 0, 200_000)
        o[2] = 1 if timed_out else 0
        o[3] = P.globaltimer() - start
        P.mbarrier_expect_tx(b0 + 16, 16)
        P.mbarrier_arrive(b0 + 16)
        o[4] = 1 if not P.mbarrier_wait_parity_timeout(b0 + 16, 0, 100_000) else 0
        P.bulk_load_g2s(P.shared_addr(buf), src, 16, b0 + 16)
        o[5] = 1 if P.mbarrier_wait_parity_timeout(b0 + 16, 0, TIMEOUT_NS) else 0


def test_mbarrier_semantics(cp):
    src = cp.arange(16, dtype=cp.uint8)
    out = cp.zeros(6, cp.uint64)
    run(k_mbarrier_semantics, 1, 64, addr(src), addr(out))
    o = out.get()
    assert o[0] == 1, "64 arrivals did not complete phase 0"
    assert o[1] == 1, "try_wait.parity(1) reported the next phase complete"
    assert o[2] == 1, "a barrier missing one arrival completed"
    assert 200_000 <= o[3] < 1_000_000_000, o[3]
    assert o[4] == 1, "a phase with pending tx bytes completed"
    assert o[5] == 1, "the bulk load's complete_tx did not finish the phase"


# --------------------------------------------------------------------------------------------------
# Release / acquire between two blocks of one GPU
# --------------------------------------------------------------------------------------------------

WORDS = 8192  # int32 words written per round


@cuda.jit(device=True)
def wait_at_least(flag, target, mode, deadline):
    """Spin until *flag >= target with the acquire flavour of ``mode``; False on timeout."""
    while True:
        if mode == 1:
            seen = P.ld_acquire_gpu_i32(flag)
        elif mode == 4:
            seen = P.ld_volatile_i32(flag)
            P.fence_acq_rel_sys()  # fence-based acquire after the relaxed read
        else:
            seen = P.ld_acquire_sys_i32(flag)
        if seen >= target:
            return True
        if P.globaltimer() > deadline:
            return False
        P.nanosleep(32)


@cuda.jit
def k_message_passing(data, flag, ack, errors, rounds, mode):
    """Block 0 writes WORDS words with plain stores, then publishes round r on ``flag`` with the
    release flavour of ``mode``; block 1 acquires it and checks every word. ``ack`` (release/acquire
    sys) keeps the producer from overwriting a round before it was checked.
    mode: 0 st.release.sys, 1 st.release.gpu (consumer ld.acquire.gpu), 2 red.release.sys add,
    3 atom.add.release.gpu, 4 fence.acq_rel.sys + st.relaxed.sys (consumer volatile + fence).
    errors: [0] wrong words seen, [1] consumer timeouts, [2] producer timeouts."""
    abort = cuda.shared.array(1, numba.int32)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    d = P.ptr_i32(data)
    if t == 0:
        abort[0] = 0
    cuda.syncthreads()
    r = 1
    while r <= rounds:
        if cuda.blockIdx.x == 0:
            if t == 0:
                if not wait_at_least(ack, r - 1, 0, P.globaltimer() + TIMEOUT_NS):
                    P.atomic_add_gpu_i32(errors + u64(8), 1)
                    abort[0] = 1
            cuda.syncthreads()
            if abort[0] != 0:
                return
            j = t
            while j < WORDS:
                d[j] = r * 1000003 + j
                j += nt
            cuda.syncthreads()
            if t == 0:
                if mode == 0:
                    P.st_release_sys_i32(flag, r)
                elif mode == 1:
                    P.st_release_gpu_i32(flag, r)
                elif mode == 2:
                    P.red_add_release_sys_i32(flag, 1)
                elif mode == 3:
                    P.atomic_add_release_gpu_i32(flag, 1)
                else:
                    P.fence_acq_rel_sys()
                    P.st_relaxed_sys_i32(flag, r)
        else:
            if t == 0:
                if not wait_at_least(flag, r, mode, P.globaltimer() + TIMEOUT_NS):
                    P.atomic_add_gpu_i32(errors + u64(4), 1)
                    abort[0] = 1
            cuda.syncthreads()
            if abort[0] != 0:
                return
            bad = 0
            j = t
            while j < WORDS:
                if d[j] != r * 1000003 + j:
                    bad += 1
                j += nt
            if bad:
                P.atomic_add_gpu_i32(errors, bad)
            cuda.syncthreads()
            if t == 0:
                P.st_release_sys_i32(ack, r)
        r += 1


@pytest.mark.parametrize("mode", [0, 1, 2, 3, 4], ids=["st.release.sys", "st.release.gpu",
                                                        "red.release.sys", "atom.release.gpu",
                                                        "fence+relaxed"])
def test_release_acquire_message_passing(cp, mode):
    rounds = 300
    data = cp.zeros(WORDS, cp.int32)
    flag = cp.zeros(1, cp.int32)
    ack = cp.zeros(1, cp.int32)
    errors = cp.zeros(3, cp.int32)
    run(k_message_passing, 2, 256, addr(data), addr(flag), addr(ack), addr(errors),
        np.int32(rounds), np.int32(mode))
    wrong, consumer_timeouts, producer_timeouts = errors.get()
    assert consumer_timeouts == 0 and producer_timeouts == 0, errors.get()
    assert wrong == 0, f"{wrong} stale words read after the acquire"
    assert int(flag[0]) == rounds and int(ack[0]) == rounds


# --------------------------------------------------------------------------------------------------
# Atomics under contention
# --------------------------------------------------------------------------------------------------

@cuda.jit
def k_atomic_counts(c, olds, olds_exch, n):
    """c (int32): [0] add.sys +1 (olds), [1] sub.sys 3, [2] add.release.gpu 2, [3] add.release.sys
    5, [4] add.acq_rel.sys 7, [5] add.gpu 1, [6..9] red release.sys/release.gpu/gpu/sys +1,
    [10] max.gpu i, [11] cas.sys 0->i+1, [12] cas.sys winners, [13] cas.gpu 0->i+1,
    [14] cas.gpu winners, [15] exch.sys i+1 (olds_exch)."""
    i = cuda.grid(1)
    if i < n:
        o = P.ptr_i32(olds)
        o[i] = P.atomic_add_sys_i32(c, 1)
        P.atomic_sub_sys_i32(c + u64(4), 3)
        P.atomic_add_release_gpu_i32(c + u64(8), 2)
        P.atomic_add_release_sys_i32(c + u64(12), 5)
        P.atomic_add_acq_rel_sys_i32(c + u64(16), 7)
        P.atomic_add_gpu_i32(c + u64(20), 1)
        P.red_add_release_sys_i32(c + u64(24), 1)
        P.red_add_release_gpu_i32(c + u64(28), 1)
        P.red_add_gpu_i32(c + u64(32), 1)
        P.red_add_sys_i32(c + u64(36), 1)
        P.atomic_max_gpu_i32(c + u64(40), i)
        if P.atomic_cas_sys_i32(c + u64(44), 0, i + 1) == 0:
            P.atomic_add_gpu_i32(c + u64(48), 1)
        if P.atomic_cas_gpu_i32(c + u64(52), 0, i + 1) == 0:
            P.atomic_add_gpu_i32(c + u64(56), 1)
        P.ptr_i32(olds_exch)[i] = P.atomic_exch_sys_i32(c + u64(60), i + 1)


def test_atomics_return_old_values_and_sum(cp):
    n = 120 * 256
    c = cp.zeros(16, cp.int32)
    olds = cp.full(n, -1, cp.int32)
    olds_exch = cp.full(n, -1, cp.int32)
    run(k_atomic_counts, 120, 256, addr(c), addr(olds), addr(olds_exch), np.int64(n))
    c = c.get()
    np.testing.assert_array_equal(np.sort(olds.get()), np.arange(n))
    assert c[0] == n
    assert c[1] == -3 * n
    assert (c[2], c[3], c[4], c[5]) == (2 * n, 5 * n, 7 * n, n)
    assert list(c[6:10]) == [n] * 4
    assert c[10] == n - 1
    assert 1 <= c[11] <= n and c[12] == 1
    assert 1 <= c[13] <= n and c[14] == 1
    seen = np.sort(np.append(olds_exch.get(), c[15]))  # every value exchanged out exactly once
    np.testing.assert_array_equal(seen, np.arange(n + 1))


@cuda.jit
def k_atomic_u64(c, olds, n):
    """c (uint64): [0] add.sys 2**33 (olds), [1] add.gpu 3, [2] cas.sys 0 -> 2**40 + i,
    [3] cas.sys winners."""
    i = cuda.grid(1)
    if i < n:
        P.ptr_u64(olds)[i] = P.atomic_add_sys_u64(c, u64(1) << u64(33))
        P.atomic_add_gpu_u64(c + u64(8), 3)
        if P.atomic_cas_sys_u64(c + u64(16), 0, (u64(1) << u64(40)) + u64(i)) == 0:
            P.atomic_add_gpu_u64(c + u64(24), 1)


def test_atomics_u64(cp):
    n = 64 * 256
    c = cp.zeros(4, cp.uint64)
    olds = cp.zeros(n, cp.uint64)
    run(k_atomic_u64, 64, 256, addr(c), addr(olds), np.int64(n))
    c = c.get()
    assert c[0] == n << 33
    np.testing.assert_array_equal(np.sort(olds.get()), np.arange(n, dtype=np.uint64) << 33)
    assert c[1] == 3 * n
    assert (1 << 40) <= c[2] < (1 << 40) + n and c[3] == 1


@cuda.jit
def k_cas_increment(c, n, errors):
    """Lock-free increment with a CAS loop (ld.volatile + atom.cas.sys), n threads."""
    i = cuda.grid(1)
    if i < n:
        deadline = P.globaltimer() + TIMEOUT_NS
        while True:
            old = P.ld_volatile_i32(c)
            if P.atomic_cas_sys_i32(c, old, old + 1) == old:
                break
            if P.globaltimer() > deadline:
                P.atomic_add_gpu_i32(errors, 1)
                break


def test_cas_loop_increment(cp):
    n = 1024
    c = cp.zeros(1, cp.int32)
    errors = cp.zeros(1, cp.int32)
    run(k_cas_increment, 8, 128, addr(c), np.int64(n), addr(errors))
    assert int(errors[0]) == 0
    assert int(c[0]) == n


@cuda.jit
def k_shared_lock(out, errors):
    """Lane 0 of every warp takes a shared-memory spin lock (atom.acquire.cta cas /
    atom.release.cta exch) and increments a plain shared counter inside it (one lane per warp, as
    DeepEP's sender warps do: lanes of one warp spinning on each other is a different matter)."""
    lock = cuda.shared.array(1, numba.int32)
    count = cuda.shared.array(1, numba.int32)
    t = cuda.threadIdx.x
    if t == 0:
        lock[0] = 0
        count[0] = 0
    cuda.syncthreads()
    lk = P.shared_addr(lock)
    if cuda.laneid == 0:
        deadline = P.globaltimer() + TIMEOUT_NS
        got = True
        while P.atomic_cas_acquire_cta_shared_i32(lk, 0, 1) != 0:
            if P.globaltimer() > deadline:
                got = False
                break
        if got:
            count[0] = count[0] + 1
            P.atomic_exch_release_cta_shared_i32(lk, 0)
        else:
            P.atomic_add_gpu_i32(errors, 1)
    cuda.syncthreads()
    if t == 0:
        P.ptr_i32(out)[cuda.blockIdx.x] = count[0] + 1000 * P.ld_acquire_cta_shared_i32(lk)


def test_shared_memory_lock(cp):
    out = cp.full(4, -1, cp.int32)
    errors = cp.zeros(1, cp.int32)
    run(k_shared_lock, 4, 1024, addr(out), addr(errors))
    assert int(errors[0]) == 0
    np.testing.assert_array_equal(out.get(), 32)  # lock free again (0) and one increment per warp


# --------------------------------------------------------------------------------------------------
# FP8 e4m3 and BF16 conversions, bit-exact against the host twins (ml_dtypes based)
# --------------------------------------------------------------------------------------------------

@cuda.jit
def k_encode(x, e4m3, bf16x2, bf16, n_pairs):
    i = cuda.grid(1)
    if i < n_pairs:
        xs = P.ptr_f32(x)
        lo = xs[2 * i]
        hi = xs[2 * i + 1]
        P.ptr_u16(e4m3)[i] = P.cvt_e4m3x2(lo, hi)
        P.ptr_u32(bf16x2)[i] = P.cvt_bf16x2(lo, hi)
        b = P.ptr_u16(bf16)
        b[2 * i] = P.cvt_bf16(lo)
        b[2 * i + 1] = P.cvt_bf16(hi)


def encode_inputs():
    import ml_dtypes

    rng = np.random.default_rng(42)
    all_bf16 = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)
    e = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    e = np.sort(e[np.isfinite(e)])
    mids = ((e[1:].astype(np.float64) + e[:-1]) / 2).astype(np.float32)  # e4m3 ties
    near = np.concatenate([e, mids])
    near = np.concatenate([near, np.nextafter(near, np.float32(np.inf)),
                           np.nextafter(near, np.float32(-np.inf))])
    bf_ties = ((rng.integers(0, 1 << 16, 20000, dtype=np.uint32) << 16) | 0x8000).view(np.float32)
    rand_bits = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, 448, -448, 464, -464, 465, 480, 1e38, 3.4e38, np.inf, -np.inf,
                        np.nan, -np.nan, 2.0**-9, 2.0**-10, 1.5 * 2.0**-10, 1e-45, -1e-45],
                       np.float32)
    x = np.concatenate([all_bf16, near, bf_ties, rand_bits, rng.normal(0, 50, 100000)
                        .astype(np.float32), special])
    return x if x.size % 2 == 0 else np.append(x, np.float32(1.0))


def test_cvt_e4m3x2_and_bf16_match_host_bit_for_bit(cp):
    x = encode_inputs()
    n_pairs = x.size // 2
    dx = cp.asarray(x)
    e4 = cp.zeros(n_pairs, cp.uint16)
    b2 = cp.zeros(n_pairs, cp.uint32)
    b1 = cp.zeros(x.size, cp.uint16)
    run(k_encode, (n_pairs + 255) // 256, 256, addr(dx), addr(e4), addr(b2), addr(b1),
        np.int64(n_pairs))
    nan = np.isnan(x)

    got = e4.get().view(np.uint8)  # little-endian: element 2i is lo, i.e. array order
    want = P.f32_to_e4m3_bits(x)
    assert np.all((got[nan] & 0x7F) == 0x7F), "NaN did not convert to an e4m3 NaN"
    bad = np.nonzero((got != want) & ~nan)[0]
    assert bad.size == 0, [(float(x[i]), hex(got[i]), hex(want[i])) for i in bad[:10]]

    want_bf = P.f32_to_bf16_bits(x)
    for name, got_bf in (("cvt_bf16x2", b2.get().view(np.uint16)), ("cvt_bf16", b1.get())):
        is_nan_out = ((got_bf & 0x7F80) == 0x7F80) & ((got_bf & 0x7F) != 0)
        assert np.all(is_nan_out[nan]), f"{name}: NaN did not convert to a bf16 NaN"
        bad = np.nonzero((got_bf != want_bf) & ~nan)[0]
        assert bad.size == 0, (name, [(hex(x.view(np.uint32)[i]), hex(got_bf[i]), hex(want_bf[i]))
                                      for i in bad[:10]])


def test_nan_encodings_are_canonical(cp):
    """The host twins (like NVIDIA's host emulation) give NaN -> 0x7F (e4m3) and 0x7FFF (bf16),
    whatever the input NaN's sign and payload. If this fails, the hardware differs: update
    f32_to_e4m3_bits / f32_to_bf16_bits to match it."""
    nans = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF, 0x7FBFFFFF, 0xFF800001],
                    np.uint32).view(np.float32)
    n_pairs = nans.size // 2
    dx = cp.asarray(nans)
    e4 = cp.zeros(n_pairs, cp.uint16)
    b2 = cp.zeros(n_pairs, cp.uint32)
    b1 = cp.zeros(nans.size, cp.uint16)
    run(k_encode, 1, 32, addr(dx), addr(e4), addr(b2), addr(b1), np.int64(n_pairs))
    assert [hex(v) for v in e4.get().view(np.uint8)] == ["0x7f"] * nans.size
    assert [hex(v) for v in b2.get().view(np.uint16)] == ["0x7fff"] * nans.size
    assert [hex(v) for v in b1.get()] == ["0x7fff"] * nans.size


@cuda.jit
def k_decode(e4m3_pairs, bf16_pairs, out_e, out_b, out_b1, n_e, n_b):
    i = cuda.grid(1)
    if i < n_e:
        f0, f1 = P.e4m3x2_to_f32x2(P.ptr_u16(e4m3_pairs)[i])
        o = P.ptr_f32(out_e)
        o[2 * i] = f0
        o[2 * i + 1] = f1
    if i < n_b:
        packed = P.ptr_u32(bf16_pairs)[i]
        g0, g1 = P.bf16x2_to_f32x2(packed)
        o = P.ptr_f32(out_b)
        o[2 * i] = g0
        o[2 * i + 1] = g1
        h = P.ptr_u16(bf16_pairs)
        ob = P.ptr_f32(out_b1)
        ob[2 * i] = P.bf16_to_f32(h[2 * i])
        ob[2 * i + 1] = P.bf16_to_f32(h[2 * i + 1])


def test_decoders_are_exact_for_every_pattern(cp):
    e_bytes = np.arange(256, dtype=np.uint8)
    b_bits = np.arange(1 << 16, dtype=np.uint16)
    de = cp.asarray(e_bytes)
    db = cp.asarray(b_bits)
    out_e = cp.zeros(256, cp.float32)
    out_b = cp.zeros(1 << 16, cp.float32)
    out_b1 = cp.zeros(1 << 16, cp.float32)
    run(k_decode, 128, 256, addr(de), addr(db), addr(out_e), addr(out_b), addr(out_b1),
        np.int64(128), np.int64(1 << 15))
    got = out_e.get()
    want = P.e4m3_bits_to_f32(e_bytes)
    nan = np.isnan(want)
    assert set(np.nonzero(nan)[0]) == {0x7F, 0xFF}
    assert np.all(np.isnan(got[nan]))
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    want_b = P.bf16_bits_to_f32(b_bits).view(np.uint32)  # pure bit shift: NaN payloads too
    np.testing.assert_array_equal(out_b.get().view(np.uint32), want_b)
    np.testing.assert_array_equal(out_b1.get().view(np.uint32), want_b)


@cuda.jit
def k_misc_math(x, out, n):
    i = cuda.grid(1)
    if i < n:
        v = P.ptr_f32(x)[i]
        o = P.ptr_f32(out)
        o[3 * i] = P.ex2_approx(v)
        o[3 * i + 1] = P.lg2_approx(abs(v) + numba.float32(1e-3))
        o[3 * i + 2] = P.bitcast_u32_f32(P.bitcast_f32_u32(v) ^ numba.uint32(0x80000000))


def test_approx_math_and_bitcasts(cp):
    x = np.random.default_rng(5).uniform(-20, 20, 10000).astype(np.float32)
    dx = cp.asarray(x)
    out = cp.zeros(3 * x.size, cp.float32)
    run(k_misc_math, 40, 256, addr(dx), addr(out), np.int64(x.size))
    o = out.get().reshape(-1, 3)
    np.testing.assert_allclose(o[:, 0], np.exp2(x.astype(np.float64)), rtol=2e-6)
    np.testing.assert_allclose(o[:, 1], np.log2(np.abs(x).astype(np.float64) + 1e-3), rtol=2e-6,
                               atol=2e-6)
    np.testing.assert_array_equal(o[:, 2], -x)


# --------------------------------------------------------------------------------------------------
# Timer, sleep, SM id, election
# --------------------------------------------------------------------------------------------------

@cuda.jit
def k_timer(out, wait_ns):
    if cuda.grid(1) == 0:
        o = P.ptr_u64(out)
        t0 = P.globaltimer()
        spins = 0
        t = t0
        while t - t0 < wait_ns:
            P.nanosleep(1000)
            spins += 1
            t = P.globaltimer()
        o[0] = t0
        o[1] = t
        o[2] = spins
        o[3] = P.smid()


def test_globaltimer_and_nanosleep(cp):
    out1 = cp.zeros(4, cp.uint64)
    out2 = cp.zeros(4, cp.uint64)
    run(k_timer, 1, 32, addr(out1), np.uint64(200_000))
    time.sleep(0.02)
    run(k_timer, 1, 32, addr(out2), np.uint64(0))
    t0, t1, spins, sm = out1.get()
    assert t1 > t0 and 200_000 <= t1 - t0 < 1_000_000_000, (t0, t1)
    assert spins >= 1
    assert sm < cuda.get_current_device().MULTIPROCESSOR_COUNT
    assert out2.get()[0] - t1 >= 10_000_000, "globaltimer did not advance with the host clock"


@cuda.jit
def k_elect(count, leader, errors):
    warp = cuda.grid(1) // 32
    lane = cuda.laneid
    elected = P.elect_sync()
    if elected:
        P.atomic_add_gpu_i32(count + u64(4 * warp), 1)
        P.ptr_i32(leader)[warp] = lane
    # every lane agrees on who the leader is
    votes = cuda.ballot_sync(0xFFFFFFFF, elected)
    if votes == 0 or (votes & (votes - 1)) != 0:
        P.atomic_add_gpu_i32(errors, 1)


def test_elect_sync_elects_one_lane_per_warp(cp):
    blocks, threads = 6, 256
    warps = blocks * threads // 32
    count = cp.zeros(warps, cp.int32)
    leader = cp.full(warps, -1, cp.int32)
    errors = cp.zeros(1, cp.int32)
    run(k_elect, blocks, threads, addr(count), addr(leader), addr(errors))
    assert int(errors[0]) == 0
    np.testing.assert_array_equal(count.get(), 1)
    lead = leader.get()
    assert np.all((lead >= 0) & (lead < 32))


# Every kernel above with the argument types its test uses (compiled on a CPU by
# tests/test_ptx_compile.py::test_gpu_test_kernels_compile).
KERNELS = [
    (k_ptr_f32, (U64, U64, I64)),
    (k_scalar_ops, (U64, U64, U64, U64, I64)),
    (k_copy_v4, (U64, U64, I64, I32)),
    (k_bulk_roundtrip, (U64, U64, U64, I64, U64)),
    (k_mbarrier_semantics, (U64, U64)),
    (k_message_passing, (U64, U64, U64, U64, I32, I32)),
    (k_atomic_counts, (U64, U64, U64, I64)),
    (k_atomic_u64, (U64, U64, I64)),
    (k_cas_increment, (U64, I64, U64)),
    (k_shared_lock, (U64, U64)),
    (k_encode, (U64, U64, U64, U64, I64)),
    (k_decode, (U64, U64, U64, U64, U64, I64, I64)),
    (k_misc_math, (U64, U64, I64)),
    (k_timer, (U64, U64)),
    (k_elect, (U64, U64, U64)),
]
