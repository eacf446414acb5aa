"""Benchmarks behind ``python -m numba_ep bench NAME`` (GPU only).

Timing method (see notes/perf.md): warm up first (compilation, module load), then time many
repetitions and report the median. Device time comes from CUDA events around each launch; host
launch cost from the wall clock over many back-to-back launches of a tiny kernel, divided by the
count (the GPU keeps up, so this is the host cost of one launch).
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np

SIX_ARG_SIG = "void(uint64, uint64, uint64, uint64, uint64, uint64, int32)"


def make_six_arg_kernel():
    """A tiny kernel with six array arguments (as addresses): the launch-cost probe."""
    from numba import cuda

    from numba_ep.kernels import ptx

    def six(a, b, c, d, e, f, n):
        i = cuda.grid(1)
        if i < n:
            ptx.ptr_f32(a)[i] = (ptx.ptr_f32(b)[i] + ptx.ptr_f32(c)[i] + ptx.ptr_f32(d)[i]
                                 + ptx.ptr_f32(e)[i] + ptx.ptr_f32(f)[i])

    return six


def _dispatcher_six():
    from numba import cuda

    @cuda.jit
    def six_arrays(a, b, c, d, e, f, n):
        i = cuda.grid(1)
        if i < n:
            a[i] = b[i] + c[i] + d[i] + e[i] + f[i]

    return six_arrays


def _host_us_per_launch(fn, n=2000, reps=5, include_gpu=False):
    """Median over ``reps`` of the wall time of ``n`` calls of ``fn`` divided by ``n``; with
    ``include_gpu`` the clock stops after the stream has drained, so GPU time counts too."""
    import cupy as cp

    samples = []
    for _ in range(reps):
        cp.cuda.get_current_stream().synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if include_gpu:
            cp.cuda.get_current_stream().synchronize()
        t1 = time.perf_counter()
        cp.cuda.get_current_stream().synchronize()
        samples.append((t1 - t0) / n * 1e6)
    return statistics.median(samples)


def bench_launch():
    """Host cost of one launch: numba_ep's path, numba's dispatcher with CuPy arrays, graph replay."""
    import cupy as cp
    from numba import cuda

    from numba_ep.interop import address
    from numba_ep.launch import get_kernel

    n = 32
    arrs = [cp.ones(n, dtype=cp.float32) for _ in range(6)]
    ptrs = [address(a) for a in arrs]
    stream = cp.cuda.Stream(non_blocking=True)
    k = get_kernel(make_six_arg_kernel, SIX_ARG_SIG)
    rows = {}
    with stream:
        k.launch(1, 32, *ptrs, n, stream=stream)
        rows["numba_ep fast path (cuda.core.launch)"] = _host_us_per_launch(
            lambda: k.launch(1, 32, *ptrs, n, stream=stream))
        assert float(arrs[0][0].get()) == 5.0, "six-argument kernel computed a wrong value"
        disp = _dispatcher_six()
        nstream = cuda.external_stream(stream.ptr)
        disp[1, 32, nstream](*arrs, n)
        rows["numba dispatcher, CuPy arrays"] = _host_us_per_launch(
            lambda: disp[1, 32, nstream](*arrs, n), n=300)
        # Graph: capture 100 launches, replay; per-node time includes the GPU's work.
        nodes = 100
        stream.begin_capture()
        for _ in range(nodes):
            k.launch(1, 32, *ptrs, n, stream=stream)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        t = _host_us_per_launch(lambda: graph.launch(stream), n=50, include_gpu=True)
        stream.synchronize()
        rows["CUDA graph replay, per node (numba_ep kernels captured)"] = t / nodes
    return rows


def bench_layout(num_tokens=4096, num_experts=256, num_topk=8, num_ranks=2, iters=200):
    """get_dispatch_layout, checked against the reference first. Device time: 20 launches
    captured in a CUDA graph, replayed ``iters`` times between events (no host gaps); host time:
    the Python call as a user makes it."""
    import cupy as cp

    from numba_ep import reference
    from numba_ep.demo import _random_topk
    from numba_ep.kernels.layout import get_dispatch_layout

    rng = np.random.default_rng()
    topk_np = _random_topk(rng, num_tokens, num_experts, num_topk)
    topk = cp.asarray(topk_np)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        got = get_dispatch_layout(topk, num_experts, num_ranks, stream=stream)
        want = reference.get_dispatch_layout(topk_np, num_experts, num_ranks)
        for g, w in zip(got, want):
            if w is not None and not np.array_equal(cp.asnumpy(g), w):
                raise AssertionError("layout kernel disagrees with the reference")
        per_launch = 20
        stream.begin_capture()
        for _ in range(per_launch):
            get_dispatch_layout(topk, num_experts, num_ranks, stream=stream, out=got)
        graph = stream.end_capture()
        graph.launch(stream)
        times = []
        for _ in range(iters):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            graph.launch(stream)
            e1.record(stream)
            e1.synchronize()
            times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / per_launch)
        host = _host_us_per_launch(
            lambda: get_dispatch_layout(topk, num_experts, num_ranks, stream=stream, out=got),
            n=500)
    return {f"layout {num_tokens} tok, top-{num_topk} of {num_experts} experts, {num_ranks} ranks: "
            f"device us (graph, median of {iters})": statistics.median(times),
            "  host us per get_dispatch_layout call": host,
            "DeepEP V1 on H100 (us)": 34.0}


def _device_name():
    import cupy as cp

    return cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()


def main(name, json_path=None, ranks=None) -> int:
    if name == "launch":
        rows = bench_launch()
        unit = "us per launch"
    elif name == "layout":
        rows = bench_layout(num_ranks=ranks or 2)
        unit = "us"
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(name)
    dev = _device_name()
    print(f"bench {name} on {dev}")
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v:8.2f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"bench": name, "device": dev, "unit": unit, "rows": rows}, f, indent=2)
    return 0
