"""numba_ep.memory on a CPU: layout, validation, and clear errors (never hangs) without a GPU.

The GPU behaviour (IPC exchange, NVSHMEM symmetric buffers) is tested in tests/gpu/test_memory_gpu.py.
"""
import os
import sys

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep import memory
from numba_ep.errors import NumbaEPError
from numba_ep.group import spawn
from numba_ep.memory import (IpcBuffer, SymmetricBuffer, ipc_layout, nvshmem_environment,
                             nvshmem_finalize, nvshmem_init, check_gpu_sharing)


def _unset(monkeypatch, *names):
    """Unset env vars so that monkeypatch restores their original state afterwards."""
    for k in names:
        monkeypatch.setenv(k, "placeholder")
        monkeypatch.delenv(k)


def _has_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


no_gpu_only = pytest.mark.skipif(_has_gpu(), reason="checks the error raised when no GPU is usable")


def _w_ipc_no_gpu(group):
    try:
        IpcBuffer(group, 1000)
    except NumbaEPError as e:
        return str(e)
    return "no error"


def _w_nvshmem_no_gpu(group):
    try:
        nvshmem_init(group)
    except NumbaEPError as e:
        return str(e)
    return "no error"


def _w_nvshmem_split(group, num_gpus):
    """nvshmem_init with rank r on GPU r % num_gpus, NVSHMEM and CUDA faked: what stops it."""
    import types

    def reached(*args, **kwargs):
        raise RuntimeError("reached nvshmem.core.get_unique_id")

    class FakeDevice:
        def __init__(self, d):
            self.uuid = f"GPU-{d}"

        def set_current(self):
            pass

    nv = types.ModuleType("nvshmem.core")
    nv.get_unique_id = nv.init = reached
    pkg = types.ModuleType("nvshmem")
    pkg.core = nv
    cc = types.ModuleType("cuda.core")
    cc.Device = FakeDevice
    sys.modules.update({"nvshmem": pkg, "nvshmem.core": nv, "cuda.core": cc})
    memory.current_device = lambda g: g.rank % num_gpus
    try:
        nvshmem_init(group)
    except NumbaEPError as e:
        return str(e)
    return "no error"


def test_ipc_layout():
    lay = ipc_layout(1000)
    assert lay == (1024, 4096, 8192)
    assert (lay.nbytes, lay.signal_offset, lay.alloc_bytes) == (1024, 4096, 8192)
    assert ipc_layout(0) == (0, 0, 4096)
    assert ipc_layout(4096) == (4096, 4096, 8192)
    assert ipc_layout(4097) == (4224, 8192, 12288)
    for n in (1, 127, 128, 129, 5000, 1 << 30):
        lay = ipc_layout(n)
        assert lay.nbytes % 128 == 0 and lay.nbytes >= n
        assert lay.signal_offset % 4096 == 0 and lay.signal_offset >= lay.nbytes
        assert lay.alloc_bytes == lay.signal_offset + memory.SIGNAL_REGION_BYTES


def test_ipc_buffer_validates_before_touching_cuda():
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        IpcBuffer(None, -1)
    with pytest.raises(TypeError, match="nbytes must be an int"):
        IpcBuffer(None, 1.5)
    with pytest.raises(TypeError, match="nbytes must be an int"):
        IpcBuffer(None, True)
    with pytest.raises(TypeError, match="expected a numba_ep Group"):
        IpcBuffer("world", 128)


@no_gpu_only
def test_ipc_buffer_without_gpu_single_rank():
    with pytest.raises(NumbaEPError, match=r"(?s)IpcBuffer failed on rank\(s\) 0.*CUDA"):
        IpcBuffer(None, 1024)


@no_gpu_only
def test_ipc_buffer_without_gpu_all_ranks_raise():
    """Both ranks get the same error instead of one waiting for the other."""
    res = spawn(_w_ipc_no_gpu, 2, group_timeout=20, timeout=60)
    for msg in res:
        assert "IpcBuffer failed on rank(s) 0, 1" in msg, msg


def test_symmetric_buffer_needs_init():
    with pytest.raises(NumbaEPError, match="nvshmem_init"):
        SymmetricBuffer(1024)
    with pytest.raises(ValueError):
        SymmetricBuffer(-5)


def test_nvshmem_finalize_without_init_is_noop():
    assert memory.nvshmem_runtime() is None
    assert nvshmem_finalize() is False


@no_gpu_only
def test_nvshmem_init_without_gpu(monkeypatch):
    _unset(monkeypatch, "NVSHMEM_DISABLE_NVLS", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")
    with pytest.raises(NumbaEPError, match=r"nvshmem_init failed on rank\(s\) 0"):
        nvshmem_init(None)
    assert memory.nvshmem_runtime() is None
    # the environment was prepared before the attempt
    assert os.environ["NVSHMEM_DISABLE_NVLS"] == "1"
    assert os.environ["NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"] == "lo"


@no_gpu_only
def test_nvshmem_init_without_gpu_two_ranks():
    res = spawn(_w_nvshmem_no_gpu, 2, group_timeout=20, timeout=60)
    for msg in res:
        assert "nvshmem_init failed on rank(s) 0, 1" in msg, msg


def test_nvshmem_init_refuses_an_uneven_split():
    # 3 ranks on 2 GPUs: every rank refuses before NVSHMEM starts (its init would abort or hang)
    for msg in spawn(_w_nvshmem_split, 3, 2, group_timeout=20, timeout=60):
        assert "same number of ranks on every GPU, got ranks 0, 2 on GPU GPU-0" in msg, msg
    # 4 ranks on 2 GPUs, or one per GPU: the check lets NVSHMEM start (here, its fake)
    for n, gpus in ((4, 2), (2, 2)):
        for msg in spawn(_w_nvshmem_split, n, gpus, group_timeout=20, timeout=60):
            assert "reached nvshmem.core.get_unique_id" in msg, msg


def test_check_gpu_sharing():
    a0, a1, b0 = ("hostA/boot", "GPU-0"), ("hostA/boot", "GPU-1"), ("hostB/boot", "GPU-0")
    # one rank per GPU (the same uuid string on two hosts is two GPUs), or as many on each
    check_gpu_sharing([a0, a1, b0])
    check_gpu_sharing([a0])
    check_gpu_sharing([a0, a1, a0, a1, a1, a0])
    # 3 ranks on 2 GPUs: NVSHMEM's init aborts or hangs, so refuse it first, naming the split
    with pytest.raises(NumbaEPError, match=r"same number of ranks on every GPU, got ranks 0, 2 "
                                           r"on GPU GPU-0 of hostA; rank 1 on GPU GPU-1 of hostA"):
        check_gpu_sharing([a0, a1, a0])


def test_nvshmem_environment(monkeypatch):
    _unset(monkeypatch, "NVSHMEM_DISABLE_NVLS", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME",
           "NVSHMEM_DISABLE_LOCAL_ONLY_PROXY")
    assert nvshmem_environment(all_local=False) == {"NVSHMEM_DISABLE_NVLS": "1"}
    assert "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME" not in os.environ
    assert "NVSHMEM_DISABLE_LOCAL_ONLY_PROXY" not in os.environ   # other hosts: NICs need it
    monkeypatch.setenv("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME", "eth0")
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "1")
    monkeypatch.setenv("NVSHMEM_DISABLE_LOCAL_ONLY_PROXY", "0")
    assert nvshmem_environment(all_local=True) == {}
    assert os.environ["NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME"] == "eth0"  # user's choice is kept
    assert os.environ["NVSHMEM_DISABLE_LOCAL_ONLY_PROXY"] == "0"
    monkeypatch.delenv("NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME")
    monkeypatch.delenv("NVSHMEM_DISABLE_LOCAL_ONLY_PROXY")
    assert nvshmem_environment(all_local=True) == {"NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
                                                   "NVSHMEM_DISABLE_LOCAL_ONLY_PROXY": "1"}
