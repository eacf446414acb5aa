"""Runs the README's decoding example (CUDA-graph capture of a low-latency dispatch + combine)
on one rank, then replays its graph with new tokens written into the captured inputs and checks
every replay: the example's expert is the identity, so ``out[t] = x[t] * sum of token t's valid
top-k weights`` (float32 sum, one bf16 rounding)."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from readme_code import python_block_after  # noqa: E402


def decoding_example(group, replays=3):
    import cupy

    import numba_ep
    from numba_ep import reference

    ns = {"group": group, "cp": cupy, "numba_ep": numba_ep, "num_steps": 0}
    exec(compile(python_block_after("**Decoding**"), "README.md (Decoding)", "exec"), ns)
    x, topk_idx, topk_w, out = ns["x"], ns["topk_idx"], ns["topk_w"], ns["out"]
    graph, stream, buf, E = ns["graph"], ns["stream"], ns["buf"], ns["E"]
    M, H = x.shape
    K = topk_idx.shape[1]
    diffs = []
    try:
        for step in range(replays):
            rng = np.random.default_rng([step, group.rank, 5])
            T = int(rng.integers(0, M + 1)) if step else M     # fewer tokens: -1 rows
            xf = (rng.standard_normal((M, H)) * 0.5).astype(np.float32)
            bits = (xf.view(np.uint32) >> 16).astype(np.uint16)   # truncate to bf16
            topk = np.argsort(-rng.random((M, E)), axis=1)[:, :K].astype(np.int64)
            topk[T:] = -1
            topk[rng.random((M, K)) < 0.1] = -1
            w = rng.random((M, K)).astype(np.float32)
            with stream:
                x[...] = cupy.asarray(bits)
                topk_idx[...] = cupy.asarray(topk)
                topk_w[...] = cupy.asarray(w)
            stream.synchronize()
            group.barrier()               # no rank replays before every rank's inputs are in
            graph.launch(stream)
            stream.synchronize()
            got = (cupy.asnumpy(out).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            x64 = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
            wsum = np.where(topk >= 0, w, 0).astype(np.float64).sum(axis=1, keepdims=True)
            diffs.append(float(reference.calc_diff(got, x64 * wsum)))
            group.barrier()               # every rank has read its outputs
    finally:
        stream.synchronize()
    del ns, buf, graph       # the README's Buffer is released when collected, as it says
    group.barrier()
    return diffs
