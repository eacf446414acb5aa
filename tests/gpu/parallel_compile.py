"""Compile the kernels a GPU test's ranks will launch, in parallel processes, into the disk cache
before the ranks start (so two ranks never compile the same kernel and all start together)."""
import importlib
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))


def compile_for(worker_module, rank_counts):
    """Compile ``worker_module.kernel_specs(n)`` for every n in ``rank_counts`` through
    ``worker_module.compile_spec``; returns what compile_spec returned, in order."""
    sys.path.insert(0, HERE)
    w = importlib.import_module(worker_module)
    specs = []
    for n in rank_counts:
        specs += w.kernel_specs(n)
    workers = max(1, min(16, (os.cpu_count() or 2) // 2, len(specs)))
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(w.compile_spec, specs))
