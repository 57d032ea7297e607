"""moe_ref.tiny: a trained tiny MoE causal LM (transformers Mixtral, byte-level) for real routing and quality costs.

Legend: n tokens (bytes), B batch, S sequence, D d_model, E experts, K top-k, L MoE layers, cf capacity factor.
Trained by `python -m moe_ref.tiny train` on this Python's standard-library sources (read at run time);
the checkpoint ships in moe_ref/tiny/checkpoint/ with its train_log.json and loss.png.
transformers is imported only by the functions that need it.
"""

from .charts import loss_figure, quality_figure, trace_figure
from .data import BOS, EOS, PAD, VOCAB_SIZE, corpus_files, decode, encode, heldout_ids, heldout_windows
from .model import CHECKPOINT_DIR, load_tiny_moe, tiny_config, training_log
from .quality import OVERFLOW_SETTINGS, PerStepMoE, format_quality, quality_table
from .trace import batch_imbalance, layer_loads, neighbour_sharing, routing_traces

__all__ = [
    "BOS", "CHECKPOINT_DIR", "EOS", "OVERFLOW_SETTINGS", "PAD", "VOCAB_SIZE", "batch_imbalance", "corpus_files",
    "decode", "encode", "format_quality", "heldout_ids", "heldout_windows", "layer_loads", "load_tiny_moe",
    "loss_figure", "neighbour_sharing", "PerStepMoE", "quality_figure", "quality_table", "routing_traces",
    "tiny_config", "trace_figure", "training_log",
]
