"""Compile the kernels a GPU test's ranks will launch, in parallel processes, into the disk cache
before the ranks start (so two ranks never compile the same kernel and all start together)."""
import importlib
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))


def compile_spec(spec):
    """Compile one ``(factory, signature, get_kernel keywords)`` kernel into the disk cache for
    GPU 0's compute capability (not loaded: NVSHMEM kernels need no NVSHMEM runtime here);
    returns the factory's name."""
    from cuda.core import Device

    from numba_ep.launch import compile_to_cache

    dev = Device(0)
    dev.set_current()  # numba asks the current device while compiling some kernels
    factory, sig, kwargs = spec
    compile_to_cache(factory, sig, cc=tuple(dev.compute_capability), **kwargs)
    return factory.__name__


def unique_specs(specs):
    """``specs`` without repeats (same factory, signature and keywords), in order."""
    unique = {}
    for f, sig, kw in specs:
        unique.setdefault((f.__name__, sig, tuple(sorted(kw.items()))), (f, sig, kw))
    return list(unique.values())


def compile_for(worker_module, rank_counts):
    """Compile ``worker_module.kernel_specs(n)`` for every n in ``rank_counts``, in parallel
    processes; returns the factories' names, in order."""
    sys.path.insert(0, HERE)
    w = importlib.import_module(worker_module)
    specs = []
    for n in rank_counts:
        specs += w.kernel_specs(n)
    specs = unique_specs(specs)
    workers = max(1, min(16, (os.cpu_count() or 2) // 2, len(specs)))
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(compile_spec, specs))
