"""moe_ref.serving: the MoE layer inside a real continuous-batching engine (transformers' generate_batch).

Legend: T tokens in a step, E experts, K top-k, C capacity per expert, H distinct experts a call touches.
engine.py: serve() (patch_model in place, one record per MoE layer call), generate_reference() (plain generate);
cli.py:    `python -m moe_ref.serving --check`: a handful of requests dropless, every output against generate.
transformers is imported only by the functions that need it.
"""

from .engine import ServeResult, generate_reference, serve

__all__ = ["ServeResult", "generate_reference", "serve"]
