"""The intranode kernels driven directly (no Buffer): dispatch must equal the reference exactly,
combine within DeepEP's tolerance. Buffer-level tests live in test_intranode_gpu.py."""
import pytest

from rank_counts import ep_params
from workers_intranode_kernels import dispatch_combine_round_trip


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,E,K,C,N", [(512, 2048, 64, 8, 4, 64), (1, 512, 8, 2, 2, 64),
                                         (333, 7168, 256, 8, 12, 256)])
def test_round_trip_one_gpu(T, H, E, K, C, N, ranks):
    ranks(dispatch_combine_round_trip, 1, T, H, E, K, C, N)


@pytest.mark.multigpu
@pytest.mark.parametrize("T,H,E,K,C,N", [([512, 300], 2048, 64, 8, 4, 64),
                                         ([0, 17], 1024, 16, 4, 3, 64),
                                         (4096, 7168, 256, 8, 12, 256)])
def test_round_trip_two_gpus(T, H, E, K, C, N, ranks):
    ranks(dispatch_combine_round_trip, 2, T, H, E, K, C, N)


@pytest.mark.parametrize("nranks", ep_params(4))
@pytest.mark.parametrize("T,H,E,K,C,N", [("mixed", 2048, 64, 8, 4, 64),
                                         (4096, 7168, 256, 8, 12, 256)])
def test_round_trip_more_ranks(T, H, E, K, C, N, nranks, ranks):
    """EP4 / EP8: ranks with many, few and no tokens ("mixed"), then the benchmark size."""
    if T == "mixed":
        T = [512, 0, 300, 1, 77, 256, 5, 129][:nranks]
    ranks(dispatch_combine_round_trip, nranks, T, H, E, K, C, N)
