"""Spawn targets for tests/gpu/test_low_latency_gpu.py: each function runs on one rank.

Every rank makes fresh random inputs, all-gathers what the NumPy reference needs
(``group.allgather_bytes`` of pickles), runs the GPU kernels and compares:

- dispatch: ``reference.check_low_latency_dispatch`` (exact: FP8 bytes, scales, src_info,
  layout_range, counts), plus cumulative_local_expert_recv_stats;
- combine: against ``reference.low_latency_combine`` fed the very expert outputs the GPU got
  (calc_diff < 1e-5: only fused multiply-adds and bf16 rounding differ), and end to end as
  DeepEP's test does, against x * sum of the valid weights (calc_diff < 9e-4 with FP8 or
  LogFMT on the way, < 1e-5 for pure BF16);
- LogFMT: the bytes on the wire (the receive slots) equal the reference encoding bit for bit.

The "expert" is dequantisation: y = bf16(e4m3 * scale) of each received row (or the bf16 row).
Functions return small dicts of diagnostics; any mismatch raises (spawn reports the traceback).
"""
import os
import pickle

import numpy as np

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)

# Shapes: "A" is the benchmark (DeepSeek-like) size; "B" has a hidden size that is not a
# multiple of 512 (the 4-byte path) and only 4 blocks per grid (grid-stride loops everywhere).
SHAPES = {
    "A": dict(M=128, H=7168, E=288, K=8, num_sms=None),
    "B": dict(M=48, H=640, E=24, K=5, num_sms=4),   # E divides by 1, 2, 3, 4, 6 and 8 ranks
}

# (shape, tokens (None = M), masked slots, use_fp8, round_scale, use_ue8m0, use_logfmt,
#  zero_copy, hooks, out=)
MATRIX = [
    ("A", None, 10, True, False, False, False, False, False, False),
    ("A", -3, 0, True, True, False, False, False, False, True),
    ("A", None, 10, True, True, True, False, False, True, False),
    ("A", None, 10, False, False, False, False, True, False, False),
    ("A", None, 10, True, False, False, True, False, False, False),
    ("A", 1, 0, True, False, False, False, False, False, False),
    ("A", 1, 8, False, False, False, False, False, True, False),
    ("B", None, 5, True, False, False, False, False, False, False),
    ("B", None, 5, False, False, False, False, True, True, True),
    ("B", 17, 3, True, True, False, True, False, False, False),
    ("B", 0, 0, True, False, False, False, False, False, False),
]


# ---------------------------------------------------------------------------------------------
# kernel specifications (for compiling everything in parallel before the ranks start)
# ---------------------------------------------------------------------------------------------

def kernel_specs(nranks):
    """Every (factory, signature, constants) the workers below launch with ``nranks`` ranks."""
    from numba_ep.kernels import low_latency as ll

    lists = []
    transports = ("auto", "nvshmem") if nranks > 1 else ("auto",)
    for s, transport in [(s, t) for s in SHAPES.values() for t in transports]:
        ctx = spec_context(nranks, s, transport)
        for fp8, rs, ue in [(True, False, False), (True, True, False), (True, True, True),
                            (False, False, False)]:
            if ue and s["H"] % 512:
                continue
            lists += ll.with_fused(ll.dispatch_kernels(ctx, s["K"], fp8, rs, ue))
        for lf, zc in [(False, False), (False, True), (True, False)]:
            lists += ll.with_fused(ll.combine_kernels(ctx, s["K"], lf, zc))
    return lists


def spec_context(nranks, shape, transport="auto"):
    """A LowLatencyContext of ``shape`` (a dict with M, H, E) over a fake symmetric buffer: enough
    to list the kernel specifications rank 0 will launch, without a GPU."""
    from types import SimpleNamespace

    from numba_ep.kernels import low_latency as ll
    from numba_ep.reference import get_low_latency_rdma_size_hint

    M, H, E = shape["M"], shape["H"], shape["E"]
    buf = SimpleNamespace(ptr=1 << 32, peer_ptrs=[(1 << 32) + (r << 36) for r in range(nranks)],
                          nbytes=get_low_latency_rdma_size_hint(M, H, nranks, E))
    return ll.LowLatencyContext(buf, 0, nranks, M, H, E, transport=transport)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _gather(group, obj):
    return [pickle.loads(b) for b in group.allgather_bytes(pickle.dumps(obj, protocol=5))]


class Env:
    """NVSHMEM, one symmetric buffer and LowLatencyContext per shape, a stream."""

    def __init__(self, group, names, timeout_s=None):
        import cupy

        from numba_ep.kernels.low_latency import LowLatencyContext
        from numba_ep.memory import SymmetricBuffer, nvshmem_init
        from numba_ep.reference import get_low_latency_rdma_size_hint

        self.group, self.rank, self.size = group, group.rank, group.size
        sizes = {n: get_low_latency_rdma_size_hint(SHAPES[n]["M"], SHAPES[n]["H"], self.size,
                                                   SHAPES[n]["E"]) for n in names}
        self.rt = nvshmem_init(group, heap_bytes=sum(sizes.values()) + (512 << 20))
        assert os.environ.get("NVSHMEM_DISABLE_NVLS") == "1"
        self.bufs, self.ctxs = {}, {}
        for n in names:
            s = SHAPES[n]
            self.bufs[n] = SymmetricBuffer(sizes[n])
            self.ctxs[n] = LowLatencyContext(self.bufs[n], self.rank, self.size, s["M"], s["H"],
                                             s["E"], timeout_s=timeout_s, num_sms=s["num_sms"])
            forced = os.environ.get("NUMBA_EP_LL_TRANSPORT") == "nvshmem" and self.size > 1
        assert self.ctxs[n].use_nvshmem == forced, "one host: every peer is NVLink-mapped"
        self.stream = cupy.cuda.Stream(non_blocking=True)

    def close(self):
        import cupy

        from numba_ep.memory import nvshmem_finalize

        cupy.cuda.runtime.deviceSynchronize()
        for b in self.bufs.values():
            b.close()
        nvshmem_finalize()


def make_inputs(rng, T, H, K, E, masked):
    """bf16 bits [T, H] with per-128-block magnitudes from 1e-3 to 20 (a zero block too),
    distinct top-k experts with ``masked`` slots set to -1, positive weights."""
    from numba_ep.bench_ll import random_topk
    from numba_ep.kernels.ptx import f32_to_bf16_bits

    blocks = rng.choice(np.array([1e-3, 0.05, 0.3, 1.0, 20.0], np.float32), size=(T, H // 128))
    x = rng.standard_normal((T, H)).astype(np.float32) * np.repeat(blocks, 128, axis=1)
    if T:
        x[0, :128] = 0.0          # amax floor
    bits = f32_to_bf16_bits(x)
    topk = random_topk(rng, T, K, E, masked)
    weights = (rng.random((T, K)) + 0.1).astype(np.float32)
    return bits, topk, weights


def _bf16(bits):
    from numba_ep.reference import bfloat16

    return np.ascontiguousarray(bits).view(bfloat16)


def fetch_dispatch(recv):
    """GPU dispatch results as host arrays for the checker (only the valid rows are copied),
    plus the (local expert, row) index arrays of the valid rows."""
    import cupy

    recv_x, scales, count, src, layout, _ = recv
    cnt = cupy.asnumpy(count).astype(np.int64)
    L = len(cnt)
    le_idx = np.repeat(np.arange(L), cnt)
    row_idx = (np.concatenate([np.arange(c) for c in cnt]) if L else np.zeros(0, np.int64))
    le_d, row_d = cupy.asarray(le_idx), cupy.asarray(row_idx)
    x = np.zeros(recv_x.shape, recv_x.dtype)
    if len(le_idx):
        x[le_idx, row_idx] = cupy.asnumpy(recv_x[le_d, row_d])
    sc = None
    if scales is not None:
        sc = np.zeros(scales.shape, scales.dtype)
        if len(le_idx):
            sc[le_idx, row_idx] = cupy.asnumpy(scales[le_d, row_d])
    got = {"recv_x": x, "recv_x_scales": sc, "recv_count": cnt.astype(np.int32),
           "src_info": cupy.asnumpy(src), "layout_range": cupy.asnumpy(layout)}
    return got, le_idx, row_idx


def expert(recv, le_idx, row_idx):
    """The stand-in expert on the device: y = bf16(dequantised received row), zero elsewhere.
    Returns (y [L, R*M, H] uint16 on the device, the valid rows' bits on the host)."""
    import cupy

    from numba_ep.kernels.ptx import e4m3_bits_to_f32

    recv_x, scales = recv[0], recv[1]
    L, RM, H = recv_x.shape
    y = cupy.zeros((L, RM, H), dtype=cupy.uint16)
    if not len(le_idx):
        return y, np.zeros((0, H), np.uint16)
    le_d, row_d = cupy.asarray(le_idx), cupy.asarray(row_idx)
    rows = recv_x[le_d, row_d]
    if scales is None:
        bits = rows
    else:
        table = cupy.asarray(e4m3_bits_to_f32(np.arange(256, dtype=np.uint8)))
        vals = table[rows]
        s = scales[le_d, row_d]
        if s.dtype == cupy.int32:            # UE8M0: 4 exponent bytes per word
            w = s.view(cupy.uint32)[..., None] >> cupy.asarray([0, 8, 16, 24], cupy.uint32)
            s = ((w & 0xFF) << 23).astype(cupy.uint32).view(cupy.float32).reshape(len(le_idx), -1)
        n, S = s.shape
        vals = (vals.reshape(n, S, 128) * s[..., None]).reshape(n, H)
        u = vals.view(cupy.uint32)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)
    y[le_d, row_d] = bits
    return y, cupy.asnumpy(bits)


def expected_wire(row_bits):
    """The LogFMT-10 bytes of one bf16 row, from the reference encoder."""
    from numba_ep import reference as ref

    enc = ref.logfmt10_encode(_bf16(row_bits))
    H = len(row_bits)
    meta = (enc.amax.view(np.uint16).astype(np.uint32)
            | (enc.amin.view(np.uint16).astype(np.uint32) << 16)).astype("<u4").tobytes()
    payload = []
    for d in range(H // 128):
        if enc.encoded[d]:
            payload.append(ref.logfmt10_pack_codes(enc.codes[d * 128:(d + 1) * 128])
                           .astype("<u4").tobytes())
        else:
            payload.append(np.asarray(row_bits[d * 128:(d + 1) * 128], "<u2").tobytes())
    return meta + b"".join(payload), int(enc.encoded.sum())


def check_wire(env, name, half, topk, parts, max_rows=48):
    """Compare my receive slots of the last combine (half ``half``) with the reference
    encoding of the rows the experts' ranks sent. Returns (rows, encoded divisions) checked."""
    import cupy

    ctx, buf = env.ctxs[name], env.bufs[name]
    M, E, L = ctx.num_max_dispatch_tokens_per_rank, ctx.num_experts, ctx.num_local_experts
    cmsg = ctx.layout["combine_msg_bytes"]
    recv_off = ctx.layout["recv_offsets"][half]
    pairs = [(t, int(e)) for t in range(topk.shape[0]) for e in topk[t] if e >= 0][:max_rows]
    checked = encoded = 0
    for t, e in pairs:
        d, le = e // L, e % L
        le_idx, row_idx, y_valid, src_info, layout = parts[d]
        lr = int(layout[le, env.rank])
        begin, count = lr >> 32, lr & 0xFFFFFFFF
        rows = [j for j in range(begin, begin + count) if src_info[le, j] == t]
        assert rows, f"no row of expert {e} for token {t}"
        k = np.nonzero((le_idx == le) & (row_idx == rows[0]))[0][0]
        want, n_enc = expected_wire(y_valid[k])
        off = recv_off + (e * M + t) * cmsg
        got = cupy.asnumpy(buf.local[off:off + len(want)]).tobytes()
        if got != want:
            i = next(i for i in range(len(want)) if got[i] != want[i])
            raise AssertionError(f"LogFMT bytes of expert {e}, token {t} differ from the "
                                 f"reference encoding at byte {i} of {len(want)} (the first "
                                 f"{4 * (ctx.hidden // 128)} bytes are the division meta)")
        checked += 1
        encoded += n_enc
    return checked, encoded


def one_round(env, name, seed, T=None, masked=0, use_fp8=True, round_scale=False, use_ue8m0=False,
              use_logfmt=False, zero_copy=False, hooks=False, use_out=False, full=True):
    """A dispatch and a combine with fresh inputs, checked as the module docstring says.
    ``full=False`` checks only counts, layout and the end-to-end combine (no all-gather of x)."""
    import cupy

    from numba_ep import reference as ref
    from numba_ep.kernels import low_latency as ll

    ctx, s, group = env.ctxs[name], SHAPES[name], env.group
    M, H, E, K, L, R = s["M"], s["H"], s["E"], s["K"], ctx.num_local_experts, env.size
    T = M if T is None else (M + T if T < 0 else T)
    rng = np.random.default_rng(seed * 7919 + env.rank)
    bits, topk, w = make_inputs(rng, T, H, K, E, masked)
    topks = _gather(group, topk)
    st = env.stream
    with st:
        x_d, topk_d, w_d = cupy.asarray(bits), cupy.asarray(topk), cupy.asarray(w)
        stats = cupy.full((L,), 5, dtype=cupy.int32)
        wait_d = cupy.full((R,), 7, dtype=cupy.int64)    # wait-cost stats only ever grow
        wait_c = cupy.full((R,), 7, dtype=cupy.int64)
    recv = ll.low_latency_dispatch(ctx, x_d, topk_d, use_fp8=use_fp8, round_scale=round_scale,
                                   use_ue8m0=use_ue8m0, cumulative_local_expert_recv_stats=stats,
                                   return_recv_hook=hooks, stream=st, wait_recv_cost_stats=wait_d)
    if hooks:
        assert recv[5] is not None and not recv[5].called
        with st:
            cupy.matmul(cupy.ones((512, 512), cupy.float32), cupy.ones((512, 512), cupy.float32))
        recv[5]()
    else:
        assert recv[5] is None
    st.synchronize()
    ctx.check()
    info = {}

    got, le_idx, row_idx = fetch_dispatch(recv)
    all_counts = np.zeros(E, np.int64)
    for tk in topks:
        all_counts += np.bincount(tk[tk >= 0], minlength=E)
    mine = all_counts[env.rank * L:(env.rank + 1) * L]
    assert (got["recv_count"] == mine).all(), (got["recv_count"], mine)
    assert (cupy.asnumpy(stats) == mine + 5).all(), "cumulative stats"
    lr = got["layout_range"]
    begins, counts = lr >> 32, lr & 0xFFFFFFFF
    assert (counts.sum(axis=1) == mine).all()
    assert (begins == np.cumsum(counts, axis=1) - counts).all(), "blocks in source-rank order"
    if use_fp8:
        assert got["recv_x_scales"].shape == (L, R * M, H // (512 if use_ue8m0 else 128))
        assert recv[1].strides[1] == 4, "scales are column-major (stride 1 along tokens)"
    if full:
        xs = _gather(group, bits)
        want = ref.low_latency_dispatch([_bf16(b) for b in xs], topks, M, E, use_fp8=use_fp8,
                                        round_scale=round_scale, use_ue8m0=use_ue8m0)[env.rank]
        ref.check_low_latency_dispatch(got, want)
        info["dispatch"] = "exact"

    y, y_valid = expert(recv, le_idx, row_idx)
    half = ctx.buffer_idx
    out_arr = None
    with st:
        if zero_copy:
            view = ll.next_combine_buffer(ctx)
            view[...] = y
            y_in = view
        else:
            y_in = y
        if use_out:
            out_arr = cupy.full((T, H), 0xFFFF, dtype=cupy.uint16)
    out, hk = ll.low_latency_combine(ctx, y_in, topk_d, w_d, recv[3], recv[4],
                                     use_logfmt=use_logfmt, zero_copy=zero_copy, out=out_arr,
                                     return_recv_hook=hooks, stream=st,
                                     wait_recv_cost_stats=wait_c)
    if hooks:
        hk()
    st.synchronize()
    ctx.check()
    # Each entry sums the waits of every (block, source) pair for that source; no single wait
    # outlasts the timeout (it would have raised), so no entry exceeds blocks x timeout. Ranks
    # that share a GPU (scripts/oversubscribe.py) wait whole time slices, hence no tighter bound.
    bound = max(ctx._num_sms, ctx.num_local_experts) * ctx.timeout_ns
    for what, arr in (("dispatch", wait_d), ("combine", wait_c)):
        ns = cupy.asnumpy(arr) - 7
        assert ((ns >= 0) & (ns <= bound)).all(), f"{what} wait-cost stats {ns} (bound {bound})"
    if use_out:
        assert out is out_arr
    got_out = cupy.asnumpy(out).view(np.uint16)
    got_f = _bf16(got_out).astype(np.float32)
    assert np.isfinite(got_f).all(), "NaN/inf in the combined output"

    x_f = _bf16(bits).astype(np.float32).astype(np.float64)
    wsum = np.where(topk >= 0, w, 0).astype(np.float64).sum(axis=1, keepdims=True)
    e2e = ref.calc_diff(got_f, x_f * wsum)
    info["e2e_diff"] = e2e
    assert e2e < (9e-4 if (use_fp8 or use_logfmt) else 1e-5), f"end-to-end calc_diff {e2e}"
    if full:
        parts = _gather(group, (le_idx, row_idx, y_valid, got["src_info"], got["layout_range"]))
        eo, handles = [], []
        for p in parts:
            a = np.zeros((L, R * M, H), np.uint16)
            if len(p[0]):
                a[p[0], p[1]] = p[2]
            eo.append(_bf16(a))
            handles.append({"src_info": p[3], "layout_range": p[4], "num_experts": E,
                            "num_max_dispatch_tokens_per_rank": M})
        want_out = ref.low_latency_combine(eo, topks, _gather(group, w), handles,
                                           use_logfmt=use_logfmt)[env.rank]
        diff = ref.calc_diff(got_f, want_out.astype(np.float32))
        info["combine_diff"] = diff
        assert diff < 1e-5, f"combine vs reference calc_diff {diff}"
        if use_logfmt:
            info["wire_rows"], info["wire_encoded_divisions"] = check_wire(env, name, half, topk,
                                                                           parts)
    return info


# ---------------------------------------------------------------------------------------------
# spawn targets
# ---------------------------------------------------------------------------------------------

def ll_matrix(group):
    """Every row of MATRIX once, fresh inputs each time."""
    env = Env(group, ["A", "B"])
    try:
        report = []
        for i, (name, T, masked, fp8, rs, ue, lf, zc, hooks, use_out) in enumerate(MATRIX):
            info = one_round(env, name, seed=100 + i, T=T, masked=masked, use_fp8=fp8,
                             round_scale=rs, use_ue8m0=ue, use_logfmt=lf, zero_copy=zc,
                             hooks=hooks, use_out=use_out)
            report.append((i, info))
        return report
    finally:
        env.close()


def ll_repeat(group, iterations=100, full_every=10):
    """``iterations`` dispatch+combine pairs in a row (the halves alternate every call), with
    fresh inputs and varying options; every ``full_every``-th is checked against the reference,
    the others by counts, layout and end to end. Then an odd number of calls (an extra
    dispatch), then clean_low_latency_buffer and one more checked round."""
    env = Env(group, ["A"])
    try:
        variants = [dict(), dict(use_fp8=False), dict(round_scale=True),
                    dict(use_logfmt=True, masked=4), dict(hooks=True, zero_copy=True,
                                                          use_fp8=False)]
        for i in range(iterations):
            kw = dict(variants[i % len(variants)])
            kw.setdefault("masked", 10)
            one_round(env, "A", seed=1000 + i, full=(i % full_every == 0), **kw)
        # odd number of calls: an extra dispatch whose result is dropped, then a full round
        import cupy

        from numba_ep.kernels import low_latency as ll

        ctx = env.ctxs["A"]
        rng = np.random.default_rng(5 + env.rank)
        bits, topk, _ = make_inputs(rng, 64, ctx.hidden, 8, ctx.num_experts, 0)
        with env.stream:
            ll.low_latency_dispatch(ctx, cupy.asarray(bits), cupy.asarray(topk), stream=env.stream)
        env.stream.synchronize()
        one_round(env, "A", seed=99, masked=3)
        # clean (collective: NVSHMEM barriers around the zeroing) restarts the sequence at half 0
        ll.clean_low_latency_buffer(ctx, env.stream)
        env.stream.synchronize()
        assert ctx.buffer_idx == 0
        assert int(cupy.count_nonzero(ctx.workspace)) == 0
        one_round(env, "A", seed=98, masked=3, round_scale=True)
        return {"iterations": iterations, "half": ctx.buffer_idx}
    finally:
        env.close()


def ll_graph(group, replays=3):
    """Capture dispatch (BF16) -> combine (the received rows as expert outputs) on a CuPy
    stream; replay with new inputs copied into the captured input arrays."""
    import cupy

    from numba_ep import reference as ref
    from numba_ep.kernels import low_latency as ll

    env = Env(group, ["A"])
    try:
        ctx, s, st = env.ctxs["A"], SHAPES["A"], env.stream
        M, H, E, K = s["M"], s["H"], s["E"], s["K"]
        rng = np.random.default_rng(42 + env.rank)
        bits, topk, w = make_inputs(rng, M, H, K, E, 10)
        with st:
            x_in, topk_in, w_in = cupy.asarray(bits), cupy.asarray(topk), cupy.asarray(w)

        def step():
            rx, _, cnt, src, lr, _ = ll.low_latency_dispatch(ctx, x_in, topk_in, use_fp8=False,
                                                             stream=st)
            out, _ = ll.low_latency_combine(ctx, rx, topk_in, w_in, src, lr, stream=st)
            return rx, cnt, src, lr, out

        step()                      # warm-up: kernels loaded, memory pool primed
        st.synchronize()
        group.barrier()
        half = ctx.buffer_idx
        st.begin_capture()
        rx, cnt, src, lr, out = step()
        graph = st.end_capture()
        assert ctx.buffer_idx == half, "a captured pair of calls leaves the half unchanged"
        diffs = []
        for r in range(replays):
            bits, topk, w = make_inputs(np.random.default_rng(7 * r + 1000 * env.rank), M, H, K,
                                        E, 10)
            with st:
                x_in[...] = cupy.asarray(bits)
                topk_in[...] = cupy.asarray(topk)
                w_in[...] = cupy.asarray(w)
            st.synchronize()
            group.barrier()
            graph.launch(st)
            st.synchronize()
            ctx.check()
            xs, topks = _gather(group, bits), _gather(group, topk)
            want = ref.low_latency_dispatch([_bf16(b) for b in xs], topks, M, E,
                                            use_fp8=False)[env.rank]
            got, _, _ = fetch_dispatch((rx, None, cnt, src, lr, None))
            ref.check_low_latency_dispatch(got, want)
            got_f = _bf16(cupy.asnumpy(out)).astype(np.float32)
            wsum = np.where(topk >= 0, w, 0).astype(np.float64).sum(axis=1, keepdims=True)
            d = ref.calc_diff(got_f, _bf16(bits).astype(np.float64) * wsum)
            assert d < 1e-5, f"replay {r}: combine calc_diff {d}"
            diffs.append(d)
        # eager calls still work after the replays
        one_round(env, "A", seed=77, masked=2)
        return {"replays": replays, "diffs": diffs}
    finally:
        env.close()


def ll_timeout(group):
    """Rank 1 sits out: rank 0's receive phases give up after 0.5 s and the host raises
    CommTimeoutError naming rank 1, first for the dispatch, then for the combine."""
    import cupy

    from numba_ep.errors import CommTimeoutError
    from numba_ep.kernels import low_latency as ll

    env = Env(group, ["B"], timeout_s=0.5)
    try:
        ctx = env.ctxs["B"]
        seen = []
        if env.rank == 0:
            rng = np.random.default_rng(3)
            bits, topk, w = make_inputs(rng, 8, ctx.hidden, 5, ctx.num_experts, 0)
            with env.stream:
                x_d, t_d, w_d = cupy.asarray(bits), cupy.asarray(topk), cupy.asarray(w)
                wait_d = cupy.zeros(2, cupy.int64)
                wait_c = cupy.zeros(2, cupy.int64)
            recv = ll.low_latency_dispatch(ctx, x_d, t_d, stream=env.stream,
                                           wait_recv_cost_stats=wait_d)
            env.stream.synchronize()
            try:
                ctx.check()
                raise AssertionError("dispatch: no timeout recorded")
            except CommTimeoutError as e:
                assert e.peer == 1 and e.rank == 0, (e.peer, e.rank)
                assert "low_latency_dispatch" in str(e), str(e)
                seen.append(str(e))
            # The wait for rank 1 lasted the whole timeout (0.5 s), per local expert.
            ns = cupy.asnumpy(wait_d)
            assert ns[1] >= 0.5e9 and ns[0] < 0.5e9, f"dispatch wait-cost stats {ns}"
            with env.stream:
                y = cupy.zeros((ctx.num_local_experts, 2 * ctx.num_max_dispatch_tokens_per_rank,
                                ctx.hidden), cupy.uint16)
            ll.low_latency_combine(ctx, y,
                                   t_d, w_d, recv[3], recv[4], stream=env.stream,
                                   wait_recv_cost_stats=wait_c)
            env.stream.synchronize()
            try:
                ctx.check()
                raise AssertionError("combine: no timeout recorded")
            except CommTimeoutError as e:
                assert e.peer == 1 and "low_latency_combine" in str(e), str(e)
                seen.append(str(e))
            ns = cupy.asnumpy(wait_c)   # block 0's wait only: one timeout, not one per block
            assert 0.5e9 <= ns[1] < 2e9 and ns[0] < 0.5e9, f"combine wait-cost stats {ns}"
        group.barrier()
        return seen
    finally:
        env.close()


def ll_bench(group):
    """The benchmark runs (few iterations) and returns sane numbers."""
    from numba_ep.bench_ll import bench_low_latency

    res = bench_low_latency(group, num_iters=20, warmup=3)
    for k in ("dispatch", "combine", "dispatch+combine", "dispatch_send", "dispatch_recv",
              "combine_send", "combine_recv"):
        assert 0 < res[k] < 10_000, (k, res[k])
    return res
