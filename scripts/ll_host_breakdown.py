"""Where the host time of an eager low-latency step goes, measured piece by piece on a GPU.

cProfile inflates small calls several times over (see ll_buffer_profile.py), so this times each
ingredient of a step on its own, in a loop, while a delay kernel holds the stream (nothing waits
for the GPU), and prints microseconds per call, the median of several loops:

- the CUDA/CuPy primitives a step uses: ``cupy.empty``, a launch through ``launch.py``, the
  driver's ``cuLaunchKernel`` alone (cuda.bindings and ctypes), stream lookups and contexts;
- whole steps (dispatch + combine) through the kernel layer and through ``Buffer``, and the same
  with every launch reduced to packing its arguments (what is left is Python and allocation).

    python scripts/ll_host_breakdown.py [--ranks 1] [--loops 200]
"""
import argparse
import ctypes
import gc
import time

import numpy as np

import numba_ep  # noqa: F401  (NumPy shim first)

NARGS = 15
SIG = "void(" + ", ".join(["uint64"] * NARGS) + ")"


def make_nop():
    def nop(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14):
        pass

    return nop


def drv(t, name, call):
    """Time a raw driver call, once checked to succeed (a failing call is fast, not useful)."""
    (err,) = call()
    if int(err) != 0:
        raise RuntimeError(f"{name}: {err!r}")
    t(name, call)


def breakdown(group, loops=200, T=128, H=7168, K=8, E=288):
    import cupy
    from cuda.bindings import driver

    from numba_ep import launch as launch_mod
    from numba_ep.bench_ll import DELAY_SIG, host_us_per_call, make_delay, random_topk
    from numba_ep.buffer import Buffer
    from numba_ep.kernels import low_latency as ll
    from numba_ep.launch import get_kernel, stream_handle

    R, M = group.size, T
    L = E // R
    b = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, H, R, E),
               low_latency_mode=True, explicitly_destroy=True)
    rng = np.random.default_rng(group.rank)
    stream = cupy.cuda.Stream(non_blocking=True)
    delay = get_kernel(make_delay, DELAY_SIG)
    nop = get_kernel(make_nop, SIG)
    rows = {}
    try:
        with stream:
            x = cupy.zeros((T, H), cupy.uint16)
            topk = cupy.asarray(random_topk(rng, T, K, E))
            w = cupy.ones((T, K), cupy.float32)
            y = cupy.zeros((L, R * M, H), cupy.uint16)
            b.clean_low_latency_buffer(M, H, E)
            ctx = b._ll_context(M, H, E)
            h = stream.ptr

            def t(name, fn, n=loops):
                rows[name] = host_us_per_call(fn, stream, delay, n, reps=7, warmup=3)

            def t2(name, fn, n):
                # the whole steps twice: wall time, and the CPU time this thread got
                t(name, fn, n)
                rows[f"  {name}, thread CPU time"] = host_us_per_call(
                    fn, stream, delay, n, reps=7, warmup=3, clock=time.thread_time)

            # -- primitives
            t("cupy.empty small [L] int32", lambda: cupy.empty((L,), cupy.int32))
            t("cupy.empty big [L, R*M, H] uint8", lambda: cupy.empty((L, R * M, H), cupy.uint8))
            t("cupy.ndarray view on a pointer", lambda: cupy.ndarray(
                (L, R * M), cupy.int32, memptr=y.data))
            args = list(range(1, NARGS + 1))
            t(f"launch.py launch, {NARGS} uint64 args", lambda: nop.launch(1, 32, *args,
                                                                          stream=stream))
            f = nop.function()
            pp = nop._ptrs_addr
            t("cuda.bindings cuLaunchKernel alone", lambda: driver.cuLaunchKernel(
                f, 1, 1, 1, 32, 1, 1, 0, h, pp, 0))
            libcuda = ctypes.CDLL("libcuda.so.1")
            cl = libcuda.cuLaunchKernel
            cl.restype = ctypes.c_int
            cl.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 6 + [
                ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            fptr = int(f)
            t("ctypes cuLaunchKernel alone", lambda: cl(fptr, 1, 1, 1, 32, 1, 1, 0, h, pp, None))
            # The fused low-latency kernels go out as cooperative launches (every block
            # resident at once): what does that cost the host over a plain launch?
            t("launch.py launch, cooperative", lambda: nop.launch(1, 32, *args, stream=stream,
                                                                  cooperative=True))
            drv(t, "cuda.bindings cuLaunchCooperativeKernel alone",
                lambda: driver.cuLaunchCooperativeKernel(f, 1, 1, 1, 32, 1, 1, 0, h, pp))
            cfg = driver.CUlaunchConfig()
            cfg.gridDimX = cfg.gridDimY = cfg.gridDimZ = 1
            cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = 32, 1, 1
            cfg.sharedMemBytes = 0
            cfg.hStream = driver.CUstream(h)
            attr = driver.CUlaunchAttribute()
            attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE
            attr.value.cooperative = 1
            cfg.attrs = [attr]
            cfg.numAttrs = 1
            drv(t, "cuda.bindings cuLaunchKernelEx, cooperative attribute",
                lambda: driver.cuLaunchKernelEx(cfg, f, pp, 0))
            cfg.numAttrs = 0
            drv(t, "cuda.bindings cuLaunchKernelEx, no attribute",
                lambda: driver.cuLaunchKernelEx(cfg, f, pp, 0))
            t("struct pack_into of the args", lambda: nop._struct.pack_into(nop._params, 0,
                                                                             *args))
            t("stream_handle(None)", lambda: stream_handle(None))
            t("stream_handle(stream)", lambda: stream_handle(stream))
            t("cupy.cuda.runtime.getDevice()", cupy.cuda.runtime.getDevice)

            def ctx_enter():
                with stream:
                    pass
            t("with stream: (enter + exit)", ctx_enter)
            t("ctx._prepare() + ctx.check()", lambda: (ctx._prepare(), ctx.check()))

            # -- the Buffer's own pieces (CuPy caller)
            from numba_ep.buffer import _LowLatencyHandle
            from numba_ep.interop import array_key, device_view, to_caller

            recv_x = cupy.empty((L, R * M, H), cupy.uint8)
            d_args = (x, topk, M, E, None, None, True, False, False, False, False)
            t("Buffer._check_usable", lambda: b._check_usable("x"))
            t("Buffer._ll_prologue (memo hit)", lambda: b._ll_prologue(
                "low_latency_dispatch", b._validate_ll_dispatch, d_args))
            t("array_key(x)", lambda: array_key(x))
            t("Buffer._ll_stream(False)", lambda: b._ll_stream(False))

            def guard():
                with b._guard():
                    pass
            t("with Buffer._guard(): (enter + exit)", guard)
            t("device_view(cupy x)", lambda: device_view(x, "x"))
            t("to_caller(cupy, False, dtype=uint8)", lambda: to_caller(recv_x, False,
                                                                       dtype=recv_x.dtype))
            t("_LowLatencyHandle((...))", lambda: _LowLatencyHandle((x, x, M, H, E)))
            t("Buffer._ll_event(no async)", lambda: b._ll_event(stream, False, False, ()))
            t("scales.transpose(0, 2, 1)", lambda: recv_x.transpose(0, 2, 1))
            try:
                import torch
            except ImportError:
                torch = None
            if torch is not None:
                dev = torch.device("cuda", cupy.cuda.Device().id)
                xt = torch.zeros((T, H), dtype=torch.bfloat16, device=dev)
                t("torch.empty [L, R*M, H] uint8", lambda: torch.empty(
                    (L, R * M, H), dtype=torch.uint8, device=dev))
                t("device_view(torch bf16 x)", lambda: device_view(xt, "x"))
                t("  the DLPack route: cupy.from_dlpack(x.view(int16))",
                  lambda: cupy.from_dlpack(xt.view(torch.int16)).view(cupy.uint16))
                t("to_caller(cupy -> torch uint8)", lambda: to_caller(recv_x, True))
                t("to_caller(cupy -> torch float8)", lambda: to_caller(
                    recv_x, True, torch_dtype=torch.float8_e4m3fn))
                t("  torch.as_tensor(cupy uint8) (CUDA array interface)",
                  lambda: torch.as_tensor(recv_x, device=dev))
                t("torch.cuda.current_stream()", lambda: torch.cuda.current_stream(dev))

            # -- whole steps
            def kernel_step():
                _, _, _, src, lr, _ = ll.low_latency_dispatch(ctx, x, topk, stream=stream,
                                                              checked=True)
                ll.low_latency_combine(ctx, y, topk, w, src, lr, stream=stream, checked=True)

            def buffer_step():
                handle = b.low_latency_dispatch(x, topk, M, E)[2]
                b.low_latency_combine(y, topk, w, handle)

            n_steps = max(20, loops // 4)
            t2("step, kernel layer (checked=True)", kernel_step, n_steps)
            t2("step, Buffer", buffer_step, n_steps)
            if torch is not None:
                topk_t = torch.as_tensor(topk, device=dev)
                w_t = torch.as_tensor(w, device=dev)
                y_t = torch.zeros((L, R * M, H), dtype=torch.bfloat16, device=dev)
                ts = torch.cuda.ExternalStream(stream.ptr, device=dev)

                def torch_step():
                    handle = b.low_latency_dispatch(xt, topk_t, M, E)[2]
                    b.low_latency_combine(y_t, topk_t, w_t, handle)

                with torch.cuda.stream(ts):
                    t2("step, Buffer, torch tensors", torch_step, n_steps)
            real = launch_mod.CompiledKernel.launch

            def pack_only(self, grid, block, *a, stream=None, shmem=0, cooperative=None):
                self._struct.pack_into(self._params, 0, *a)

            launch_mod.CompiledKernel.launch = pack_only
            try:
                t("step, kernel layer, launches only packed", kernel_step, n_steps)
                t("step, Buffer, launches only packed", buffer_step, n_steps)
            finally:
                launch_mod.CompiledKernel.launch = real
            # the same steps once more, last: a row that moved is the host, not the code
            t2("step, kernel layer (checked=True), again", kernel_step, n_steps)
            t2("step, Buffer, again", buffer_step, n_steps)
            gc.disable()
            try:
                t("step, Buffer, Python's collector off", buffer_step, n_steps)
            finally:
                gc.enable()
            if group.size == 1:
                # One rank on an otherwise idle GPU: every block of a grid that fits is resident
                # even without the cooperative guarantee, so this runs correctly (not with peers,
                # where nothing would guarantee it).
                def plain(self, grid, block, *a, stream=None, shmem=0, cooperative=None):
                    real(self, grid, block, *a, stream=stream, shmem=shmem, cooperative=False)

                launch_mod.CompiledKernel.launch = plain
                try:
                    t("step, kernel layer, fused kernels launched non-cooperatively",
                      kernel_step, n_steps)
                finally:
                    launch_mod.CompiledKernel.launch = real
            # the stream's half index moved with the pack-only steps on this rank alone: reset
            b.clean_low_latency_buffer(M, H, E)
            stream.synchronize()
        return rows
    finally:
        stream.synchronize()
        b.destroy()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--loops", type=int, default=200)
    a = p.parse_args()
    from numba_ep.group import spawn

    out = spawn(breakdown, a.ranks, loops=a.loops, timeout=300)
    width = max(len(k) for k in out[0])
    # which numba_ep ran: an A/B of two trees on one machine relies on PYTHONPATH (spawned
    # ranks inherit this process's sys.path)
    print(f"host us per call, rank 0 of {a.ranks} ({numba_ep.__file__})")
    for k, v in out[0].items():
        print(f"  {k:<{width}}  {v:8.2f}")


if __name__ == "__main__":
    main()
