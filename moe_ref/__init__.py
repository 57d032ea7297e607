"""moe_ref: a tested reference for Mixture-of-Experts inference batching.

Legend used throughout: T tokens, D d_model, F d_ff per expert, E experts, K top-k,
C capacity per expert, P expert-parallel ranks.
"""

from .advise import advise  # the function (its module: moe_ref/advise.py)
from .batching import DynamicBatcher, simulate_dynamic_batching
from .capacity import CapacityResult, apply_capacity, expert_capacity, priority_rank
from .config import CapacityConfig, MoEConfig
from .grouping import DispatchPlan, group_by_expert
from .layer import MoELayer, MoEOutput, moe_forward
from .metrics import (
    capacity_quality_table,
    coefficient_of_variation,
    drop_share,
    load_imbalance,
    padding_waste,
)
from .packing import prepack, unpack
from .permute import combine_slots, permute, unpermute
from .reference import expert_ffn, reference_moe, swiglu
from .router import Routing, route
from .skew import expert_popularity, random_routing, skewed_routing
from .stats import MoEStats, expert_counts
from .strategy import register_strategy, strategy_names

__version__ = "0.1.0"


def __getattr__(name: str):
    """Lazy submodule `moe_ref.hf`: transformers is imported only when it is used."""
    if name == "hf":
        import importlib

        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'moe_ref' has no attribute {name!r}")

__all__ = [
    "CapacityConfig", "CapacityResult", "DispatchPlan", "MoEConfig", "MoELayer", "MoEOutput", "MoEStats",
    "Routing", "apply_capacity", "combine_slots", "expert_capacity", "expert_counts", "expert_ffn", "group_by_expert",
    "moe_forward", "permute", "priority_rank", "reference_moe", "register_strategy", "route",
    "strategy_names", "swiglu", "unpermute",
    # packed expert weights for the grouped strategy's CPU GEMMs
    "prepack", "unpack",
    # capacity experiments and dynamic batching
    "DynamicBatcher", "simulate_dynamic_batching", "expert_popularity", "skewed_routing", "random_routing",
    "load_imbalance", "coefficient_of_variation", "drop_share", "padding_waste", "capacity_quality_table",
    # choosing a strategy by workload and deployment
    "advise",
]
