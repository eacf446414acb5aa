"""numba_ep: DeepEP's expert-parallel dispatch and combine, rebuilt with numba-cuda kernels.

Public names (imported lazily, so ``import numba_ep`` stays cheap and works without a GPU):

- ``Buffer``, ``Config``, ``EventOverlap``: DeepEP V1's API (see ``numba_ep.buffer``).
- ``topk_idx_t``: the NumPy dtype of expert indices (int64, as DeepEP's default build).
- ``Group``, ``spawn``: process groups (``numba_ep.group``).
- ``reference``: the NumPy specification of every operation.
- ``autograd``: differentiable dispatch and combine for PyTorch (needs torch).
"""
import numpy as _np

# numba-cuda 0.30.4 registers np.row_stack, which NumPy 2.5 removed; without this shim every CUDA
# compile fails with AttributeError. It must run before anything imports numba.cuda, hence here.
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack

__version__ = "0.1.0"

topk_idx_t = _np.dtype(_np.int64)

_LAZY = {
    "Buffer": ("numba_ep.buffer", "Buffer"),
    "Config": ("numba_ep.config", "Config"),
    "EventOverlap": ("numba_ep.interop", "EventOverlap"),
    "Group": ("numba_ep.group", "Group"),
    "spawn": ("numba_ep.group", "spawn"),
    "TimeoutError": ("numba_ep.errors", "CommTimeoutError"),
    "CommTimeoutError": ("numba_ep.errors", "CommTimeoutError"),
}


#: submodules reachable as ``numba_ep.<name>`` after a plain ``import numba_ep``
_LAZY_MODULES = ("reference", "group", "autograd")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(mod), attr)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"numba_ep.{name}")
    raise AttributeError(f"module 'numba_ep' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_LAZY_MODULES))
