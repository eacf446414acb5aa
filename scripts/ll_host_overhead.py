"""Host-side Python cost of Buffer.low_latency_dispatch + low_latency_combine, without a GPU.

A host-mode Buffer (numba_ep.Buffer._host_mode) whose low-latency kernel entry points are stubs
returning preallocated NumPy arrays: what is timed is everything above the kernels (argument
checks, the handle, views, outputs) at DeepEP's decoding shape (128 tokens x 7168, top-8 of 288
experts, 2 ranks). It is a floor for an eager call's host time on a GPU, where the launches and
CuPy/torch objects come on top.

    python scripts/ll_host_overhead.py     # us per dispatch + combine, then a profile
"""
import cProfile
import io
import pstats
import time
from types import SimpleNamespace

import ml_dtypes
import numpy as np

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep.buffer import Buffer
from numba_ep.kernels import low_latency as ll

M, H, E, K, R, T = 128, 7168, 288, 8, 2, 128


def stubbed_buffer():
    """A host-mode rank-0 Buffer whose low-latency kernels return preallocated outputs."""
    L = E // R
    outs = (np.zeros((L, R * M, H), np.uint8), np.zeros((L, R * M, H // 128), np.float32),
            np.zeros(L, np.int32), np.zeros((L, R * M), np.int32), np.zeros((L, R), np.int64))
    res = np.zeros((T, H), np.uint16)

    class Ctx:
        def __init__(self, *args, **kwargs):
            pass

        def check(self):
            pass

    ll.LowLatencyContext = Ctx
    ll.low_latency_dispatch = lambda ctx, xv, topk, **kw: (*outs, None)
    ll.low_latency_combine = lambda ctx, xv, topk, w, src, lr, **kw: (res, None)
    return Buffer._host_mode(SimpleNamespace(rank=0, size=R), low_latency_mode=True,
                             num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, H, R, E))


def main():
    buf = stubbed_buffer()
    x = np.zeros((T, H), ml_dtypes.bfloat16)
    topk = np.zeros((T, K), np.int64)
    w = np.ones((T, K), np.float32)
    y = np.zeros((E // R, R * M, H), ml_dtypes.bfloat16)

    def step():
        _, _, handle, _, _ = buf.low_latency_dispatch(x, topk, M, E)
        buf.low_latency_combine(y, topk, w, handle)

    for _ in range(50):
        step()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    print(f"host-mode Python per dispatch + combine: {(time.perf_counter() - t0) / n * 1e6:.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        step()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumtime").print_stats(25)
    print(text.getvalue())


if __name__ == "__main__":
    main()
