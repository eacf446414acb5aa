"""Benchmark of low-latency dispatch and combine (numba_ep.kernels.low_latency).

Run it on every rank of a group, e.g. ``numba_ep.spawn(bench_low_latency, 2)`` or
``python -m numba_ep.bench_ll --ranks 2``. Each rank returns a dict of median microseconds.

How it measures (GPU time, not Python time): a delay kernel first holds the stream for a few
milliseconds while the host enqueues every timed iteration behind it, so the GPU then runs them
back to back without waiting for the host (a dispatch costs ~50 us of Python and launches; the
kernels take less). CUDA events between the calls give one sample per call; the report takes
the median of ``num_iters`` samples after ``warmup`` untimed iterations. Ranks synchronise
through the kernels themselves (each receive waits for the peers' sends), so the first sample
absorbs the skew between ranks and the median ignores it.

Reported keys (microseconds): ``dispatch``, ``combine``, ``dispatch+combine`` (no hooks,
FP8 dispatch and BF16 combine, or LogFMT with ``use_logfmt``; events also between the two
calls), ``pair_dispatch+combine`` (the same pair with events around it only, as DeepEP's
``bench`` times its dispatch + combine row), and with hooks the four phases
``dispatch_send``, ``dispatch_recv``, ``combine_send``, ``combine_recv``: the receive phases are
launched after a 20 us gap (standing in for compute), so they time the unpack/reduce alone, as
DeepEP's hook numbers do. Also ``dispatch_GBps`` and ``combine_GBps``: DeepEP's logical
bandwidth (bytes of every valid (token, slot) message, FP8: H + H/128*4 + 16; BF16 combine: 2H)
over the median time.

Without hooks each call is one launch (send and receive phases in one cooperative kernel); the
``split_*`` keys time the same calls as two launches each (``LowLatencyContext.fuse = False``).

``kernel_dispatch`` / ``kernel_combine`` (with ``kernel_times=True``, measured last): the median
duration of the dispatch and the combine kernel as the CUDA profiler records it (CUPTI through
``torch.profiler``; only where torch has CUDA), DeepEP's own method (its ``bench_kineto``): the
events above also count the gap between one kernel's end and the next one's start, which a
kernel's duration does not. A process that ran the profiler may abort in glibc as it exits,
after the numbers are returned (seen only with the profiler; likely torch freeing CUPTI's
activity buffers at shutdown while CUPTI still holds them).

Host cost (each the median of five loops of 40 steps, ``host_us_per_call``):
``host_dispatch+combine`` is the host's wall time per dispatch + combine through the kernel layer
(arguments checked every call) while it enqueues them behind the delay kernel (no events in
that loop); ``graph_dispatch+combine`` is
the GPU time of one dispatch + combine captured in a CUDA graph and replayed back to back, and
``host_graph_replay`` the host's time per replay. ``host_buffer`` is the host time per
dispatch + combine through ``numba_ep.Buffer`` (what a user's eager step costs), and
``host_buffer_full_checks`` the same with the Buffer's remembered argument checks redone on
every call; ``host_buffer_torch`` the Buffer step with torch tensors in and out (when torch with
CUDA is importable).

DeepEP V1 on 2 x H100 at the default size: dispatch 30-35 us, combine 41-43 us.
"""
from __future__ import annotations

import time

import numpy as np

import numba_ep  # noqa: F401  (NumPy shim before numba.cuda)

DELAY_SIG = "void(int64)"


def make_delay():
    """A one-thread kernel that spins for ``ns`` nanoseconds of %globaltimer."""
    from numba import int64

    from numba_ep.kernels import ptx

    def delay(ns):
        start = ptx.globaltimer()
        while int64(ptx.globaltimer() - start) < ns:
            ptx.nanosleep(1000)

    return delay


def host_us_per_call(fn, stream, delay, calls, reps=5, warmup=10, barrier=None,
                     ns_per_call=400_000, clock=time.perf_counter):
    """The host's wall time per ``fn()`` in microseconds: the median over ``reps`` loops of
    ``calls`` calls each of the loop's mean, after ``warmup`` calls.

    Before each loop a delay kernel (``delay``, from ``make_delay``) holds ``stream`` for
    ``ns_per_call`` a call, so no call waits for the GPU and what is timed is Python, the
    allocations and the launches; each loop drains before the next (a queue of thousands of
    launches would fill the driver's and block). ``barrier`` (a group's) lines the ranks up
    before each loop when ``fn`` talks to peers. A median of loops, not one mean, so that one
    slow stretch of the host inside one loop does not move the result; on lent hosts stretches
    longer than a whole row still do (notes/perf.md, twelfth session). ``clock``:
    ``time.thread_time`` counts only the CPU time this thread got (there it moved with the wall
    time: the thread kept its core, which ran slower)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        stream.synchronize()
        if barrier is not None:
            barrier()
        delay.launch(1, 1, int(calls * ns_per_call), stream=stream)
        t0 = clock()
        for _ in range(calls):
            fn()
        times.append((clock() - t0) / calls * 1e6)
    stream.synchronize()
    return float(np.median(times))


def _bf16_bits(a):
    """float32 NumPy array -> bf16 bit patterns (uint16), round to nearest even."""
    from numba_ep.kernels.ptx import f32_to_bf16_bits

    return f32_to_bf16_bits(np.asarray(a, dtype=np.float32))


def random_topk(rng, num_tokens, num_topk, num_experts, num_masked=0):
    """``[T, K]`` int64 distinct experts per token (largest of random scores), with
    ``num_masked`` random slots set to -1."""
    scores = rng.random((num_tokens, num_experts))
    idx = np.argsort(-scores, axis=1)[:, :num_topk].astype(np.int64)
    if num_masked and num_tokens:
        flat = rng.choice(num_tokens * num_topk, size=min(num_masked, num_tokens * num_topk),
                          replace=False)
        idx.reshape(-1)[flat] = -1
    return idx


def cuda_torch():
    """The torch module when torch is installed with CUDA, else None (the benches' torch rows
    are left out then)."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _torch_buffer_step(b, stream, x, topk, weights, y, M, E):
    """A Buffer dispatch + combine with torch tensors over the same device memory, or None
    without torch on CUDA."""
    torch = cuda_torch()
    if torch is None:
        return None
    import cupy

    stream.synchronize()
    dev = torch.device("cuda", cupy.cuda.Device().id)
    xt, yt = (torch.as_tensor(a.view(cupy.int16), device=dev).view(torch.bfloat16)
              for a in (x, y))
    topk_t, w_t = torch.as_tensor(topk, device=dev), torch.as_tensor(weights, device=dev)

    def step():
        handle = b.low_latency_dispatch(xt, topk_t, M, E)[2]
        b.low_latency_combine(yt, topk_t, w_t, handle)
    return step


def bench_low_latency(group, num_tokens=128, hidden=7168, num_topk=8, num_experts=288,
                      num_iters=60, warmup=10, use_logfmt=False, seed=0, kernel_times=False):
    """Time low-latency dispatch/combine on this rank of ``group``; returns a dict of us.

    Sets up NVSHMEM (``numba_ep.memory.nvshmem_init``), a symmetric buffer of the size hint
    for ``M = num_tokens`` and a LowLatencyContext, runs ``warmup`` + ``num_iters`` iterations
    per mode, frees the buffer and drops its NVSHMEM reference. Collective.
    """
    import cupy

    from numba_ep.kernels import low_latency as ll
    from numba_ep.launch import get_kernel
    from numba_ep.memory import SymmetricBuffer, nvshmem_finalize, nvshmem_init
    from numba_ep.reference import get_low_latency_rdma_size_hint

    R, rank = group.size, group.rank
    T, H, K, E, M = num_tokens, hidden, num_topk, num_experts, num_tokens
    nbytes = get_low_latency_rdma_size_hint(M, H, R, E)
    # room for a second buffer of the same size: the Buffer whose host time is measured last
    nvshmem_init(group, heap_bytes=2 * nbytes + (512 << 20))
    buf = SymmetricBuffer(nbytes)
    try:
        ctx = ll.LowLatencyContext(buf, rank, R, M, H, E)
        rng = np.random.default_rng(seed + 7919 * rank)
        stream = cupy.cuda.Stream(non_blocking=True)
        delay = get_kernel(make_delay, DELAY_SIG)
        with stream:
            x = cupy.asarray(_bf16_bits(rng.standard_normal((T, H)) * 0.1))
            topk = cupy.asarray(random_topk(rng, T, K, E))
            weights = cupy.asarray(rng.random((T, K), dtype=np.float32))
            # expert outputs [L, R*M, H]: made on the device (1 GB of float32 at the default size)
            cupy.random.seed(seed + rank)
            u = (cupy.random.standard_normal((ctx.num_local_experts, R * M, H), dtype=cupy.float32)
                 * 0.1).view(cupy.uint32)
            y = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)  # round to bf16
            del u
        valid = int((cupy.asnumpy(topk) >= 0).sum())

        def dispatch_combine():
            # one dispatch + combine without hooks (the untimed loops and the graph use it)
            _, _, _, src, lr, _ = ll.low_latency_dispatch(ctx, x, topk, stream=stream)
            ll.low_latency_combine(ctx, y, topk, weights, src, lr, use_logfmt=use_logfmt,
                                   stream=stream)

        def run(timed, hooks, pair_only=False):
            gap = 20_000 if hooks else 0
            events = []
            for i in range(timed):
                if pair_only:
                    # DeepEP's bench: events around the pair, none between its two kernels
                    ev = [cupy.cuda.Event(), cupy.cuda.Event()]
                    ev[0].record(stream)
                    dispatch_combine()
                    ev[1].record(stream)
                    events.append(ev)
                    continue
                ev = [cupy.cuda.Event() for _ in range(7)]
                ev[0].record(stream)
                _, _, _, src, lr, hk = ll.low_latency_dispatch(
                    ctx, x, topk, return_recv_hook=hooks, stream=stream)
                ev[1].record(stream)
                if hooks:
                    delay.launch(1, 1, gap, stream=stream)
                    ev[2].record(stream)
                    hk()
                ev[3].record(stream)
                _, hk = ll.low_latency_combine(ctx, y, topk, weights, src, lr,
                                               use_logfmt=use_logfmt, return_recv_hook=hooks,
                                               stream=stream)
                ev[4].record(stream)
                if hooks:
                    delay.launch(1, 1, gap, stream=stream)
                    ev[5].record(stream)
                    hk()
                ev[6].record(stream)
                events.append(ev)
            return events

        def timed_run(hooks, pair_only=False):
            run(warmup, hooks, pair_only)
            stream.synchronize()
            group.barrier()
            # hold the stream while the host queues everything (~0.3 ms of host time a step)
            delay.launch(1, 1, int(num_iters * 400_000), stream=stream)
            events = run(num_iters, hooks, pair_only)
            stream.synchronize()
            ctx.check()

            def med(a, b):
                return float(np.median([cupy.cuda.get_elapsed_time(e[a], e[b]) * 1e3
                                        for e in events]))
            return med

        def host_us(step, calls=40):
            return host_us_per_call(step, stream, delay, calls, warmup=warmup,
                                    barrier=group.barrier)

        def graph_us(replays=50):
            # One dispatch + combine captured, replayed back to back behind a delay kernel.
            with stream:
                stream.begin_capture()
                dispatch_combine()
                graph = stream.end_capture()
            graph.upload(stream)
            for _ in range(warmup):
                graph.launch(stream=stream)
            stream.synchronize()
            group.barrier()
            delay.launch(1, 1, replays * 50_000, stream=stream)
            t0 = time.perf_counter()
            evs = [cupy.cuda.Event() for _ in range(replays + 1)]
            evs[0].record(stream)
            for e in evs[1:]:
                graph.launch(stream=stream)
                e.record(stream)
            host = (time.perf_counter() - t0) / replays * 1e6
            stream.synchronize()
            ctx.check()
            dev = float(np.median([cupy.cuda.get_elapsed_time(a, b) * 1e3
                                   for a, b in zip(evs, evs[1:])]))
            return dev, host

        def buffer_host_us():
            # A user's eager step: the same calls through numba_ep.Buffer, with the argument
            # checks remembered per key (what a decoding loop gets) and, for comparison, with
            # that memo emptied before every call (the checks in full).
            from numba_ep.buffer import Buffer

            b = Buffer(group, num_rdma_bytes=nbytes, low_latency_mode=True,
                       explicitly_destroy=True)
            try:
                with stream:
                    b.clean_low_latency_buffer(M, H, E)

                    def step(forget):
                        if forget:
                            b._ll_checked.clear()
                        handle = b.low_latency_dispatch(x, topk, M, E)[2]
                        if forget:
                            b._ll_checked.clear()
                        b.low_latency_combine(y, topk, weights, handle)

                    res = {"host_buffer": host_us(lambda: step(False)),
                           "host_buffer_full_checks": host_us(lambda: step(True))}
                torch_step = _torch_buffer_step(b, stream, x, topk, weights, y, M, E)
                if torch_step is not None:
                    import torch

                    # torch's current stream is the same stream (the delay holds it)
                    ts = torch.cuda.ExternalStream(stream.ptr, device=cupy.cuda.Device().id)
                    with torch.cuda.stream(ts):
                        res["host_buffer_torch"] = host_us(torch_step)
                return res
            finally:
                stream.synchronize()
                b.destroy()

        def kernel_us(iters=40):
            # DeepEP's method: each kernel's own duration from the CUDA profiler (CUPTI, through
            # torch.profiler), without the launch gaps that the events above include. A
            # dispatch + combine without hooks is one kernel each, so the loop's kernels
            # alternate dispatch, combine; anything else is reported, not guessed at. The
            # profiler slows every launch on the host, so the steps are queued behind a delay
            # kernel as in timed_run: launched one by one, a rank's kernels would wait for its
            # peer's slower host and count that wait (2xH100, run 7 of the ninth session:
            # 77 us "dispatch kernels" against 34 us by events). Medians; measured last.
            if cuda_torch() is None:
                return {}
            from torch.autograd import DeviceType
            from torch.profiler import ProfilerActivity, profile

            stream.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                group.barrier()
                delay.launch(1, 1, int((warmup + iters) * 1_000_000), stream=stream)
                for _ in range(warmup + iters):
                    dispatch_combine()
                stream.synchronize()
            ctx.check()
            ks = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA
                         and not e.name.startswith(("Memcpy", "Memset"))),
                        key=lambda e: e.time_range.start)[1:]   # the delay kernel first
            names = [e.name for e in ks]
            if (len(ks) != 2 * (warmup + iters) or len(set(names[0::2])) != 1
                    or len(set(names[1::2])) != 1 or names[0] == names[1]):
                return {"kernel_note": f"{len(ks)} kernels for {warmup + iters} steps: "
                                       f"{sorted(set(n[:60] for n in names))}"}
            dur = [e.time_range.end - e.time_range.start for e in ks[2 * warmup:]]
            kd, kc = float(np.median(dur[0::2])), float(np.median(dur[1::2]))
            return {"kernel_dispatch": kd, "kernel_combine": kc,
                    "kernel_dispatch+combine": float(np.median(np.add(dur[0::2], dur[1::2])))}

        out = {}
        med = timed_run(False)
        out["dispatch"] = med(0, 1)
        out["combine"] = med(3, 4)
        out["dispatch+combine"] = med(0, 4)
        out["pair_dispatch+combine"] = timed_run(False, pair_only=True)(0, 1)
        out["host_dispatch+combine"] = host_us(dispatch_combine)
        ctx.check()
        ctx.fuse = False    # the same calls with each phase its own launch (as hooks run)
        med = timed_run(False)
        out["split_dispatch"] = med(0, 1)
        out["split_combine"] = med(3, 4)
        out["split_dispatch+combine"] = med(0, 4)
        out["split_host_dispatch+combine"] = host_us(dispatch_combine)
        ctx.check()
        ctx.fuse = True
        out["graph_dispatch+combine"], out["host_graph_replay"] = graph_us()
        out.update(buffer_host_us())
        med = timed_run(True)
        out["dispatch_send"] = med(0, 1)
        out["dispatch_recv"] = med(2, 3)
        out["combine_send"] = med(3, 4)
        out["combine_recv"] = med(5, 6)
        if kernel_times:
            out.update(kernel_us())
        from numba_ep import reference

        fp8_bytes = H + H // 128 * 4 + 16
        comb_bytes = reference.logfmt10_bytes_per_token(H) if use_logfmt else 2 * H
        out["dispatch_GBps"] = valid * fp8_bytes / (out["dispatch"] * 1e3)
        out["combine_GBps"] = valid * comb_bytes / (out["combine"] * 1e3)
        out["rank"] = rank
        out["device"] = cupy.cuda.runtime.getDeviceProperties(
            cupy.cuda.Device().id)["name"].decode()
        return out
    finally:
        cupy.cuda.runtime.deviceSynchronize()
        buf.close()
        nvshmem_finalize()


def main(argv=None):
    """``python -m numba_ep.bench_ll [--ranks N] [--tokens T] [--hidden H] [--topk K]
    [--experts E] [--logfmt]``: spawn the ranks, print each rank's numbers."""
    import argparse

    from numba_ep.group import spawn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=None, help="default: all visible GPUs")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=288)
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--logfmt", action="store_true")
    p.add_argument("--kernel-times", action="store_true")
    a = p.parse_args(argv)
    ranks = a.ranks
    if ranks is None:
        import cupy

        ranks = cupy.cuda.runtime.getDeviceCount()
    results = spawn(bench_low_latency, ranks, num_tokens=a.tokens, hidden=a.hidden,
                    num_topk=a.topk, num_experts=a.experts, num_iters=a.iters,
                    use_logfmt=a.logfmt, kernel_times=a.kernel_times, timeout=600)
    for r in results:
        print(", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items()))
    return results


if __name__ == "__main__":
    main()
