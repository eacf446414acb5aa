"""Small kernels shared by several test files (CPU compile tests and GPU tests)."""
import numba_ep  # noqa: F401


def make_axpy(alpha):
    """y[i] = alpha * x[i] + y[i] on float32 arrays given as addresses."""
    from numba import cuda

    from numba_ep.kernels import ptx

    def axpy(y_addr, x_addr, n):
        i = cuda.grid(1)
        if i < n:
            y = ptx.ptr_f32(y_addr)
            y[i] = alpha * ptx.ptr_f32(x_addr)[i] + y[i]

    return axpy


AXPY_SIG = "void(uint64, uint64, int32)"


def raises(exc, call, *fragments):
    """``call()`` must raise ``exc`` whose message contains every fragment; returns the error."""
    import pytest

    with pytest.raises(exc) as e:
        call()
    for f in fragments:
        assert f in str(e.value), f"{f!r} not in {str(e.value)!r}"
    return e.value


def cupy_view(shape, dtype, strides=None, ptr=1 << 20):
    """A CuPy array header over a fake device address: metadata only, needs no GPU (CuPy builds
    it without asking the driver). For checks that read shapes, dtypes, strides, addresses."""
    import cupy
    from cupy.cuda import memory

    mem = memory.UnownedMemory(ptr, 1 << 30, None, device_id=0)
    return cupy.ndarray(shape, dtype=dtype, memptr=memory.MemoryPointer(mem, 0), strides=strides)


class KernelCalled(Exception):
    """Raised by a stubbed kernel entry point (``stub_kernels``) with the entry point's name."""


def stub_kernels(monkeypatch, module, names):
    """Replace ``module.<name>`` for each name by a stub that records the name in the returned
    list and raises KernelCalled(name): validation tests then see whether (and which) kernel
    work a call reached. Returns ``(calls, make)``; ``make(name)`` builds one more stub."""
    calls = []

    def make(name):
        def boom(*args, **kwargs):
            calls.append(name)
            raise KernelCalled(name)
        return boom

    for name in names:
        monkeypatch.setattr(module, name, make(name))
    return calls, make
