"""Spawn targets for tests/test_cpu_backend.py: numba_ep.Buffer's low-latency API on the CPU
backend (NumPy arrays), one function per rank. Every rank builds every rank's inputs from the
seed, so it can run numba_ep.reference for the whole group and compare its own outputs."""
import numpy as np

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep import reference as ref

BF16 = ref.bfloat16
M, H, K = 24, 1024, 3

# (use_fp8, round_scale, use_ue8m0, hooks, zero_copy, out, use_logfmt, tokens (None = M), masked)
CASES = [
    (True, False, False, False, False, False, False, None, 0.1),
    (True, True, True, True, False, True, False, M - 5, 0.2),
    (False, False, False, False, True, False, False, 1, 0.0),
    (False, False, False, True, False, True, False, 0, 0.0),
    (True, False, False, False, False, False, True, None, 0.3),
]


def _inputs(seed, case, r, E):
    rng = np.random.default_rng([seed, case, r])
    T = M if CASES[case][7] is None else CASES[case][7]
    x = rng.standard_normal((T, H)).astype(np.float32).astype(BF16)
    topk = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
    topk[rng.random(topk.shape) < CASES[case][8]] = -1
    w = rng.random((T, K)).astype(np.float32)
    return x, topk, w


def _expert(d):
    """The stand-in expert: y = bf16(dequantised received rows) of one rank's dispatch."""
    if d["recv_x_scales"] is None:
        return np.asarray(d["recv_x"]).view(BF16)
    return ref.per_token_cast_back(d["recv_x"], d["recv_x_scales"]).astype(BF16)


def ll_suite(group, seed):
    """Every case of CASES through Buffer.low_latency_dispatch / combine; returns rows moved."""
    from numba_ep import Buffer

    R, rank = group.size, group.rank
    E = 4 * R
    L = E // R
    buf = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, H, R, E),
                 low_latency_mode=True, explicitly_destroy=True)
    assert buf._cpu
    buf.clean_low_latency_buffer(M, H, E)
    stats = np.zeros(L, np.int32)
    expected_stats = np.zeros(L, np.int64)
    moved = []
    for c, (fp8, rs, ue, hooks, zc, use_out, lf, _, _) in enumerate(CASES):
        inputs = [_inputs(seed, c, r, E) for r in range(R)]
        x, topk, w = inputs[rank]
        want_all = ref.low_latency_dispatch([i[0] for i in inputs], [i[1] for i in inputs], M, E,
                                            use_fp8=fp8, round_scale=rs, use_ue8m0=ue)
        recv, count, handle, event, hook = buf.low_latency_dispatch(
            x.view(np.uint16), topk, M, E, cumulative_local_expert_recv_stats=stats,
            use_fp8=fp8, round_scale=rs, use_ue8m0=ue, return_recv_hook=hooks)
        assert event.event is None and (hook is not None) == hooks
        if hooks:
            hook()
        rx, sc = recv if fp8 else (recv, None)
        assert rx.shape == (L, R * M, H) and count.dtype == np.int32
        if fp8:
            assert sc.shape == (L, R * M, H // (512 if ue else 128)) and sc.strides[1] == 4
        got = dict(recv_x=rx, recv_x_scales=sc, recv_count=count, src_info=handle[0],
                   layout_range=handle[1])
        ref.check_low_latency_dispatch(got, want_all[rank])
        ys = [_expert(d) for d in want_all]
        y = _expert(got)
        if zc:
            view = buf.get_next_low_latency_combine_buffer(handle)
            assert view.shape == (L, R * M, H) and view.strides[1] == 2 * H + 4 * (H // 128)
            view[...] = y.view(np.uint16)
            y_in = view
        else:
            y_in = np.ascontiguousarray(y.view(np.uint16))
        out = np.full((x.shape[0], H), 0xFFFF, np.uint16) if use_out else None
        combined, event, chook = buf.low_latency_combine(
            y_in, topk, w, handle, use_logfmt=lf, zero_copy=zc, return_recv_hook=hooks, out=out)
        if hooks:
            chook()
        assert out is None or combined is out
        want = ref.low_latency_combine(ys, [i[1] for i in inputs], [i[2] for i in inputs],
                                       want_all, use_logfmt=lf)[rank]
        np.testing.assert_array_equal(combined, want.view(np.uint16), err_msg=f"case {c}")
        wsum = np.where(topk >= 0, w, 0).astype(np.float64).sum(axis=1, keepdims=True)
        e2e = ref.calc_diff(combined.view(BF16).astype(np.float64),
                            x.astype(np.float64) * wsum) if x.shape[0] else 0.0
        assert e2e < (9e-4 if fp8 or lf else 1e-5), f"case {c}: end-to-end calc_diff {e2e}"
        moved.append(int(count.sum()))
        expected_stats += count
    np.testing.assert_array_equal(stats, expected_stats, err_msg="cumulative recv stats")
    report = {"moved": moved}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        report["torch_diff"] = _torch_round(buf, group, seed, torch)
    buf.destroy()
    return report


def _torch_round(buf, group, seed, torch):
    """FP8 dispatch of torch CPU tensors, zero-copy combine into a torch ``out``: the outputs are
    torch tensors of DeepEP's dtypes, and equal to the reference. Returns the combine calc_diff."""
    R, rank = group.size, group.rank
    E = 4 * R
    L = E // R
    inputs = [_inputs(seed, 0, r, E) for r in range(R)]
    x, topk, w = inputs[rank]
    want_all = ref.low_latency_dispatch([i[0] for i in inputs], [i[1] for i in inputs], M, E)
    x_t = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    (x_fp8, scales), count, handle, _, _ = buf.low_latency_dispatch(
        x_t, torch.from_numpy(topk), M, E)
    assert x_fp8.dtype == torch.float8_e4m3fn and tuple(x_fp8.shape) == (L, R * M, H)
    assert scales.dtype == torch.float32 and scales.stride(1) == 1
    assert isinstance(handle[0], torch.Tensor) and count.dtype == torch.int32
    got = dict(recv_x=x_fp8.view(torch.uint8).numpy(), recv_x_scales=scales.numpy(),
               recv_count=count.numpy(), src_info=handle[0].numpy(),
               layout_range=handle[1].numpy())
    ref.check_low_latency_dispatch(got, want_all[rank])
    ys = [_expert(d) for d in want_all]
    view = buf.get_next_low_latency_combine_buffer(handle)
    assert view.dtype == torch.bfloat16 and tuple(view.shape) == (L, R * M, H)
    view.copy_(torch.from_numpy(ys[rank].view(np.int16)).view(torch.bfloat16))
    out = torch.empty((x.shape[0], H), dtype=torch.bfloat16)
    combined, _, _ = buf.low_latency_combine(view, torch.from_numpy(topk), torch.from_numpy(w),
                                             handle, zero_copy=True, out=out)
    assert combined is out
    want = ref.low_latency_combine(ys, [i[1] for i in inputs], [i[2] for i in inputs],
                                   want_all)[rank]
    got_c = combined.view(torch.int16).numpy().view(BF16)
    return ref.calc_diff(got_c.astype(np.float64), want.astype(np.float64))
