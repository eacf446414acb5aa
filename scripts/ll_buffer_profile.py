"""Where the host time of an eager low-latency step through ``numba_ep.Buffer`` goes, on GPUs.

Spawns one rank per GPU (or ``--ranks``); every rank runs dispatch + combine at DeepEP's decoding
shape (128 tokens x 7168, top-8 of 288 experts) behind a delay kernel, so nothing waits for the
GPU, and rank 0 prints a cProfile of those steps sorted by own time.

    python scripts/ll_buffer_profile.py [--ranks 2] [--steps 300]
"""
import argparse
import cProfile
import io
import pstats
import time

import numpy as np

import numba_ep  # noqa: F401  (NumPy shim first)


def profile_steps(group, steps=300, T=128, H=7168, K=8, E=288):
    import cupy

    from numba_ep.bench_ll import DELAY_SIG, make_delay, random_topk
    from numba_ep.buffer import Buffer
    from numba_ep.launch import get_kernel

    R, M = group.size, T
    b = Buffer(group, num_rdma_bytes=Buffer.get_low_latency_rdma_size_hint(M, H, R, E),
               low_latency_mode=True, explicitly_destroy=True)
    rng = np.random.default_rng(group.rank)
    stream = cupy.cuda.Stream(non_blocking=True)
    delay = get_kernel(make_delay, DELAY_SIG)
    try:
        with stream:
            x = cupy.zeros((T, H), cupy.uint16)
            topk = cupy.asarray(random_topk(rng, T, K, E))
            w = cupy.ones((T, K), cupy.float32)
            y = cupy.zeros((E // R, R * M, H), cupy.uint16)
            b.clean_low_latency_buffer(M, H, E)

            def step():
                handle = b.low_latency_dispatch(x, topk, M, E)[2]
                b.low_latency_combine(y, topk, w, handle)

            for _ in range(20):
                step()
            stream.synchronize()
            group.barrier()
            delay.launch(1, 1, steps * 600_000, stream=stream)
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            for _ in range(steps):
                step()
            prof.disable()
            per_step = (time.perf_counter() - t0) / steps * 1e6
            stream.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        return f"rank {group.rank}: {per_step:.1f} us per step under cProfile\n{text.getvalue()}"
    finally:
        stream.synchronize()
        b.destroy()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=None)
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args()
    from numba_ep.group import gpu_count, spawn

    out = spawn(profile_steps, a.ranks or gpu_count(), steps=a.steps, timeout=300)
    print(out[0])


if __name__ == "__main__":
    main()
