"""Dynamic batching: gather concurrent requests into one MoE forward, and a simulator of it.

Legend: T tokens in a batch, L_i tokens of request i, D d_model, E experts, K top-k.

Why: an MoE layer's experts each see only the tokens routed to them. One small request gives
each expert a handful of rows (poor GEMMs, uneven load); gathering many requests into one
forward gives every expert more rows and, statistically, a more even share, but nothing
guarantees it: a batch can still be skewed (measured by the simulator).

flush.py:     FlushRule, the one rule for when a batch is dispatched and which requests it takes;
batcher.py:   DynamicBatcher, the live asyncio batcher that follows it;
simulator.py: simulate_dynamic_batching, the same rule on Poisson arrivals with a cost model;
continuous.py: simulate_serving, iteration-level (continuous) batching with chunked prefill against
              request-level batching, prompt and output tokens, priced by moe_ref.costmodel.
"""

from .batcher import BatchRecord, DynamicBatcher
from .continuous import ServingSimulation, draw_workload, serving_comparison, simulate_serving
from .flush import FlushRule
from .simulator import BatchingSimulation, simulate_dynamic_batching

__all__ = ["BatchRecord", "DynamicBatcher", "BatchingSimulation", "FlushRule", "simulate_dynamic_batching",
           "ServingSimulation", "draw_workload", "serving_comparison", "simulate_serving"]
