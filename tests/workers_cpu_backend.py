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


# ------------------------------------------------------------------------------------ internode

def internode_suite(group, seed):
    """Internode normal mode through the Buffer on the CPU backend (NUMBA_EP_GPUS_PER_NODE
    splits the ranks into nodes): layout, dispatch (BF16, top-k), cached dispatch (FP8 with
    scales), combine (weights, bias pair), each equal to numba_ep.reference; bad calls refused."""
    from numba_ep import Buffer

    R, rank = group.size, group.rank
    Hn, E, Kn = 256, 4 * R, 4
    rng = [np.random.default_rng([seed, r]) for r in range(R)]
    tokens = [(0, 37, 1, 20, 64, 9)[r % 6] for r in range(R)]
    xs = [g.standard_normal((t, Hn)).astype(np.float32).astype(BF16) for g, t in zip(rng, tokens)]
    topks = []
    for g, t in zip(rng, tokens):
        k = np.argsort(g.random((t, E)), axis=1)[:, :Kn].astype(np.int64)
        k[g.random(k.shape) < 0.2] = -1
        topks.append(k)
    ws = [g.random((t, Kn)).astype(np.float32) for g, t in zip(rng, tokens)]
    cfg = Buffer.get_dispatch_config(R)
    buf = Buffer(group, cfg.get_nvl_buffer_size_hint(Hn * 2, R), explicitly_destroy=True)
    G = buf.num_gpus_per_node
    assert buf.backend == "cpu" and G < R
    C = cfg.num_channels
    per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topks[rank], E)
    np.testing.assert_array_equal(per_rdma, ref.get_dispatch_layout(topks[rank], E, R, G)[1])

    want = ref.internode_dispatch(xs, topks, ws, E, C, G)[rank]
    recv_x, recv_topk, recv_w, counts, handle, event = buf.dispatch(
        xs[rank], num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topks[rank],
        topk_weights=ws[rank], config=cfg)
    assert event.event is None and len(handle) == 10
    np.testing.assert_array_equal(recv_x.view(np.uint16), want["recv_x"].view(np.uint16))
    np.testing.assert_array_equal(recv_topk, want["recv_topk_idx"])
    np.testing.assert_array_equal(recv_w, want["recv_topk_weights"])
    assert counts == want["num_recv_tokens_per_expert_list"]
    from numba_ep.cpu.internode import HANDLE_ITEMS

    for name, item in zip(HANDLE_ITEMS, handle):
        np.testing.assert_array_equal(item, want[name], err_msg=name)

    # cached: FP8 rows and their scales follow the same routes
    casts = [ref.per_token_cast_to_fp8(x) for x in xs]
    want8 = ref.internode_dispatch([c[0] for c in casts], None, None, None, C, G,
                                   x_scales=[c[1] for c in casts],
                                   is_token_in_rank=[ref.get_dispatch_layout(t, E, R)[3]
                                                     for t in topks])[rank]
    x8, s8 = casts[rank]
    (r8, rs8), *rest = buf.dispatch((x8, np.asfortranarray(s8)), handle=handle, config=cfg)
    assert rest[:4] == [None, None, None, None]
    np.testing.assert_array_equal(r8.view(np.uint8), want8["recv_x"].view(np.uint8))
    np.testing.assert_array_equal(rs8, want8["recv_x_scales"])

    # combine: random expert outputs, weights, a bias pair
    ys = [np.random.default_rng([seed, r, 7]).standard_normal(
        (int(ref.internode_dispatch(xs, topks, ws, E, C, G)[r]["num_recv_tokens"]), Hn))
        .astype(np.float32).astype(BF16) for r in range(R)]
    all_want = ref.internode_dispatch(xs, topks, ws, E, C, G)
    biases = [(np.ones((t, Hn), BF16), np.full((t, Hn), 0.5, BF16)) for t in tokens]
    want_c = ref.internode_combine(ys, all_want, [w["recv_topk_weights"] for w in all_want],
                                   biases)[rank]
    combined, combined_w, _ = buf.combine(ys[rank], handle, topk_weights=recv_w,
                                          bias=biases[rank], config=Buffer.get_combine_config(R))
    np.testing.assert_array_equal(combined.view(np.uint16), want_c[0].view(np.uint16))
    np.testing.assert_array_equal(combined_w, want_c[1])

    torch_ok = False
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:  # torch CPU tensors in, torch tensors out, same values
        t_recv, t_topk, _, t_counts, t_handle, _ = buf.dispatch(
            torch.from_numpy(xs[rank].view(np.int16)).view(torch.bfloat16),
            num_tokens_per_rank=torch.from_numpy(per_rank),
            num_tokens_per_rdma_rank=torch.from_numpy(per_rdma),
            is_token_in_rank=torch.from_numpy(in_rank),
            num_tokens_per_expert=torch.from_numpy(per_expert),
            topk_idx=torch.from_numpy(topks[rank]), topk_weights=torch.from_numpy(ws[rank]),
            config=cfg)
        assert t_recv.dtype == torch.bfloat16 and isinstance(t_handle[5], torch.Tensor)
        np.testing.assert_array_equal(t_recv.view(torch.int16).numpy().view(np.uint16),
                                      want["recv_x"].view(np.uint16))
        t_comb, _, _ = buf.combine(torch.from_numpy(ys[rank].view(np.int16)).view(torch.bfloat16),
                                   t_handle, bias=tuple(torch.from_numpy(b.view(np.int16))
                                                        .view(torch.bfloat16)
                                                        for b in biases[rank]))
        want_t = ref.internode_combine(ys, all_want, bias=biases)[rank][0]
        np.testing.assert_array_equal(t_comb.view(torch.int16).numpy().view(np.uint16),
                                      want_t.view(np.uint16))
        torch_ok = t_counts == counts

    refused = []
    for call in (lambda: buf.dispatch(xs[rank], handle=handle, num_worst_tokens=5),
                 lambda: buf.combine(ys[rank], tuple(handle)[:6])):
        try:
            call()
        except (ValueError, TypeError) as e:
            refused.append(str(e))
    buf.destroy()
    return {"received": int(want["num_recv_tokens"]), "refused": refused, "torch": torch_ok}
