"""The rank counts GPU tests run at: EP1, EP2, EP4 and EP8, each as far as this host's GPUs allow
(one rank per GPU). A count above the host's GPUs shows up as a skip with its reason, so a 2-GPU
run lists the EP4 and EP8 cases it did not run."""
import pytest

from numba_ep.group import gpu_count

GPUS = gpu_count()
RANK_COUNTS = (1, 2, 4, 8)


def ep(n):
    """A pytest param for ``n`` ranks, id ``EP{n}``, marked gpu (and multigpu when n > 1)."""
    marks = [pytest.mark.gpu]
    if n > 1:
        marks.append(pytest.mark.multigpu)
    if 0 < GPUS < n:
        marks.append(pytest.mark.skip(reason=f"EP{n} needs {n} GPUs in this host (found {GPUS})"))
    return pytest.param(n, marks=marks, id=f"EP{n}")


def ep_params(smallest=1):
    """``ep(n)`` for every rank count from ``smallest`` up."""
    return [ep(n) for n in RANK_COUNTS if n >= smallest]


def runnable_rank_counts():
    """The rank counts this host can run (for compiling their kernels ahead of the ranks)."""
    return [n for n in RANK_COUNTS if n <= GPUS]
