"""scripts/kernel_diff.py's comparisons, on a small kernel compiled here (no GPU): normalized PTX
ignores register numbering, the memory/sync list catches a changed access, and the SASS hash
tells identical programs from different ones."""
import os
import sys

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep import launch
from numba_ep.kernels import ptx as P

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
import kernel_diff as KD  # noqa: E402
from kernels_for_tests import make_axpy  # noqa: E402

pytestmark = pytest.mark.skipif(P.SIMULATOR, reason="compiles for sm_90 (not the simulator)")
SIG = "void(uint64, uint64, int32)"


def _side(alpha):
    from numba import cuda

    text, _ = cuda.compile(make_axpy(alpha), launch.parse_signature(SIG), device=False,
                           cc=(9, 0), output="ptx", abi="numba")
    cubin, _ = launch.compile_cubin(make_axpy(alpha), launch.parse_signature(SIG), (9, 0))
    return {"ptx": KD.normalize_ptx(text), "sass": KD.text_sections(cubin)}


def test_same_kernel_compares_equal_and_another_does_not():
    a, b, c = _side(2.0), _side(2.0), _side(3.0)
    rows, one_side = KD.compare({"axpy": a}, {"axpy": b})
    assert rows == [("axpy", 0, True, True)] and one_side == []
    assert a["sass"] and all(":" in h for h in a["sass"])
    (key, changed, same_ops, same_sass), = KD.compare({"axpy": a}, {"axpy": c})[0]
    assert changed > 0 and same_ops and not same_sass   # another constant, same accesses
    _, one_side = KD.compare({"axpy": a}, {"other": a})
    assert one_side == ["axpy", "other"]


def test_normalization_and_memory_ops():
    old = ["\tld.global.u32 \t%r12, [%rd3];", "\tadd.s32 \t%r13, %r12, 1;",
           "$L__BB0_2:", "\tst.global.u32 \t[%rd3], %r13;", "\t// a comment", "\tbar.sync \t0;"]
    renumbered = [ln.replace("%r12", "%r40").replace("%r13", "%r41").replace("BB0_2", "BB0_7")
                  for ln in old]
    assert KD.normalize_ptx("\n".join(old)) == KD.normalize_ptx("\n".join(renumbered))
    ops = KD.mem_sync_ops(KD.normalize_ptx("\n".join(old)))
    assert ops == ["ld.global.u32 \t%r, [%rd];", "st.global.u32 \t[%rd], %r;", "bar.sync \t0;"]
    swapped = [old[3], old[1], old[2], old[0], old[5]]          # the store before the load
    assert KD.mem_sync_ops(KD.normalize_ptx("\n".join(swapped))) != ops
