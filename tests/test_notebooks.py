"""The notebooks run top to bottom (on the CPU backend here) and say what they claim: executed
with nbclient when it and ipykernel are installed (pip install numba_ep[notebooks]), skipped
otherwise."""
import os
import re
import shutil

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


def test_dispatch_combine_tour(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("NUMBA_EP_BACKEND", "cpu")
    name = "01-dispatch-combine-tour.ipynb"
    shutil.copy(os.path.join(NOTEBOOKS, name), tmp_path / name)  # it writes tour_worker.py
    nb = nbformat.read(tmp_path / name, as_version=4)
    for cell in nb.cells:  # the stored outputs must not count
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.outputs)
    assert "ran on the cpu backend" in text
    assert "[True, True]" in text, "combine of the received rows is x times its copies"
    assert "internode combine is x times its copies: [True, True, True, True]" in text
    assert "2 nodes of 2 ranks" in text
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "this section needs torch" in text
    else:
        assert "x.grad is g times the copies: [True, True]" in text
    diffs = [float(v) for v in re.findall(r"calc_diff ([0-9.e+-]+)", text)]
    assert len(diffs) == 2 and all(d < 1e-3 for d in diffs), diffs
