"""Static checks of the kernel sources (numba_ep/kernels/*.py), for mistakes that compile
cleanly and only show on a GPU.

A ``for i in range(n)`` loop whose body assigns ``i`` again: Python (and numba) keep iterating
over the range, but every later use of ``i`` in that iteration sees the new value. In a kernel
the new value is often per-lane, so a warp diverges on what was meant to be uniform and the
kernel hangs in a ballot or a loop with garbage bounds. This happened once (an inner ``i = lane``
loop over scales inside the internode receiver's ``for i in range(G)``): the GPU run hung until
its time ran out, so it is checked here, on the CPU.
"""
import ast
import pathlib

import pytest

KERNELS = pathlib.Path(__file__).resolve().parent.parent / "numba_ep" / "kernels"


def _bound_names(target):
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [n for e in target.elts for n in _bound_names(e)]
    if isinstance(target, ast.Starred):
        return _bound_names(target.value)
    return []   # a[i] = ... or a.x = ... rebind nothing


def loop_index_reassignments(source):
    """``[(loop line, assignment line, name)]`` for every ``for NAME in ...`` whose body binds
    NAME again (by assignment, augmented assignment or a nested loop). ``_`` is ignored."""
    found = []
    for loop in ast.walk(ast.parse(source)):
        if not isinstance(loop, ast.For) or not isinstance(loop.target, ast.Name):
            continue
        name = loop.target.id
        if name == "_":
            continue
        for stmt in loop.body:
            for node in ast.walk(stmt):
                if isinstance(node, ast.Assign):
                    targets = node.targets
                elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                    targets = [node.target]
                elif isinstance(node, ast.For):
                    targets = [node.target]
                else:
                    continue
                if any(name in _bound_names(t) for t in targets):
                    found.append((loop.lineno, node.lineno, name))
    return found


@pytest.mark.parametrize("path", sorted(KERNELS.glob("*.py")), ids=lambda p: p.name)
def test_no_kernel_loop_reassigns_its_index(path):
    assert loop_index_reassignments(path.read_text()) == [], (
        f"{path.name}: a loop body rebinds its own index (loop line, assignment line, name)")


def test_the_check_sees_the_bug_it_is_for():
    bad = (
        "for i in range(G):\n"
        "    s = a * G + i\n"
        "    i = lane\n"
        "    while i < S:\n"
        "        i += 32\n"
    )
    assert loop_index_reassignments(bad) == [(1, 3, "i"), (1, 5, "i")]
    good = (
        "for i in range(G):\n"
        "    out[i] = 0\n"
        "    for j in range(G):\n"
        "        sc = lane\n"
        "        sc += 32\n"
    )
    assert loop_index_reassignments(good) == []
