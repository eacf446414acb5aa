"""The examples run: examples/moe_layer.py (a PyTorch MoE layer over numba_ep.Buffer, forward
and backward through numba_ep.autograd) on the CPU backend at 1 and 3 ranks, and at 4 ranks as 2
nodes of 2 (internode mode), each rank's output and gradients matching the dense layer's. Needs
torch (skips without it)."""
import os
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("nranks,gpus_per_node", [(1, None), (3, None), (4, 2)])
def test_moe_layer_example(monkeypatch, capsys, nranks, gpus_per_node):
    pytest.importorskip("torch")
    monkeypatch.setenv("NUMBA_EP_BACKEND", "cpu")
    monkeypatch.delenv("NUMBA_EP_GPUS_PER_NODE", raising=False)
    monkeypatch.syspath_prepend(EXAMPLES)
    import moe_layer

    argv = ["--ranks", str(nranks)]
    if gpus_per_node:
        argv += ["--gpus-per-node", str(gpus_per_node)]
    try:
        assert moe_layer.main(argv) == 0
    finally:
        os.environ.pop("NUMBA_EP_GPUS_PER_NODE", None)   # main() set it for its ranks
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == nranks and all(line.endswith(" ok") for line in lines), lines
    assert all(("2 nodes" in line) == bool(gpus_per_node) for line in lines), lines
    sys.modules.pop("moe_layer", None)


def test_moe_layer_example_under_mpirun():
    """``mpirun -n 3 python examples/moe_layer.py --mpi`` on the CPU backend: the group is MPI's,
    and every rank's output and gradients match the dense layer. Skips without mpi4py/mpirun or
    torch."""
    pytest.importorskip("torch")
    from mpi_run import mpi_launch

    out = mpi_launch(3, [os.path.join(EXAMPLES, "moe_layer.py"), "--mpi"],
                     env={"NUMBA_EP_BACKEND": "cpu"}).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("rank ")]
    assert len(lines) == 3 and all(ln.endswith(" ok") and "(cpu)" in ln for ln in lines), out


def test_readme_decoding_block_is_code():
    """The README's decoding example parses and defines what tests/gpu/test_readme_gpu.py reads
    after running it (that test runs it on GPUs)."""
    import ast

    from readme_code import python_block_after

    tree = ast.parse(python_block_after("**Decoding**"))
    names = {n.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
             for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    assert {"buf", "stream", "x", "topk_idx", "topk_w", "out", "graph", "E"} <= names


def test_readme_worker_block_is_a_script():
    """The README's first example parses as the script ep_worker.py, with a top-level ``main``
    (so spawn can send it) started under ``if __name__ == "__main__"``; tests/gpu/test_readme_gpu.py
    runs it on GPUs."""
    import ast

    from readme_code import python_block_after

    code = python_block_after("## Using it")
    assert code.startswith("# ep_worker.py")
    tree = ast.parse(code)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body)
    assert any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
