"""The README's examples, run as written. The decoding example on 1 and 2 GPUs
(workers_readme.py): the CUDA graph it captures is replayed with new tokens, and every replay's
combined output is checked. The first example (ep_worker.py) on 2 GPUs, as a script."""
import os

import pytest

import numba_ep  # noqa: F401  (NumPy shim first)
from numba_ep.group import gpu_count  # noqa: E402
from rank_counts import ep  # noqa: E402

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers_readme.py")


@pytest.mark.parametrize("nranks", [ep(1), ep(2)])
def test_readme_decoding_example(ranks, nranks):
    if gpu_count() < 1:
        pytest.skip("needs a CUDA GPU (found 0)")
    diffs = ranks(f"{WORKERS}:decoding_example", nranks, timeout=300, group_timeout=200)
    for r, d in enumerate(diffs):
        assert len(d) == 3 and max(d) < 1e-5, f"rank {r}: calc_diff per replay {d}"


@pytest.mark.parametrize("nranks", [ep(2)])
def test_readme_worker_example(tmp_path, nranks):
    """The README's first example (``ep_worker.py``: layout, dispatch, combine of 4096 tokens
    on 2 spawned ranks) saved as a file and run as a script, as a reader would: every
    (token, expert) pair is counted once among the ranks' per-expert lists."""
    import ast
    import subprocess
    import sys

    from readme_code import python_block_after

    if gpu_count() < nranks:
        pytest.skip(f"needs {nranks} GPUs")
    script = tmp_path / "ep_worker.py"
    script.write_text(python_block_after("## Using it"))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert len(counts) == 2 and all(len(c) == 256 // 2 for c in counts), counts
    assert sum(map(sum, counts)) == 2 * 4096 * 8, counts
