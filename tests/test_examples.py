"""The examples run: examples/moe_layer.py (a PyTorch MoE layer over numba_ep.Buffer) on the CPU
backend at 1 and 3 ranks, each rank matching the dense layer. Needs torch (skips without it)."""
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("nranks", [1, 3])
def test_moe_layer_example(monkeypatch, capsys, nranks):
    pytest.importorskip("torch")
    monkeypatch.setenv("NUMBA_EP_BACKEND", "cpu")
    monkeypatch.syspath_prepend(EXAMPLES)
    import moe_layer

    assert moe_layer.main(["--ranks", str(nranks)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == nranks and all(line.endswith(" ok") for line in lines), lines
    sys.modules.pop("moe_layer", None)
