"""get_dispatch_layout on the CPU: ``reference.get_dispatch_layout``, with the signature of
``numba_ep.kernels.layout.get_dispatch_layout``. Local to each rank (no communication)."""
from numba_ep import reference


def get_dispatch_layout(topk_idx, num_experts, num_ranks, num_gpus_per_node=None, stream=None,
                        out=None):
    """``(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank or None,
    num_tokens_per_expert [E] int32, is_token_in_rank [T, R] bool)`` of a NumPy ``topk_idx``."""
    return reference.get_dispatch_layout(topk_idx, num_experts, num_ranks,
                                         num_gpus_per_node=num_gpus_per_node)
