"""reference.internode_dispatch / internode_combine: the executable specification of internode
normal mode (not built on the GPU yet; notes/internode-plan.md). The user-visible results must be
intranode_dispatch's, and every handle item must agree with the routing and with the others."""
import numpy as np
import pytest

from numba_ep import reference as ref

BF16 = ref.bfloat16


def problem(seed, R, E, K=4, tokens=(37, 0, 1, 64, 19, 50), H=64, drop=0.2):
    rng = np.random.default_rng(seed)
    xs, topks, ws = [], [], []
    for r in range(R):
        T = tokens[r % len(tokens)]
        xs.append(rng.standard_normal((T, H)).astype(np.float32).astype(BF16))
        topk = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int64)
        topk[rng.random(topk.shape) < drop] = -1
        topks.append(topk)
        ws.append(rng.random((T, K)).astype(np.float32))
    return xs, topks, ws


def _counters_are_rings(head, selected, C):
    """-1 exactly where not selected; 0, 1, 2, ... in token order inside each channel."""
    assert ((head >= 0) == selected).all()
    for c in range(C):
        start, end = ref.get_channel_task_range(head.shape[0], C, c)
        for col in range(head.shape[1]):
            got = head[start:end, col][selected[start:end, col]]
            np.testing.assert_array_equal(got, np.arange(len(got)))


@pytest.mark.parametrize("R,G,C", [(4, 2, 3), (6, 3, 2), (4, 1, 4), (4, 4, 3), (8, 2, 5)])
def test_handle_items_agree_with_the_routing(R, G, C):
    E = 4 * R
    xs, topks, ws = problem(R * 100 + G, R, E)
    got = ref.internode_dispatch(xs, topks, ws, E, C, G)
    want = ref.intranode_dispatch(xs, topks, ws, E, C)
    nodes = R // G
    for d in range(R):
        g, w = got[d], want[d]
        b = d // G
        for key in ("recv_x", "recv_topk_idx", "recv_topk_weights", "recv_src_idx",
                    "rank_prefix_matrix", "channel_prefix_matrix", "send_head"):
            np.testing.assert_array_equal(np.asarray(g[key]).view(np.uint8),
                                          np.asarray(w[key]).view(np.uint8), err_msg=key)
        assert g["num_recv_tokens_per_expert_list"] == w["num_recv_tokens_per_expert_list"]
        routing = g["is_token_in_rank"]
        in_node = routing.reshape(-1, nodes, G).any(axis=2)
        # sender side
        per_rdma = ref.get_dispatch_layout(topks[d], E, R, num_gpus_per_node=G)[1]
        last = g["rdma_channel_prefix_matrix"][:, -1]
        np.testing.assert_array_equal(last, per_rdma if per_rdma is not None
                                      else in_node.sum(axis=0))
        _counters_are_rings(g["send_rdma_head"], in_node, C)
        # forwarder side: RDMA from (a, d % G) for every node a
        sources = [a * G + d % G for a in range(nodes)]
        totals = [int(got[s]["rdma_channel_prefix_matrix"][b, -1]) for s in sources]
        np.testing.assert_array_equal(g["recv_rdma_rank_prefix_sum"], np.cumsum(totals))
        assert g["num_rdma_recv_tokens"] == sum(totals) == len(g["send_nvl_head"])
        for a, s in enumerate(sources):
            np.testing.assert_array_equal(g["recv_rdma_channel_prefix_matrix"][a],
                                          got[s]["rdma_channel_prefix_matrix"][b])
            lo = int(g["recv_rdma_rank_prefix_sum"][a - 1]) if a else 0
            block = g["send_nvl_head"][lo:lo + totals[a]]
            fwd = np.nonzero(in_node_of(got[s], nodes, G)[:, b])[0]
            to_gpu = got[s]["is_token_in_rank"][fwd, b * G:(b + 1) * G]
            assert ((block >= 0) == to_gpu).all()
            # each sub-ring (source node a, channel, local GPU j) counts 0, 1, 2, ...
            channels = np.minimum(fwd // max(-(-len(got[s]["is_token_in_rank"]) // C), 1), C - 1)
            for c in range(C):
                for j in range(G):
                    col = block[channels == c, j]
                    np.testing.assert_array_equal(col[col >= 0], np.arange((col >= 0).sum()))
                    # ... and hands rank (b, j) exactly its rows from (a, d % G) in channel c
                    dst = got[b * G + j]
                    start = dst["recv_gbl_channel_prefix_matrix"][s, c]
                    end = (dst["recv_gbl_channel_prefix_matrix"][s, c + 1] if c + 1 < C
                           else dst["recv_gbl_rank_prefix_sum"][s])
                    assert (col >= 0).sum() == end - start
        # receiver side
        np.testing.assert_array_equal(g["recv_gbl_rank_prefix_sum"], w["rank_prefix_matrix"][:, d])
        meta = g["recv_src_meta"]
        assert meta.shape == (w["num_recv_tokens"], 2) and meta.dtype == np.int32
        prefix = np.concatenate([[0], g["recv_gbl_rank_prefix_sum"]])
        for s in range(R):
            rows = slice(prefix[s], prefix[s + 1])
            assert (meta[rows, 0] == s // G).all()
            src = w["recv_src_idx"][rows]
            mask = (got[s]["is_token_in_rank"][src, b * G:(b + 1) * G].astype(np.int64)
                    << np.arange(G)).sum(axis=1)
            np.testing.assert_array_equal(meta[rows, 1], mask)
            assert (meta[rows, 1] >> (d % G) & 1).all(), "the token comes to me"


def in_node_of(result, nodes, G):
    r = result["is_token_in_rank"]
    return r.reshape(r.shape[0], nodes, G).any(axis=2)


@pytest.mark.parametrize("R,G", [(4, 2), (6, 2), (2, 1)])
def test_combine_inverts_dispatch(R, G):
    E, C = 2 * R, 3
    xs, topks, ws = problem(7 + R, R, E, K=3)
    got = ref.internode_dispatch(xs, topks, ws, E, C, G)
    rng = np.random.default_rng(R)
    ys = [rng.standard_normal(g["recv_x"].shape).astype(np.float32).astype(BF16) for g in got]
    biases = [(np.ones_like(x), None) for x in xs]
    combined = ref.internode_combine(ys, got, topk_weights=[g["recv_topk_weights"] for g in got],
                                     bias=biases)
    want = ref.intranode_combine(ys, ref.intranode_dispatch(xs, topks, ws, E, C),
                                 topk_weights=[g["recv_topk_weights"] for g in got], bias=biases)
    for (cx, cw), (wx, ww) in zip(combined, want):
        np.testing.assert_array_equal(cx.view(np.uint16), wx.view(np.uint16))
        np.testing.assert_array_equal(cw, ww)
    # combining the received rows gives x times the ranks it visited, exactly
    back = ref.internode_combine([g["recv_x"] for g in got], got)
    for x, g, (cx, _) in zip(xs, got, back):
        copies = g["is_token_in_rank"].sum(axis=1, keepdims=True).astype(np.float32)
        # (values, not bits: a token sent nowhere comes back as +0.0 where x * 0 may be -0.0)
        np.testing.assert_array_equal(cx.astype(np.float32),
                                      (x.astype(np.float32) * copies).astype(BF16)
                                      .astype(np.float32))


def test_bad_node_size():
    xs, topks, ws = problem(1, 4, 8)
    with pytest.raises(ValueError, match="num_gpus_per_node.*divisor of the rank count 4"):
        ref.internode_dispatch(xs, topks, ws, 8, 2, 3)
