"""numba_ep's kernels for machines without a GPU: the same entry points as ``numba_ep.kernels``,
answered by the NumPy reference (``numba_ep.reference``) and the group's collectives.

``numba_ep.Buffer`` uses these when no CUDA GPU is visible (or with ``NUMBA_EP_BACKEND=cpu``), so
the whole Buffer API (validation, handles, cached mode, FP8, biases, ``num_worst_tokens``,
low-latency mode, and internode mode) runs on a laptop with NumPy
arrays or torch CPU tensors: slowly, and exactly as the reference, which the GPU kernels are tested
against. Each call all-gathers what the reference needs from every rank (``Group.allgather_bytes``),
computes every rank's result and keeps its own, so the cost grows with the square of the rank
count: fine for development and teaching, not for throughput.
"""
