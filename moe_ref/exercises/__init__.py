"""Exercises with auto-checkers, one module per notebook topic: the reader writes a function, a checker runs it.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, C capacity per expert, S = T*K slots.
Each `check_*(fn)` calls fn on generated cases, edge cases included (T=0, E=1, K=E, one hot expert,
dropped ids, a single rank or node, odd sizes), compares with moe_ref's own implementation or the float64
reference, and prints the first wrong case: its inputs, expected and got, and the indices of the elements
that differ. It returns
a `CheckResult` (truthy when every case passes). A stub that raises NotImplementedError or returns None is
reported as "not attempted", never raised, so the notebooks run with their stubs untouched.
"""

from ._runner import CheckResult
from .batching import check_flush_reason, check_load_imbalance, check_take
from .capacity import check_drop_by_position, check_drop_by_probability, check_expert_capacity
from .grouping import check_group_by_expert, check_offsets, check_rank_in_expert
from .kernels import check_align_block_size, check_combine, check_padded_rows
from .multinode import check_inter_node_bytes, check_node_limited_topk, check_replicate_experts
from .naive import check_dense_moe, check_expert_counts
from .parallel import check_bytes_sent, check_traffic_matrix, check_unique_destinations
from .permutation import check_grouped_moe, check_permute, check_unpermute
from .serving import check_expected_hit, check_step_schedule, check_ttft_itl
from .strategy import check_all_to_all_time, check_ep_degree, check_layer_time

__all__ = [
    "CheckResult",
    "check_expert_counts", "check_dense_moe",  # 01 naive batching
    "check_flush_reason", "check_take", "check_load_imbalance",  # 02 dynamic batching
    "check_expected_hit", "check_step_schedule", "check_ttft_itl",  # 02b continuous batching
    "check_offsets", "check_group_by_expert", "check_rank_in_expert",  # 03 token grouping
    "check_permute", "check_unpermute", "check_grouped_moe",  # 04 permutation
    "check_expert_capacity", "check_drop_by_position", "check_drop_by_probability",  # 05 capacity
    "check_traffic_matrix", "check_unique_destinations", "check_bytes_sent",  # 06 expert parallelism
    "check_inter_node_bytes", "check_node_limited_topk", "check_replicate_experts",  # 06b past one node
    "check_padded_rows", "check_align_block_size", "check_combine",  # 07 Triton kernels
    "check_all_to_all_time", "check_layer_time", "check_ep_degree",  # 08 choosing a strategy
]
