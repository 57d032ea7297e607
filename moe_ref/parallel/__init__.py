"""Expert parallelism (EP): experts sharded over P ranks, tokens moved by all_to_all.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, C capacity per expert, P ranks, El = E / P.

The per-rank plan lives in moe_ref.ep_plan (a generator that yields its collectives). This package runs it:
  - transport: for real on torch.distributed (`ep_forward`): gloo on CPU, NCCL on CUDA, launched by torchrun:
        MASTER_ADDR=127.0.0.1 torchrun --nproc-per-node 4 -m moe_ref.parallel --check
  - simulate: in one process (`simulate_ep`): P virtual ranks run the same generator in lockstep, the
    all_to_all / all_gather answered by list shuffles of the same split sizes, every byte metered
    between every pair of ranks (grouped all_to_all vs `scheme="naive"` all-gather / reduce-scatter).
  - split: cutting a batch into per-rank tokens and routings; rows per destination rank.
  - launch: loopback process groups (`run_local_group`) and `launch_torchrun`.
  - cli (`python -m moe_ref.parallel`) with report: the torchrun check and its per-rank report.
"""

from ..ep_plan import EPRankStats, shard_bounds, shard_experts
from .cli import PRESETS, main  # noqa: E402  (after the schemes register themselves)
from .hierarchical import check_layout, hierarchical_exchange, layout_groups
from .launch import free_port, launch_torchrun, run_local_group
from .naive import naive_rank_program
from .overlap import micro_batch_splits, overlap_exchange
from .simulate import EPSimResult, simulate_ep
from .split import split_routing, split_tokens, unique_destinations
from .topology import (
    TOPOLOGY_PRESETS,
    Topology,
    all_to_all_time,
    inter_node_bytes,
    layer_comm_time,
    link_classes,
    staged_time,
    topology_preset,
)
from .transport import EPOutput, ep_forward, run_with_torch_distributed

__all__ = ["EPOutput", "EPSimResult", "EPRankStats", "ep_forward", "simulate_ep", "split_tokens",
           "shard_experts", "shard_bounds", "run_with_torch_distributed", "split_routing", "unique_destinations",
           "run_local_group", "free_port", "launch_torchrun", "PRESETS", "main", "naive_rank_program",
           # past one node: layout, time model, hierarchical and overlapped schemes
           "Topology", "TOPOLOGY_PRESETS", "topology_preset", "link_classes", "inter_node_bytes", "all_to_all_time",
           "layer_comm_time", "staged_time", "check_layout", "layout_groups", "hierarchical_exchange",
           "micro_batch_splits", "overlap_exchange"]
