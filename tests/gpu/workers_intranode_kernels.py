"""Rank bodies for tests/gpu/test_intranode_kernels_gpu.py: the intranode kernels driven directly
(no Buffer), checked against numba_ep.reference."""
import pickle

import numpy as np

import numba_ep  # noqa: F401


def _gather(group, obj):
    return [pickle.loads(b) for b in group.allgather_bytes(pickle.dumps(obj))]


def dispatch_combine_round_trip(group, num_tokens, hidden, num_experts, num_topk, num_channels,
                                num_slots, seed_offset=0):
    import cupy as cp
    import ml_dtypes

    from numba_ep import reference
    from numba_ep.demo import _random_topk
    from numba_ep.kernels import intranode as I
    from numba_ep.kernels.layout import get_dispatch_layout
    from numba_ep.memory import IpcBuffer

    from numba_ep.group import current_device

    current_device(group)
    R, rank = group.size, group.rank
    rng = np.random.default_rng()
    T = num_tokens[rank] if isinstance(num_tokens, (list, tuple)) else num_tokens
    x = rng.standard_normal((T, hidden)).astype(ml_dtypes.bfloat16)
    topk = _random_topk(rng, T, num_experts, num_topk, drop=0.1)
    w = rng.random((T, num_topk)).astype(np.float32)
    xs, topks, ws = map(list, zip(*_gather(group, (x.view(np.uint16), topk, w))))
    ref = reference.intranode_dispatch([a.view(ml_dtypes.bfloat16) for a in xs], topks, ws,
                                       num_experts, num_channels)[rank]

    stream = cp.cuda.Stream(non_blocking=True)
    nbytes = I.nvl_bytes_needed(R, num_channels, num_slots, hidden * 2, num_topk, 0)
    with IpcBuffer(group, nbytes) as buf, stream:
        ctx = I.IntranodeContext(buf, rank, R, timeout_s=20)
        topk_d = cp.asarray(topk)
        per_rank, _, per_expert, in_rank = get_dispatch_layout(topk_d, num_experts, R, stream=stream)
        rp, cp_, rcp = I.notify_dispatch(ctx, per_rank, in_rank, per_expert, num_experts,
                                         num_channels, 1, stream)
        n_recv, per_expert_list = I.wait_recv_counts(ctx, num_experts // R)
        assert n_recv == ref["num_recv_tokens"], (n_recv, ref["num_recv_tokens"])
        assert per_expert_list == list(ref["num_recv_tokens_per_expert_list"])
        x_d = cp.asarray(x.view(np.uint16))
        recv_x = cp.full((n_recv, hidden), 0xFFFF, dtype=cp.uint16)  # poison
        recv_topk = cp.full((n_recv, num_topk), -7, dtype=cp.int64)
        recv_w = cp.full((n_recv, num_topk), np.nan, dtype=cp.float32)
        recv_src = cp.full((n_recv,), -7, dtype=cp.int32)
        send_head = cp.full((T, R), -7, dtype=cp.int32)
        I.dispatch(ctx, x_d.view(cp.uint8), None, topk_d, cp.asarray(w), in_rank, cp_, rp, rcp,
                   recv_x.view(cp.uint8), None, recv_topk, recv_w, recv_src, send_head,
                   num_experts, num_slots, num_channels, 0, stream)
        stream.synchronize()
        ctx.errors.check()
        checks = {
            "rank_prefix_matrix": (rp, ref["rank_prefix_matrix"]),
            "channel_prefix_matrix": (cp_, ref["channel_prefix_matrix"]),
            "recv_channel_prefix_matrix": (rcp, ref["recv_channel_prefix_matrix"]),
            "recv_x": (recv_x, ref["recv_x"].view(np.uint16)),
            "recv_topk_idx": (recv_topk, ref["recv_topk_idx"]),
            "recv_topk_weights": (recv_w, ref["recv_topk_weights"]),
            "recv_src_idx": (recv_src, ref["recv_src_idx"]),
            "send_head": (send_head, ref["send_head"]),
        }
        for name, (g, want) in checks.items():
            got = cp.asnumpy(g)
            assert got.shape == want.shape, (name, got.shape, want.shape)
            bad = np.argwhere(~((got == want) | (np.isnan(got) & np.isnan(want)))
                              if got.dtype.kind == "f" else got != want)
            assert len(bad) == 0, (f"{name} differs at {len(bad)} places, first {bad[:5].tolist()}: "
                                   f"got {[got[tuple(i)] for i in bad[:5]]}, "
                                   f"want {[want[tuple(i)] for i in bad[:5]]}")
        # Combine: expert outputs = received rows scaled per rank (values stay exact in bf16).
        y = (ref["recv_x"].astype(np.float32) * (rank + 1)).astype(ml_dtypes.bfloat16)
        handles = _gather(group, ref)
        ys, rws = zip(*_gather(group, (y.view(np.uint16), ref["recv_topk_weights"])))
        want_x, want_w = reference.intranode_combine(
            [a.view(ml_dtypes.bfloat16) for a in ys], handles, topk_weights=list(rws))[rank]
        I.cached_notify(ctx, num_channels, stream)
        out = cp.full((T, hidden), 0xFFFF, dtype=cp.uint16)
        out_w = cp.full((T, num_topk), np.nan, dtype=cp.float32)
        I.combine(ctx, cp.asarray(y.view(np.uint16)), recv_w, None, None, recv_src, rp, rcp,
                  send_head, out, out_w, num_slots, num_channels, stream)
        stream.synchronize()
        ctx.errors.check()
        got_x = cp.asnumpy(out).view(ml_dtypes.bfloat16).astype(np.float32)
        diff = reference.calc_diff(got_x, want_x.astype(np.float32))
        assert diff < 5e-6, diff
        if got_x.size:
            assert (np.abs(got_x - want_x.astype(np.float32)).max()
                    <= 1e-2 * (np.abs(got_x).max() + 1))
        assert reference.calc_diff(cp.asnumpy(out_w), want_w) < 1e-9
    return n_recv
