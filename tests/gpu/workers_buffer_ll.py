"""Spawn targets for tests/gpu/test_buffer_low_latency_gpu.py: numba_ep.Buffer's low-latency
API on real GPUs, each function running on one rank.

One Buffer per rank with both an NVLink buffer and an NVSHMEM buffer
(``Buffer(group, num_nvl_bytes, num_rdma_bytes=hint, low_latency_mode=True)``) runs, in order:

1. a normal (intranode) dispatch -> combine, checked against x * copies;
2. ``clean_low_latency_buffer`` and the rows of CASES, switching shape with another clean:
   dispatch equal to ``reference.low_latency_dispatch`` bit for bit
   (``reference.check_low_latency_dispatch``) plus cumulative stats, combine within
   calc_diff 1e-5 of ``reference.low_latency_combine`` fed the very expert outputs the GPU got
   (and end to end vs x * sum of the weights), in CuPy arrays on a non-default stream;
   receive hooks, zero-copy through ``get_next_low_latency_combine_buffer``, ``out=``,
   ``async_finish``, FP8 (plain, UE8M0) and BF16;
3. dispatch -> combine captured in a CUDA graph and replayed 3 times with new tokens, each
   replay checked (dispatch exact, combine vs x * sum of the weights);
4. a call with a new shape but no clean: ValueError on every rank, nothing launched;
5. torch tensors in and out (if torch with CUDA is importable): FP8 dispatch, zero-copy combine
   into a torch ``out``; then, on a side torch stream, a BF16 dispatch through its receive hook
   and a combine that makes its own output, with ``async_finish``;
6. (``with_timeout``, EP2) rank 1 sits out one dispatch: rank 0 gets CommTimeoutError naming
   rank 1, then RuntimeError (the Buffer is unusable); both ranks still destroy it.

The "expert" is dequantisation (workers_low_latency.expert). Helpers come from
workers_low_latency.py next to this file. Every function returns a small report; any mismatch
raises (spawn shows the traceback).
"""
import os
import sys

import numpy as np

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workers_low_latency as W  # noqa: E402

SHAPES = {
    "S": dict(M=64, H=2048, E=16, K=4),
    "D": dict(M=64, H=7168, E=288, K=8),    # DeepSeek-like hidden and expert count
}

# (shape, tokens (None = M), masked slots, use_fp8, round_scale, use_ue8m0, hooks, zero_copy,
#  out=, async_finish)
CASES = [
    ("S", None, 6, True, False, False, False, False, False, False),
    ("S", 37, 3, False, False, False, False, False, True, True),
    ("S", None, 6, True, True, True, True, False, False, False),
    ("S", 20, 2, False, False, False, True, True, False, False),
    ("D", None, 10, True, False, False, False, True, False, False),
    ("D", 1, 0, True, True, False, True, False, True, False),
]


# ---------------------------------------------------------------------------------------------
# kernels to compile before the ranks start
# ---------------------------------------------------------------------------------------------

def kernel_specs(nranks):
    """Every low-latency (factory, signature, constants) the functions below launch."""
    from numba_ep.kernels import low_latency as ll

    lists = []
    for name, s in SHAPES.items():
        ctx = W.spec_context(nranks, s)
        for shape, _, _, fp8, rs, ue, _, zc, _, _ in CASES:
            if shape == name:
                lists += ll.with_fused(ll.dispatch_kernels(ctx, s["K"], fp8, rs, ue))
                lists += ll.with_fused(ll.combine_kernels(ctx, s["K"], False, zc))
        if name == "D":   # the torch round
            lists += ll.with_fused(ll.dispatch_kernels(ctx, s["K"], True, False, False))
            lists += ll.with_fused(ll.combine_kernels(ctx, s["K"], False, True))
            lists += ll.with_fused(ll.dispatch_kernels(ctx, s["K"], False, False, False))
            lists += ll.with_fused(ll.combine_kernels(ctx, s["K"], False, False))
    return lists



# ---------------------------------------------------------------------------------------------
# rounds
# ---------------------------------------------------------------------------------------------

def _nvl_bytes(R, hidden=2048):
    from numba_ep.buffer import Buffer

    cfgs = [Buffer.get_dispatch_config(R), Buffer.get_combine_config(R)]
    return max(c.get_nvl_buffer_size_hint(hidden * 2, R) for c in cfgs)


def normal_round(buf, group, seed=11, T=48, H=2048, K=4, E=16):
    """One intranode dispatch -> combine through the NVLink buffer: combine sums the copies of
    each token, so the result is x times the number of ranks the token went to."""
    import cupy

    from numba_ep import reference as ref

    rng = np.random.default_rng(seed + 31 * group.rank)
    bits, topk, w = W.make_inputs(rng, T, H, K, E, 4)
    x_d, topk_d, w_d = cupy.asarray(bits), cupy.asarray(topk), cupy.asarray(w)
    per_rank, _, per_expert, in_rank, _ = buf.get_dispatch_layout(topk_d, E)
    recv_x, _, _, _, handle, _ = buf.dispatch(
        x_d, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_d, topk_weights=w_d)
    combined, _, _ = buf.combine(recv_x, handle)
    cupy.cuda.get_current_stream().synchronize()
    copies = cupy.asnumpy(in_rank).sum(axis=1)
    sel = copies > 0
    got = W._bf16(cupy.asnumpy(combined))[sel]
    # c identical bf16 values (c <= 8) add up exactly in fp32, so the result is x * c rounded to
    # bf16 once: bit-exact, and within DeepEP's calc_diff bound (5e-6) of the exact product.
    exact = W._bf16(bits).astype(np.float32)[sel] * copies[sel, None].astype(np.float32)
    np.testing.assert_array_equal(got, exact.astype(ref.bfloat16), err_msg="normal combine")
    diff = ref.calc_diff(got.astype(np.float64), exact.astype(np.float64))
    assert diff < 5e-6, f"normal combine calc_diff {diff}"
    return int(recv_x.shape[0])


def _combine_reference(group, rank, parts_mine, topks, w, M, E, R):
    """reference.low_latency_combine of my tokens, from every rank's expert outputs."""
    from numba_ep import reference as ref

    parts = W._gather(group, parts_mine)
    L = E // R
    eo, handles = [], []
    for le_idx, row_idx, y_valid, src, lr in parts:
        H = y_valid.shape[1]
        a = np.zeros((L, R * M, H), np.uint16)
        if len(le_idx):
            a[le_idx, row_idx] = y_valid
        eo.append(W._bf16(a))
        handles.append({"src_info": src, "layout_range": lr, "num_experts": E,
                        "num_max_dispatch_tokens_per_rank": M})
    return ref.low_latency_combine(eo, topks, W._gather(group, w), handles)[rank]


def ll_round(buf, group, stream, seed, name, T, masked, use_fp8, round_scale, use_ue8m0, hooks,
             zero_copy, use_out, async_finish):
    """One low-latency dispatch and combine through the Buffer, CuPy arrays, on ``stream``
    (made current: the Buffer must launch there)."""
    import cupy

    from numba_ep import reference as ref

    R, rank = group.size, group.rank
    s = SHAPES[name]
    M, H, E, K = s["M"], s["H"], s["E"], s["K"]
    L = E // R
    T = M if T is None else T
    rng = np.random.default_rng(seed * 7919 + rank)
    bits, topk, w = W.make_inputs(rng, T, H, K, E, masked)
    xs, topks = W._gather(group, bits), W._gather(group, topk)
    info = {}
    with stream:
        x_d, topk_d, w_d = cupy.asarray(bits), cupy.asarray(topk), cupy.asarray(w)
        stats = cupy.full((L,), 3, dtype=cupy.int32)
        recv_x, recv_count, handle, event, hook = buf.low_latency_dispatch(
            x_d, topk_d, M, E, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
            round_scale=round_scale, use_ue8m0=use_ue8m0, async_finish=async_finish,
            return_recv_hook=hooks)
        if hooks:
            assert hook is not None and not hook.called and event.event is None
            cupy.matmul(cupy.ones((512, 512), cupy.float32), cupy.ones((512, 512), cupy.float32))
            hook()
            assert hook.called
        else:
            assert hook is None
        if async_finish:
            assert event.event is not None and event.extra_tensors
            event.current_stream_wait()
    stream.synchronize()

    # dispatch: DeepEP's tuple shapes, then exact equality with the reference
    assert isinstance(handle, tuple) and len(handle) == 5 and tuple(handle[2:]) == (M, H, E)
    if use_fp8:
        x_fp8, scales = recv_x
        assert x_fp8.dtype == cupy.uint8 and x_fp8.shape == (L, R * M, H)
        assert scales.dtype == (cupy.int32 if use_ue8m0 else cupy.float32)
        assert scales.shape == (L, R * M, H // (512 if use_ue8m0 else 128))
        assert scales.strides[1] == 4, "scales are column-major in the last two dims"
    else:
        x_fp8, scales = recv_x, None
        assert recv_x.dtype == cupy.uint16 and recv_x.shape == (L, R * M, H)
    assert recv_count.dtype == cupy.int32 and recv_count.shape == (L,)
    assert handle[0].dtype == cupy.int32 and handle[1].dtype == cupy.int64
    raw = (x_fp8, scales, recv_count, handle[0], handle[1], None)
    got, le_idx, row_idx = W.fetch_dispatch(raw)
    want = ref.low_latency_dispatch([W._bf16(b) for b in xs], topks, M, E, use_fp8=use_fp8,
                                    round_scale=round_scale, use_ue8m0=use_ue8m0)[rank]
    ref.check_low_latency_dispatch(got, want)
    assert (cupy.asnumpy(stats) == want["recv_count"] + 3).all(), "cumulative stats"
    info["received"] = int(want["recv_count"].sum())

    # combine
    with stream:
        y, y_valid = W.expert(raw, le_idx, row_idx)
        if zero_copy:
            view = buf.get_next_low_latency_combine_buffer(handle)
            assert view.shape == (L, R * M, H) and view.dtype == cupy.uint16
            assert view.strides[1] == 2 * H + 4 * (H // 128), "rows padded for LogFMT metadata"
            view[...] = y
            y_in = view
        else:
            y_in = y
        out = cupy.full((T, H), 0xFFFF, dtype=cupy.uint16) if use_out else None
        combined, event, chook = buf.low_latency_combine(
            y_in, topk_d, w_d, handle, zero_copy=zero_copy, async_finish=async_finish,
            return_recv_hook=hooks, out=out)
        if hooks:
            chook()
        if async_finish:
            assert event.event is not None
            event.current_stream_wait()
    stream.synchronize()
    if use_out:
        assert combined is out
    assert combined.dtype == cupy.uint16 and combined.shape == (T, H)
    got_f = W._bf16(cupy.asnumpy(combined)).astype(np.float32)
    assert np.isfinite(got_f).all(), "NaN/inf in the combined output"
    want_out = _combine_reference(group, rank, (le_idx, row_idx, y_valid, got["src_info"],
                                                got["layout_range"]), topks, w, M, E, R)
    diff = ref.calc_diff(got_f, want_out.astype(np.float32))
    assert diff < 1e-5, f"combine vs reference calc_diff {diff}"
    x_f = W._bf16(bits).astype(np.float64)
    wsum = np.where(topk >= 0, w, 0).astype(np.float64).sum(axis=1, keepdims=True)
    e2e = ref.calc_diff(got_f, x_f * wsum)
    assert e2e < (9e-4 if use_fp8 else 1e-5), f"end-to-end calc_diff {e2e}"
    info["combine_diff"] = diff
    return info


def _torch():
    try:
        import torch

        return torch if torch.cuda.is_available() else None
    except Exception:
        return None


def torch_round(buf, group, seed=77, name="D"):
    """FP8 dispatch with torch tensors in and out, zero-copy combine into a torch ``out``; then
    BF16 through a receive hook and a combine making its own output, on a side torch stream."""
    import cupy

    from numba_ep import reference as ref

    torch = _torch()
    R, rank = group.size, group.rank
    s = SHAPES[name]
    M, H, E, K = s["M"], s["H"], s["E"], s["K"]
    L = E // R
    torch.cuda.set_device(buf.device)
    dev = torch.device("cuda", buf.device)
    rng = np.random.default_rng(seed * 7919 + rank)
    bits, topk, w = W.make_inputs(rng, M - 5, H, K, E, 7)
    xs, topks = W._gather(group, bits), W._gather(group, topk)
    x_t = torch.from_numpy(bits.view(np.int16)).to(dev).view(torch.bfloat16)
    topk_t, w_t = torch.from_numpy(topk).to(dev), torch.from_numpy(w).to(dev)
    stats = torch.zeros(L, dtype=torch.int32, device=dev)
    (x_fp8, scales), count, handle, _, hook = buf.low_latency_dispatch(
        x_t, topk_t, M, E, cumulative_local_expert_recv_stats=stats)
    assert hook is None
    assert x_fp8.dtype == torch.float8_e4m3fn and tuple(x_fp8.shape) == (L, R * M, H)
    assert scales.dtype == torch.float32 and scales.stride(1) == 1
    assert count.dtype == torch.int32 and isinstance(handle[0], torch.Tensor)
    torch.cuda.current_stream().synchronize()
    raw = (cupy.from_dlpack(x_fp8.view(torch.uint8)), cupy.from_dlpack(scales),
           cupy.from_dlpack(count), cupy.from_dlpack(handle[0]), cupy.from_dlpack(handle[1]),
           None)
    got, le_idx, row_idx = W.fetch_dispatch(raw)
    want = ref.low_latency_dispatch([W._bf16(b) for b in xs], topks, M, E)[rank]
    ref.check_low_latency_dispatch(got, want)
    assert (stats.cpu().numpy() == want["recv_count"]).all()

    y, y_valid = W.expert(raw, le_idx, row_idx)
    cupy.cuda.runtime.deviceSynchronize()
    view = buf.get_next_low_latency_combine_buffer(handle)
    assert view.dtype == torch.bfloat16 and tuple(view.shape) == (L, R * M, H)
    view.copy_(torch.from_dlpack(y.view(cupy.int16)).view(torch.bfloat16))
    out = torch.empty((M - 5, H), dtype=torch.bfloat16, device=dev)
    combined, _, _ = buf.low_latency_combine(view, topk_t, w_t, handle, zero_copy=True, out=out)
    assert combined is out
    torch.cuda.current_stream().synchronize()
    got_f = W._bf16(combined.view(torch.int16).cpu().numpy().view(np.uint16)).astype(np.float32)
    want_out = _combine_reference(group, rank, (le_idx, row_idx, y_valid, got["src_info"],
                                                got["layout_range"]), topks, w, M, E, R)
    diff = ref.calc_diff(got_f, want_out.astype(np.float32))
    assert diff < 1e-5, f"torch combine vs reference calc_diff {diff}"

    # The outputs are torch's own allocations on the caller's current stream (a side stream
    # here), and the kernels run there: everything is complete once that stream is.
    side = torch.cuda.Stream(device=dev)
    group.barrier()
    with torch.cuda.stream(side):
        recv_b, count_b, handle_b, _, hook = buf.low_latency_dispatch(
            x_t, topk_t, M, E, use_fp8=False, return_recv_hook=True)
        hook()
        combined_b, event, _ = buf.low_latency_combine(recv_b, topk_t, w_t, handle_b,
                                                       async_finish=True)
    assert recv_b.dtype == torch.bfloat16 and tuple(recv_b.shape) == (L, R * M, H)
    assert combined_b.dtype == torch.bfloat16 and tuple(combined_b.shape) == (M - 5, H)
    assert count_b.dtype == torch.int32 and handle_b[1].dtype == torch.int64
    event.current_stream_wait()
    side.synchronize()
    got_b, _, _ = W.fetch_dispatch((cupy.from_dlpack(recv_b.view(torch.int16)).view(cupy.uint16),
                                    None, cupy.from_dlpack(count_b),
                                    cupy.from_dlpack(handle_b[0]), cupy.from_dlpack(handle_b[1]),
                                    None))
    ref.check_low_latency_dispatch(got_b, ref.low_latency_dispatch(
        [W._bf16(b) for b in xs], topks, M, E, use_fp8=False)[rank])
    got_bf = W._bf16(combined_b.view(torch.int16).cpu().numpy().view(np.uint16))
    wsum = np.where(topk >= 0, w, 0).astype(np.float64).sum(axis=1, keepdims=True)
    diff_b = ref.calc_diff(got_bf.astype(np.float64), W._bf16(bits).astype(np.float64) * wsum)
    assert diff_b < 1e-5, f"torch BF16 combine vs x * sum of weights: calc_diff {diff_b}"
    group.barrier()
    return {"combine_diff": diff, "bf16_combine_diff": diff_b}


def graph_round(buf, group, stream, name="D", replays=3):
    """Buffer.low_latency_dispatch (BF16) -> low_latency_combine of the received rows, captured
    once in a CUDA graph on ``stream`` and replayed with new tokens copied into the captured
    inputs. Each replay: dispatch equal to the reference, combine = x * sum of valid weights.
    Two calls flip the buffer half twice, so the graph can be replayed any number of times."""
    import cupy

    from numba_ep import reference as ref

    rank = group.rank
    s = SHAPES[name]
    M, H, E, K = s["M"], s["H"], s["E"], s["K"]
    with stream:
        x_d = cupy.empty((M, H), cupy.uint16)
        topk_d = cupy.empty((M, K), cupy.int64)
        w_d = cupy.empty((M, K), cupy.float32)

    def load(step):
        bits, topk, w = W.make_inputs(np.random.default_rng([step, rank, 99]), M, H, K, E, 6)
        with stream:
            x_d[...] = cupy.asarray(bits)
            topk_d[...] = cupy.asarray(topk)
            w_d[...] = cupy.asarray(w)
        stream.synchronize()
        return bits, topk, w

    def calls():
        recv_x, count, handle, _, _ = buf.low_latency_dispatch(x_d, topk_d, M, E, use_fp8=False)
        combined, _, _ = buf.low_latency_combine(recv_x, topk_d, w_d, handle)
        return recv_x, count, handle, combined

    def check(step, inputs, outs):
        bits, topk, w = inputs
        recv_x, count, handle, combined = outs
        xs, topks = W._gather(group, bits), W._gather(group, topk)
        got, _, _ = W.fetch_dispatch((recv_x, None, count, handle[0], handle[1], None))
        want = ref.low_latency_dispatch([W._bf16(b) for b in xs], topks, M, E,
                                        use_fp8=False)[rank]
        ref.check_low_latency_dispatch(got, want)
        got_f = W._bf16(cupy.asnumpy(combined)).astype(np.float64)
        wsum = np.where(topk >= 0, w, 0).astype(np.float64).sum(axis=1, keepdims=True)
        d = ref.calc_diff(got_f, W._bf16(bits).astype(np.float64) * wsum)
        assert d < 1e-5, f"graph step {step}: combine calc_diff {d}"
        return d

    inputs = load(0)
    group.barrier()
    with stream:                    # eager first: contexts made, kernels loaded, pool primed
        outs = calls()
    stream.synchronize()
    diffs = [check(0, inputs, outs)]
    group.barrier()
    with stream:
        stream.begin_capture()
        outs = calls()
        graph = stream.end_capture()
    for step in range(1, replays + 1):
        inputs = load(step)
        group.barrier()             # every rank's inputs are in place
        graph.launch(stream)
        stream.synchronize()
        buf._ll_ctxs[buf._ll_active].check()
        diffs.append(check(step, inputs, outs))
        group.barrier()             # every rank has read its outputs before the next replay
    return {"replays": replays, "diffs": diffs}


def timeout_round(buf, group, name="D"):
    """Rank 1 sits out a dispatch; rank 0's receive phase gives up after 2 s."""
    import cupy

    from numba_ep.errors import CommTimeoutError

    s = SHAPES[name]
    # The Buffer's timeout (100 s by default) would make this test slow: shorten the one the
    # receive kernels are launched with (read at every launch).
    buf._ll_ctxs[buf._ll_active].timeout_ns = 2_000_000_000
    rng = np.random.default_rng(5)
    bits, topk, _ = W.make_inputs(rng, 8, s["H"], s["K"], s["E"], 0)
    seen = []
    group.barrier()
    if group.rank == 0:
        buf.low_latency_dispatch(cupy.asarray(bits), cupy.asarray(topk), s["M"], s["E"])
        cupy.cuda.runtime.deviceSynchronize()
        for expected in (CommTimeoutError, RuntimeError):
            try:
                buf.low_latency_dispatch(cupy.asarray(bits), cupy.asarray(topk), s["M"], s["E"])
            except expected as e:
                seen.append(str(e))
            else:
                raise AssertionError(f"expected {expected.__name__}")
    group.barrier()
    return seen


def buffer_ll_suite(group, with_timeout=False):
    """Steps 1-6 of the module docstring on one Buffer; returns the per-step reports."""
    import cupy

    from numba_ep import Buffer

    R = group.size
    nrdma = max(Buffer.get_low_latency_rdma_size_hint(s["M"], s["H"], R, s["E"])
                for s in SHAPES.values())
    buf = Buffer(group, num_nvl_bytes=_nvl_bytes(R), num_rdma_bytes=nrdma,
                 low_latency_mode=True, explicitly_destroy=True)
    assert os.environ.get("NVSHMEM_DISABLE_NVLS") == "1"
    assert buf._sym is not None and buf._sym.nbytes >= nrdma
    assert all(p != 0 for p in buf._sym.peer_ptrs), "one host: every peer is NVLink-mapped"
    report = [("normal", normal_round(buf, group))]

    stream = cupy.cuda.Stream(non_blocking=True)
    current = None
    for i, (name, T, masked, fp8, rs, ue, hooks, zc, use_out, af) in enumerate(CASES):
        if name != current:
            s = SHAPES[name]
            with stream:  # on the stream of the calls that follow (they must be ordered)
                buf.clean_low_latency_buffer(s["M"], s["H"], s["E"])
            current = name
        report.append((i, ll_round(buf, group, stream, 100 + i, name, T, masked, fp8, rs, ue,
                                   hooks, zc, use_out, af)))

    report.append(("graph", graph_round(buf, group, stream)))

    # a new shape without clean_low_latency_buffer: refused before anything is launched
    s = SHAPES["S"]
    bits, topk, _ = W.make_inputs(np.random.default_rng(1), 4, s["H"], s["K"], s["E"], 0)
    try:
        buf.low_latency_dispatch(cupy.asarray(bits), cupy.asarray(topk), s["M"], s["E"])
    except ValueError as e:
        assert "clean_low_latency_buffer(64, 2048, 16)" in str(e), str(e)
        report.append(("needs-clean", str(e)))
    else:
        raise AssertionError("a new shape without clean_low_latency_buffer was accepted")

    if _torch() is not None:
        report.append(("torch", torch_round(buf, group)))
    if with_timeout:
        report.append(("timeout", timeout_round(buf, group)))
    cupy.cuda.runtime.deviceSynchronize()
    buf.destroy()
    buf.destroy()  # idempotent
    from numba_ep.memory import nvshmem_runtime

    assert nvshmem_runtime() is None, "destroy() released the last NVSHMEM reference"
    return report


def _buffer_after_one_round(group):
    """An explicitly destroyed low-latency Buffer of shape S that has been cleaned and has run
    one BF16 dispatch + combine on a new stream, synchronised and past a group barrier: the
    state in which the fault tests below take a rank away. Returns (buf, stream, M, H, E)."""
    import cupy

    from numba_ep import Buffer

    s = SHAPES["S"]
    M, H, E, K = s["M"], s["H"], s["E"], s["K"]
    buf = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, H, group.size, E),
                 low_latency_mode=True, explicitly_destroy=True)
    bits, topk, w = W.make_inputs(np.random.default_rng(group.rank), 8, H, K, E, 0)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        buf.clean_low_latency_buffer(M, H, E)
        recv_x, _, handle, _, _ = buf.low_latency_dispatch(
            cupy.asarray(bits), cupy.asarray(topk), M, E, use_fp8=False)
        buf.low_latency_combine(recv_x, cupy.asarray(topk), cupy.asarray(w), handle)
    stream.synchronize()
    group.barrier()
    return buf, stream, M, H, E


def clean_absent_peer(group, sit_out_s):
    """2 ranks: both clean and run one BF16 round; then rank 1 stays away from every group call
    for ``sit_out_s`` seconds while rank 0 calls clean_low_latency_buffer, which must raise
    CommTimeoutError naming rank 1 (the group's barrier) and leave the Buffer unusable, with
    nothing left waiting on the stream. Then both meet again and destroy the Buffer."""
    import time

    from numba_ep.errors import CommTimeoutError

    buf, stream, M, H, E = _buffer_after_one_round(group)
    result = {"rank": group.rank}
    try:
        if group.rank == 1:
            time.sleep(sit_out_s)
            group.barrier()   # completes the barrier of the clean that rank 0 gave up on
        else:
            t0 = time.monotonic()
            try:
                with stream:
                    buf.clean_low_latency_buffer(M, H, E)
                result["error"] = None
            except CommTimeoutError as e:
                result.update(error=str(e), peer=e.peer)
            result["elapsed"] = time.monotonic() - t0
            stream.synchronize()             # nothing of the clean is left waiting
            try:
                buf.clean_low_latency_buffer(M, H, E)
                result["after"] = "no error"
            except RuntimeError as e:
                result["after"] = str(e)
        group.barrier()   # both ranks meet again before the collective destroy
    finally:
        buf.destroy()
    return result


def destroy_absent_peer(group, sit_out_s):
    """2 ranks: both clean and run one BF16 round; then rank 0 calls destroy() at once while
    rank 1 stays away for ``sit_out_s`` seconds (more than the group's timeout) before calling
    it. Rank 0 must get a CommTimeoutError naming rank 1 (the first of destroy's two barriers),
    and rank 1, arriving after rank 0 gave up, one naming rank 0 (the second barrier), instead of
    waiting in nvshmem_free alone. Each returns what it saw; NVSHMEM is left initialised and the
    process exits."""
    import time

    from numba_ep.errors import CommTimeoutError

    buf, _, M, H, E = _buffer_after_one_round(group)
    if group.rank == 1:
        time.sleep(sit_out_s)
    result = {"rank": group.rank, "error": None, "peer": None}
    t0 = time.monotonic()
    try:
        buf.destroy()
    except CommTimeoutError as e:
        result.update(error=str(e), peer=e.peer)
    result["elapsed"] = time.monotonic() - t0
    try:
        buf.clean_low_latency_buffer(M, H, E)
        result["after"] = "no error"
    except RuntimeError as e:
        result["after"] = str(e)
    return result
