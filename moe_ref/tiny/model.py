"""The tiny MoE causal LM: a transformers Mixtral built from a config (no hub), and loading the shipped checkpoint.

Legend: B batch, S sequence, D d_model (hidden_size), F d_ff per expert, E experts, K top-k, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data import BOS, EOS, PAD, VOCAB_SIZE

__all__ = ["CHECKPOINT_DIR", "SMOKE_SIZE", "TINY_SIZE", "build_model", "load_tiny_moe", "tiny_config", "training_log"]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
# the shipped model's shape, and a smoke shape for a CI check of the training code
TINY_SIZE = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
SMOKE_SIZE = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)


def tiny_config(experts_implementation: str = "eager", max_seq_len: int = 1024, **size):
    """A MixtralConfig with a byte-level vocabulary; `size` overrides TINY_SIZE keys (hidden_size, ...)."""
    from transformers import MixtralConfig

    unknown = set(size) - set(TINY_SIZE)
    if unknown:
        raise ValueError(f"size: unknown keys {sorted(unknown)}; allowed {sorted(TINY_SIZE)}")
    return MixtralConfig(
        vocab_size=VOCAB_SIZE, max_position_embeddings=max_seq_len, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD, tie_word_embeddings=True, router_aux_loss_coef=0.01, output_router_logits=False,
        sliding_window=None, experts_implementation=experts_implementation, **{**TINY_SIZE, **size})


def build_model(config, seed: int = 0):
    """A freshly initialised MixtralForCausalLM (fp32, train mode) from `config`, seeded."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def load_tiny_moe(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The trained tiny MoE LM (a transformers PreTrainedModel, eval mode) from `path` (default: the shipped one)."""
    from transformers import MixtralForCausalLM

    path = CHECKPOINT_DIR if path is None else Path(path)
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise ValueError(f"path must hold model.safetensors and config.json, got {path}")
    model = MixtralForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def training_log(path: str | Path | None = None) -> dict:
    """The checkpoint's train_log.json (steps, losses, Python version of the corpus, seed, wall time, machine)."""
    import json

    path = CHECKPOINT_DIR if path is None else Path(path)
    f = path / "train_log.json"
    if not f.is_file():
        raise ValueError(f"path must hold train_log.json, got {path}")
    return json.loads(f.read_text())
