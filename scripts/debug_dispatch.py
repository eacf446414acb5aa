"""Debug aid: small intranode dispatches on 1 and 2 GPUs, printing where results go wrong."""
import sys

import numpy as np

import numba_ep  # noqa: F401


def run(group, T, H, E, K, C, N):
    import cupy as cp
    import ml_dtypes

    from numba_ep import reference
    from numba_ep.group import current_device
    from numba_ep.kernels import intranode as I
    from numba_ep.kernels.layout import get_dispatch_layout
    from numba_ep.memory import IpcBuffer
    import pickle

    current_device(group)
    R, rank = group.size, group.rank
    rng = np.random.default_rng(7 + rank)
    x = (np.arange(T)[:, None] * 1000 + rank * 100000 + np.arange(H)[None, :] % 7).astype(np.float32)
    xb = x.astype(ml_dtypes.bfloat16)
    scores = rng.random((T, E))
    topk = np.argsort(-scores, axis=1)[:, :K].astype(np.int64)
    w = (np.arange(T * K).reshape(T, K) + 1 + rank * 10000).astype(np.float32)
    allin = [pickle.loads(b) for b in group.allgather_bytes(pickle.dumps((xb.view(np.uint16), topk, w)))]
    xs, topks, ws = map(list, zip(*allin))
    ref = reference.intranode_dispatch([a.view(ml_dtypes.bfloat16) for a in xs], topks, ws, E, C)[rank]
    stream = cp.cuda.Stream(non_blocking=True)
    with IpcBuffer(group, I.nvl_bytes_needed(R, C, N, H * 2, K, 0)) as buf, stream:
        ctx = I.IntranodeContext(buf, rank, R, timeout_s=10)
        topk_d = cp.asarray(topk)
        w_d = cp.asarray(w)
        per_rank, _, per_expert, in_rank = get_dispatch_layout(topk_d, E, R, stream=stream)
        rp, cpm, rcp = I.notify_dispatch(ctx, per_rank, in_rank, per_expert, E, C, 1, stream)
        n, lst = I.wait_recv_counts(ctx, E // R)
        rx = cp.full((n, H), 0xFFFF, dtype=cp.uint16)
        rt = cp.full((n, K), -7, dtype=cp.int64)
        rw = cp.full((n, K), -5.0, dtype=cp.float32)
        rs = cp.full((n,), -7, dtype=cp.int32)
        sh = cp.full((T, R), -7, dtype=cp.int32)
        stream.synchronize()
        I.dispatch(ctx, cp.asarray(xb.view(np.uint16)).view(cp.uint8), None, topk_d, w_d, in_rank,
                   cpm, rp, rcp, rx.view(cp.uint8), None, rt, rw, rs, sh, E, N, C, 0, stream)
        stream.synchronize()
        ctx.errors.check()
        print(f"[rank {rank}] n_recv {n} (ref {ref['num_recv_tokens']}) w_d ok: "
              f"{np.array_equal(cp.asnumpy(w_d), w)}")
        got_w, want_w = cp.asnumpy(rw), ref["recv_topk_weights"]
        got_t, want_t = cp.asnumpy(rt), ref["recv_topk_idx"]
        got_s, want_s = cp.asnumpy(rs), ref["recv_src_idx"]
        got_x = cp.asnumpy(rx).view(ml_dtypes.bfloat16).astype(np.float32)
        want_x = ref["recv_x"].astype(np.float32)
        for name, g, wv in (("topk", got_t, want_t), ("weights", got_w, want_w), ("src", got_s, want_s),
                            ("x", got_x, want_x)):
            bad = np.argwhere(g != wv)
            print(f"[rank {rank}] {name}: {len(bad)} bad; first rows {sorted(set(bad[:, 0].tolist()))[:12]}")
        for r in range(min(n, 6)):
            print(f"[rank {rank}] row {r}: src got {got_s[r]} want {want_s[r]}; topk got {got_t[r].tolist()} "
                  f"want {want_t[r].tolist()}; w got {got_w[r].tolist()} want {want_w[r].tolist()}; "
                  f"x0 got {got_x[r, 0]} want {want_x[r, 0]}")
        bad_rows = sorted(set(np.argwhere(got_x != want_x)[:, 0].tolist()))
        for r in bad_rows[:6]:
            print(f"[rank {rank}] bad x row {r}: got x[:3] {got_x[r, :3].tolist()} want {want_x[r, :3].tolist()} "
                  f"src got {got_s[r]} want {want_s[r]}")
    return True


if __name__ == "__main__":
    from numba_ep.group import spawn

    for R, args in ((1, (64, 256, 8, 4, 1, 64)), (2, (64, 256, 8, 2, 1, 64)), (2, (200, 256, 8, 2, 2, 32))):
        print("==== R", R, "T,H,E,K,C,N", args, flush=True)
        try:
            spawn(run, R, *args, timeout=120)
        except Exception as e:
            print("FAILED", str(e)[-3000:])
