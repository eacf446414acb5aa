"""Benchmarks behind ``python -m numba_ep bench NAME`` (GPU only): launch, layout, intranode,
low-latency.

Timing method (see notes/perf.md): warm up first (compilation, module load), then time many
repetitions and report the median. Device time comes from CUDA events around each launch; host
launch cost from the wall clock over many back-to-back launches of a tiny kernel, divided by the
count (the GPU keeps up, so this is the host cost of one launch).
"""
from __future__ import annotations

import functools
import json
import os
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
        rows["numba_ep fast path (packed params, cuLaunchKernel)"] = _host_us_per_launch(
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


def main(name, json_path=None, ranks=None, kernel_times=False) -> int:
    if name == "launch":
        rows = bench_launch()
        unit = "us per launch"
    elif name == "layout":
        rows = bench_layout(num_ranks=ranks or 2)
        unit = "us"
    elif name == "intranode":
        rows = bench_intranode(ranks)
        unit = "mixed (see row names)"
    elif name == "internode":
        rows = bench_internode(ranks)
        unit = "mixed (see row names)"
    elif name == "low-latency":
        rows = bench_low_latency(ranks, kernel_times=kernel_times)
        unit = "mixed (see row names)"
    else:  # pragma: no cover - argparse restricts the choices
        raise ValueError(name)
    dev = _device_name()
    print(f"bench {name} on {dev}")
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v:8.2f}" if isinstance(v, float) else f"  {k:<{width}}  {v}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"bench": name, "device": dev, "unit": unit, "rows": rows}, f, indent=2)
    return 0


# ---------------------------------------------------------------------------------------------
# bench intranode: layout, dispatch BF16 / FP8 and combine through numba_ep.Buffer on every local
# GPU, beside NCCL all-to-all of the same tokens and the NVLink copy-engine limit.
# ---------------------------------------------------------------------------------------------

def _median_event_us(fn, stream, iters=30, warmup=5, group=None):
    import cupy as cp

    times = []
    for i in range(warmup + iters):
        if group is not None:
            stream.synchronize()
            group.barrier()  # start every rank together, as a training step would
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(stream)
        fn()
        e1.record(stream)
        e1.synchronize()
        if i >= warmup:
            times.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3)
    return statistics.median(times)


def _graph_us(fn, stream, group, per_graph=10, replays=7):
    """Device time of one ``fn()``: ``per_graph`` calls captured in one CUDA graph, the median
    replay (every rank starting together) divided by ``per_graph``. Host work is out of the
    picture; what remains is the kernels, their barriers included."""
    import cupy as cp

    fn()  # compiled and allocated outside the capture
    stream.synchronize()
    with stream:
        stream.begin_capture()
        for _ in range(per_graph):
            fn()
        graph = stream.end_capture()
    graph.upload(stream)
    t = _median_event_us(lambda: graph.launch(stream=stream), stream, iters=replays, warmup=2,
                         group=group)
    graph = None  # the captured outputs go back to the pool before the next op's capture
    cp.get_default_memory_pool().free_all_blocks()
    return t / per_graph


def _pipelined_us(fn, stream, group, iters=30, warmup=5):
    """DeepEP's method: ``iters`` calls enqueued back to back (no host wait between them), an
    event pair around each, the median pair; while the host keeps ahead of the GPU this is the
    GPU's time per call. Also returns the host's wall time per call of the enqueue loop."""
    import cupy as cp

    for _ in range(warmup):
        fn()
    stream.synchronize()
    group.barrier()
    evs = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(iters)]
    t0 = time.perf_counter()
    for e0, e1 in evs:
        e0.record(stream)
        fn()
        e1.record(stream)
    host = (time.perf_counter() - t0) / iters * 1e6
    stream.synchronize()
    return statistics.median(cp.cuda.get_elapsed_time(a, b) * 1e3 for a, b in evs), host


def intranode_times(buf, group, stream, handle, recv_x, x_bf16, x_fp8, scales, cfg_d, cfg_c,
                    graph=True):
    """``{op: {"isolated": us, "pipelined": us, "host": us, "device": us or None}}`` for dispatch
    BF16, FP8 (cached handle) and combine BF16 through ``buf``: one call after a barrier between
    events; back-to-back calls between events (DeepEP's method); the host's enqueue time per call;
    device time from graph replays."""
    ops = {
        "dispatch BF16": lambda: buf.dispatch(x_bf16, handle=handle, config=cfg_d),
        "dispatch FP8": lambda: buf.dispatch((x_fp8, scales), handle=handle, config=cfg_d),
        "combine BF16": lambda: buf.combine(recv_x, handle, config=cfg_c),
    }
    out = {}
    for name, fn in ops.items():
        isolated = _median_event_us(fn, stream, group=group)
        pipelined, host = _pipelined_us(fn, stream, group)
        out[name] = {"isolated": isolated, "pipelined": pipelined, "host": host,
                     "device": _graph_us(fn, stream, group) if graph else None}
    return out


def _rows_of_times(times, hidden, bandwidths):
    """Bench rows of an ``intranode_times`` result: each op's times, and for every ``(label,
    rows)`` of ``bandwidths`` "label GB/s" = rows x row bytes / back-to-back time (BF16 rows of
    ``2 * hidden`` bytes; FP8 rows of ``hidden`` bytes plus a float32 scale per 128)."""
    bf16_row, fp8_row = hidden * 2, hidden + hidden // 128 * 4
    out = {}
    for name, row in (("dispatch BF16", bf16_row), ("dispatch FP8", fp8_row),
                      ("combine BF16", bf16_row)):
        tm = times[name]
        t = tm["pipelined"]
        out[f"{name}, us (back-to-back calls, DeepEP's method)"] = t
        if tm["device"] is not None:
            out[f"{name}, device us (graph replay)"] = tm["device"]
        out[f"{name}, us (one call after a barrier)"] = tm["isolated"]
        out[f"{name}, host us per call"] = tm["host"]
        for label, n in bandwidths:
            out[f"{name}, {label} GB/s"] = n * row / t / 1e3
    return out


def profile_calls(fn, stream, path, calls=50):
    """cProfile ``calls`` back-to-back calls of ``fn``; the 30 costliest functions (own time)
    go to ``path`` (None: profile, write nothing)."""
    import cProfile
    import io
    import pstats

    fn()
    stream.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stream.synchronize()
    if path is not None:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        with open(path, "w") as f:
            f.write(text.getvalue())


def intranode_rank(group, num_tokens=4096, hidden=7168, num_topk=8, num_experts=256, num_sms=24,
                   variants=None, profile=None):
    """One rank of ``bench intranode`` (a module-level function so that spawn can start it).

    ``variants``: a list of ``numba_ep.kernels.intranode.TUNING`` dicts; when given, only the
    dispatch / combine times of each variant are measured and returned as
    ``{variant repr: intranode_times(...)}`` (scripts/sweep_intranode.py); ``profile``: a path
    prefix for rank 0's cProfile of the host side of dispatch and combine (after the sweep)."""
    import cupy as cp

    from numba_ep.buffer import Buffer
    from numba_ep.config import Config
    from numba_ep.demo import _random_topk

    R, rank = group.size, group.rank
    rng = np.random.default_rng(1234 + rank)
    topk_np = _random_topk(rng, num_tokens, num_experts, num_topk, drop=0.0)
    cfg_d = Config(num_sms, Buffer.get_dispatch_config(R).num_max_nvl_chunked_send_tokens, 256)
    cfg_c = Config(num_sms, Buffer.get_combine_config(R).num_max_nvl_chunked_send_tokens, 256)
    nbytes = max(cfg_d.get_nvl_buffer_size_hint(hidden * 2, R),
                 cfg_c.get_nvl_buffer_size_hint(hidden * 2, R), 64 << 20)
    buf = Buffer(group, nbytes, explicitly_destroy=True)
    rows = {}
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.asarray(rng.standard_normal((num_tokens, hidden), dtype=np.float32))
        x_bf16 = (x.view(cp.uint32) >> 16).astype(cp.uint16)  # truncation is fine for timing
        x_fp8 = cp.asarray(rng.integers(0, 0x70, size=(num_tokens, hidden), dtype=np.uint8))
        scales = cp.asarray(rng.random((num_tokens, hidden // 128), dtype=np.float32))
        topk = cp.asarray(topk_np)
        weights = cp.asarray(rng.random((num_tokens, num_topk), dtype=np.float32))

        layout = buf.get_dispatch_layout(topk, num_experts)
        per_rank, _, per_expert, in_rank, _ = layout
        recv_x, _, _, _, handle, _ = buf.dispatch(
            x_bf16, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk, topk_weights=weights, config=cfg_d)
        if variants is not None:
            from numba_ep.kernels import intranode

            saved = dict(intranode.TUNING)
            try:
                for v in variants:
                    intranode.TUNING.clear()
                    intranode.TUNING.update(v)
                    rows[repr(v)] = intranode_times(buf, group, stream, handle, recv_x, x_bf16,
                                                    x_fp8, scales, cfg_d, cfg_c)
                if profile:  # every rank makes the calls (they meet in device barriers)
                    group.barrier()
                    profile_calls(lambda: buf.dispatch(x_bf16, handle=handle, config=cfg_d),
                                  stream, profile + ".dispatch.txt" if rank == 0 else None)
                    group.barrier()
                    profile_calls(lambda: buf.combine(recv_x, handle, config=cfg_c), stream,
                                  profile + ".combine.txt" if rank == 0 else None)
            finally:
                intranode.TUNING.clear()
                intranode.TUNING.update(saved)
            group.barrier()
            buf.destroy()
            return rows
        rows["layout (Buffer call incl. id check), us"] = _median_event_us(
            lambda: buf.get_dispatch_layout(topk, num_experts), stream)
        n_recv = recv_x.shape[0]
        rank_prefix = cp.asnumpy(handle[0])
        n_local = int(rank_prefix[rank, rank] - (rank_prefix[rank - 1, rank] if rank else 0))
        n_remote = n_recv - n_local
        times = intranode_times(buf, group, stream, handle, recv_x, x_bf16, x_fp8, scales,
                                cfg_d, cfg_c)
        rows.update(_rows_of_times(times, hidden, (("logical", n_recv),
                                                   ("NVLink (remote rows)", n_remote))))
        rows.update(_torch_host_rows(buf, group, stream, x_bf16, layout, topk, weights, cfg_d,
                                     cfg_c))
        rows["received rows (local + remote)"] = float(n_recv)
        rows["remote rows"] = float(n_remote)
        if R > 1:
            rows.update(_link_baselines(buf, group, stream, per_rank, hidden))
    group.barrier()
    buf.destroy()
    return rows


def _torch_host_rows(buf, group, stream, x_bf16, layout, topk, weights, cfg_d, cfg_c):
    """Host us per call of a cached BF16 dispatch and a combine with torch tensors in and out
    (the same device memory as the CuPy calls), with results made by torch and handed back as
    views (``interop.TORCH_OUTPUT_VIEWS``) and, for comparison, through DLPack. Empty without
    torch on CUDA."""
    from numba_ep.bench_ll import cuda_torch

    torch = cuda_torch()
    if torch is None:
        return {}
    import cupy as cp

    from numba_ep import interop

    stream.synchronize()
    dev = torch.device("cuda", cp.cuda.Device().id)
    as_t = functools.partial(torch.as_tensor, device=dev)
    xt = as_t(x_bf16.view(cp.int16)).view(torch.bfloat16)
    per_rank, per_expert, in_rank = (as_t(layout[i]) for i in (0, 2, 3))
    rows = {}
    saved = interop.TORCH_OUTPUT_VIEWS
    ts = torch.cuda.ExternalStream(stream.ptr, device=dev)
    try:
        with torch.cuda.stream(ts):
            recv_x, _, _, _, handle, _ = buf.dispatch(
                xt, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                num_tokens_per_expert=per_expert, topk_idx=as_t(topk),
                topk_weights=as_t(weights), config=cfg_d)
            for views, label in ((True, "views"), (False, "DLPack")):
                interop.TORCH_OUTPUT_VIEWS = views
                _, host = _pipelined_us(lambda: buf.dispatch(xt, handle=handle, config=cfg_d),
                                        stream, group)
                rows[f"dispatch BF16, host us per call, torch tensors ({label} out)"] = host
                _, host = _pipelined_us(lambda: buf.combine(recv_x, handle, config=cfg_c), stream,
                                        group)
                rows[f"combine BF16, host us per call, torch tensors ({label} out)"] = host
    finally:
        interop.TORCH_OUTPUT_VIEWS = saved
        stream.synchronize()
    return rows


def _link_baselines(buf, group, stream, per_rank, hidden):
    """The rows every normal-mode bench compares with, measured in the same run: the NVLink
    copy-engine limit (this rank's GPU -> the next rank's IPC buffer, all ranks at once: the
    same both-ways load as an all-to-all) and NCCL's all-to-all of the same BF16 rows."""
    import cupy as cp

    R, rank = group.size, group.rank
    peer = buf._ipc.ptrs[(rank + 1) % R]
    n = 64 << 20
    src = cp.empty(n, dtype=cp.uint8)
    t_copy = _median_event_us(
        lambda: cp.cuda.runtime.memcpyAsync(peer, src.data.ptr, n, 3, stream.ptr),
        stream, group=group)
    rows = {"NVLink copy engine, one way per GPU (all GPUs sending), GB/s": n / t_copy / 1e3}
    try:
        rows.update(_nccl_all_to_all(group, cp.asnumpy(per_rank), hidden, stream))
    except Exception as e:  # a baseline that cannot run must not cost the bench's own rows
        rows["NCCL all-to-all (torch)"] = f"failed: {type(e).__name__}: {e}"[:200]
    return rows


def _nccl_all_to_all(group, tokens_to_rank, hidden, stream):
    """NCCL all-to-all (torch.distributed) moving the same BF16 rows as dispatch: each rank
    sends ``tokens_to_rank[r]`` rows to rank r. Skipped (empty) when torch is missing."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return {}
    import os
    import tempfile

    import cupy as cp

    R, rank = group.size, group.rank
    path = group.broadcast_bytes(tempfile.mktemp(prefix="numba_ep_nccl_").encode()
                                 if rank == 0 else None, root=0).decode()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(cp.cuda.Device().id)
    dist.init_process_group("nccl", init_method=f"file://{path}", rank=rank, world_size=R)
    try:
        counts = [b for b in group.allgather_bytes(np.asarray(tokens_to_rank, np.int64).tobytes())]
        recv_counts = [int(np.frombuffer(c, np.int64)[rank]) for c in counts]
        send = torch.empty((int(sum(tokens_to_rank)), hidden), dtype=torch.bfloat16, device="cuda")
        recv = torch.empty((sum(recv_counts), hidden), dtype=torch.bfloat16, device="cuda")
        in_splits = [int(v) for v in tokens_to_rank]
        ts = torch.cuda.Stream()
        times = []
        with torch.cuda.stream(ts):
            for i in range(25):
                torch.cuda.synchronize()
                dist.barrier()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                dist.all_to_all_single(recv, send, recv_counts, in_splits)
                e1.record()
                e1.synchronize()
                if i >= 5:
                    times.append(e0.elapsed_time(e1) * 1e3)
        t = statistics.median(times)
        return {"NCCL all-to-all (torch), same BF16 rows, us": t,
                "NCCL all-to-all, logical GB/s": sum(recv_counts) * hidden * 2 / t / 1e3}
    finally:
        dist.destroy_process_group()


def _merge_ranks(results):
    """One row per key of the ranks' rows: bandwidths and row counts averaged over ranks, times
    (and anything else) the slowest rank's."""
    rows = {}
    for k in results[0]:
        vals = [r[k] for r in results]
        numeric = all(isinstance(v, (int, float)) for v in vals)
        rows[k] = (statistics.mean(vals) if numeric and ("GB/s" in k or "rows" in k)
                   else max(vals))
    return rows


def bench_intranode(ranks=None):
    from numba_ep.group import gpu_count
    from numba_ep.group import spawn

    n = ranks or gpu_count()
    results = spawn(intranode_rank, n)
    rows = {"ranks": float(n)}
    rows.update(_merge_ranks(results))
    rows.update(DEEPEP_V1_INTRANODE.get(n, {f"DeepEP V1 published EP{n}": "none"}))
    return rows


#: DeepEP V1's published intranode figures (4096 tokens x 7168, top-8 of 256, 24 SMs), by ranks.
#: EP8 is on H800, whose NVLink is about half of an H100's.
DEEPEP_V1_INTRANODE = {
    2: {"DeepEP V1 2xH100: dispatch BF16 / FP8 / combine, us": "356 / 253 / 414"},
    8: {"DeepEP V1 EP8 H800: dispatch FP8 / combine, GB/s": "153 / 158",
        "third-party DeepEP 8xH100: dispatch BF16 / combine, logical GB/s": "329 / 287"},
}


# ---------------------------------------------------------------------------------------------
# bench internode: dispatch BF16 / FP8 and combine in internode mode. One host plays several
# nodes (NUMBA_EP_GPUS_PER_NODE), so the "RDMA" traffic between them is NVSHMEM puts carried by
# NVLink: the numbers test the code path and its overheads, not a network.
# ---------------------------------------------------------------------------------------------

#: DeepEP V1's README internode figures (H800 + CX7 400 Gb/s IB, ~50 GB/s per NIC), by ranks
DEEPEP_V1_INTERNODE = {
    16: {"DeepEP V1 16 ranks (2 nodes) H800: dispatch / combine, RDMA GB/s": "43 / 43"},
    32: {"DeepEP V1 32 ranks (4 nodes) H800: dispatch / combine, RDMA GB/s": "58 / 57"},
}


def internode_rank(group, num_tokens=4096, hidden=7168, num_topk=8, num_experts=256,
                   num_sms=24):
    """One rank of ``bench internode``: DeepEP's test_internode measurement (cached dispatch
    BF16 and FP8, combine BF16; RDMA GB/s = rows sent to other nodes, once per node, x row
    bytes / time; NVL GB/s = rows received x row bytes / time)."""
    import cupy as cp

    from numba_ep.buffer import Buffer
    from numba_ep.config import Config
    from numba_ep.demo import _random_topk

    R, rank = group.size, group.rank
    rng = np.random.default_rng(4321 + rank)
    topk_np = _random_topk(rng, num_tokens, num_experts, num_topk, drop=0.0)
    cfg = Config(num_sms, 8, 256)
    G = int(os.environ["NUMBA_EP_GPUS_PER_NODE"])
    rdma_bytes = cfg.get_rdma_buffer_size_hint(hidden * 2, R, num_max_tokens=num_tokens,
                                               num_gpus_per_node=G)
    buf = Buffer(group, cfg.get_nvl_buffer_size_hint(hidden * 2, R),
                 num_rdma_bytes=(rdma_bytes + 127) // 128 * 128, explicitly_destroy=True)
    rows = {}
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        x = cp.asarray(rng.standard_normal((num_tokens, hidden), dtype=np.float32))
        x_bf16 = (x.view(cp.uint32) >> 16).astype(cp.uint16)
        x_fp8 = cp.asarray(rng.integers(0, 0x70, size=(num_tokens, hidden), dtype=np.uint8))
        scales = cp.asarray(rng.random((num_tokens, hidden // 128), dtype=np.float32))
        topk = cp.asarray(topk_np)
        weights = cp.asarray(rng.random((num_tokens, num_topk), dtype=np.float32))
        per_rank, per_rdma, per_expert, in_rank, _ = buf.get_dispatch_layout(topk, num_experts)
        recv_x, _, _, _, handle, _ = buf.dispatch(
            x_bf16, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk,
            topk_weights=weights, config=cfg)
        node = rank // G
        rdma_rows = int(cp.asnumpy(per_rdma).sum() - int(per_rdma[node]))
        n_recv = recv_x.shape[0]
        times = intranode_times(buf, group, stream, handle, recv_x, x_bf16, x_fp8, scales, cfg,
                                cfg, graph=False)
        rows.update(_rows_of_times(times, hidden, (("RDMA (to other nodes)", rdma_rows),
                                                   ("NVL (received rows)", n_recv))))
        rows["rows sent to other nodes (once per node)"] = float(rdma_rows)
        rows["received rows"] = float(n_recv)
        # on one host every "node" shares NVLink: the copy engine and NCCL are the yardsticks
        rows.update(_link_baselines(buf, group, stream, per_rank, hidden))
    group.barrier()
    buf.destroy()
    return rows


def bench_internode(ranks=None, gpus_per_node=None):
    """Spawn one rank per local GPU (or ``ranks``), split into nodes of ``gpus_per_node``
    (default: env NUMBA_EP_GPUS_PER_NODE, else half the ranks: two nodes)."""
    from numba_ep.group import gpu_count
    from numba_ep.group import spawn

    n = ranks or gpu_count()
    g = gpus_per_node or int(os.environ.get("NUMBA_EP_GPUS_PER_NODE", 0)) or max(1, n // 2)
    if n < 2 or n % g or g >= n:
        raise ValueError(f"bench internode: {n} ranks cannot form several nodes of {g} GPUs")
    saved = os.environ.get("NUMBA_EP_GPUS_PER_NODE")
    os.environ["NUMBA_EP_GPUS_PER_NODE"] = str(g)   # the spawned ranks inherit it
    try:
        results = spawn(internode_rank, n, timeout=900)
    finally:
        if saved is None:
            os.environ.pop("NUMBA_EP_GPUS_PER_NODE")
        else:
            os.environ["NUMBA_EP_GPUS_PER_NODE"] = saved
    rows = {"ranks": float(n), "layout": f"{n // g} nodes x {g} GPUs, one host (NVSHMEM puts "
                                         "between nodes carried by NVLink)"}
    rows.update(_merge_ranks(results))
    rows.update(DEEPEP_V1_INTERNODE.get(n, {f"DeepEP V1 published {n} ranks": "none"}))
    return rows


# ---------------------------------------------------------------------------------------------
# bench low-latency: numba_ep.bench_ll's measurement (low-latency dispatch and combine kernels,
# GPU time between CUDA events, median of many back-to-back iterations) on every local GPU.
# ---------------------------------------------------------------------------------------------

#: DeepEP V1 on 2 x H100 at the default shape (T = 128, H = 7168, top-8 of 288 experts), us
DEEPEP_V1_LL_2XH100 = {"dispatch": "30-35", "combine": "41-43", "dispatch+combine": "76"}
#: DeepEP V1's README, EP8 on H800 after NVLink P2P for intranode peers, us
DEEPEP_V1_LL_EP8_H800 = {"dispatch": "77", "combine": "114"}

_LL_ROWS = (
    ("dispatch", "dispatch (FP8), us"),
    ("combine", "combine (BF16), us"),
    ("dispatch+combine", "dispatch + combine, us"),
    ("pair_dispatch+combine",
     "  dispatch + combine, events around the pair only (as DeepEP's bench), us"),
    ("kernel_dispatch", "kernel time (CUDA profiler, DeepEP's method): dispatch, us"),
    ("kernel_combine", "  kernel time: combine, us"),
    ("kernel_dispatch+combine", "  kernel time: dispatch + combine, us"),
    ("dispatch_send", "hook mode: dispatch send phase, us"),
    ("dispatch_recv", "hook mode: dispatch recv phase, us"),
    ("combine_send", "hook mode: combine send phase, us"),
    ("combine_recv", "hook mode: combine recv phase, us"),
    ("host_dispatch+combine", "host time per dispatch + combine (enqueue), us"),
    ("split_dispatch", "two launches a call (fuse=False): dispatch, us"),
    ("split_combine", "  combine, us"),
    ("split_dispatch+combine", "  dispatch + combine, us"),
    ("split_host_dispatch+combine", "  host time per dispatch + combine, us"),
    ("graph_dispatch+combine", "dispatch + combine as a CUDA-graph replay, GPU us"),
    ("host_graph_replay", "host time per graph replay, us"),
    ("host_buffer", "host time per dispatch + combine through Buffer, us"),
    ("host_buffer_full_checks", "  same, argument checks redone every call, us"),
    ("host_buffer_torch", "  same, torch tensors in and out, us"),
)


def bench_low_latency(ranks=None, num_tokens=128, hidden=7168, num_topk=8, num_experts=288,
                      num_iters=60, kernel_times=False):
    """Spawn one rank per local GPU (or ``ranks``) running ``numba_ep.bench_ll``'s
    measurement; times are the slowest rank's medians, bandwidths the mean over ranks.
    ``kernel_times``: also the kernels' own durations from the CUDA profiler."""
    from numba_ep.group import gpu_count
    from numba_ep.bench_ll import bench_low_latency as measure
    from numba_ep.group import spawn

    n = ranks or gpu_count()
    results = spawn(measure, n, num_tokens=num_tokens, hidden=hidden, num_topk=num_topk,
                    num_experts=num_experts, num_iters=num_iters, kernel_times=kernel_times,
                    timeout=600)
    rows = {"ranks": float(n),
            "shape": f"T = M = {num_tokens}, H = {hidden}, top-{num_topk} of {num_experts} "
                     "experts"}
    for key, label in _LL_ROWS:
        if key not in results[0]:   # host_buffer_torch: torch with CUDA only
            continue
        rows[label] = max(r[key] for r in results)
        if n == 2 and key in DEEPEP_V1_LL_2XH100:
            rows[f"  DeepEP V1 2xH100 {key}, us"] = DEEPEP_V1_LL_2XH100[key]
        if n == 8 and key in DEEPEP_V1_LL_EP8_H800:
            rows[f"  DeepEP V1 EP8 H800 (NVLink P2P) {key}, us"] = DEEPEP_V1_LL_EP8_H800[key]
    if "kernel_note" in results[0]:
        rows["kernel time (CUDA profiler)"] = results[0]["kernel_note"]
    rows["dispatch logical GB/s (FP8 messages)"] = statistics.mean(
        r["dispatch_GBps"] for r in results)
    rows["combine logical GB/s (BF16 rows)"] = statistics.mean(r["combine_GBps"] for r in results)
    return rows

