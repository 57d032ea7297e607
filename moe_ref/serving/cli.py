"""`python -m moe_ref.serving [--check] [--capacity-factor CF]`: serve the tiny MoE LM by continuous batching.

Legend: T tokens in a step, E experts, K top-k, C capacity per expert, H distinct experts a call touches.
--check: a handful of requests served dropless through transformers' generate_batch with moe_ref.hf.patch_model
in place; every output is compared with plain `generate` (unpatched); per-step statistics are printed; exit status
0 only when every output matches, 1 otherwise. --capacity-factor CF: serve the same requests again with
CapacityConfig(capacity_factor=CF) and print its drops per step and how many outputs still match.
"""

from __future__ import annotations

import argparse

from .engine import generate_reference, serve

__all__ = ["PROMPTS", "format_steps", "main"]

# a handful of requests of different lengths (prompts longer than the token budget are prefilled in chunks)
PROMPTS = (
    "def forward(self, x):\n",
    "import os\n",
    "class Config:\n    def __init__(self, name, value):\n        self.name = name\n",
    "for i in range(10):",
    "    return ''.join(parts)\n\n\ndef main(argv=None):\n    parser = argparse.ArgumentParser(",
    "x = [",
)


def format_steps(result, max_rows: int = 40) -> str:
    """One line per step: tokens, decodes, prefill tokens, experts touched per layer, loads, drops."""
    by: dict[int, list[dict]] = {}
    for c in result.calls:
        by.setdefault(c["step"], []).append(c)
    lines = [f"{'step':>4} {'T':>4} {'dec':>4} {'pre':>4}  {'H per layer':<14} {'max load':<14} {'C':>3} {'drop':>5}"]
    for k, cs in list(sorted(by.items()))[:max_rows]:
        c0 = cs[0]
        cap = "-" if c0["capacity"] is None else str(c0["capacity"])
        lines.append(f"{k:>4} {c0['tokens']:>4} {c0['decode_seqs']:>4} {c0['prefill_tokens']:>4}  "
                     f"{' '.join(str(c['hit']) for c in cs):<14} {' '.join(str(c['max_load']) for c in cs):<14} "
                     f"{cap:>3} {sum(c['dropped'] for c in cs):>5}")
    if len(by) > max_rows:
        lines.append(f"... {len(by) - max_rows} more steps")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the check (and the capacity demo); return the exit status."""
    ap = argparse.ArgumentParser(prog="python -m moe_ref.serving", description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="serve dropless and compare every output with generate")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--max-batch-tokens", type=int, default=32, help="token budget of one step")
    ap.add_argument("--capacity-factor", type=float, default=None, help="also serve under this capacity factor")
    args = ap.parse_args(argv)
    if not args.check and args.capacity_factor is None:
        ap.error("nothing to do: pass --check and/or --capacity-factor CF")
    for flag, v in (("--max-new-tokens", args.max_new_tokens), ("--max-batch-tokens", args.max_batch_tokens)):
        if v < 1:
            ap.error(f"{flag} must be >= 1, got {v}")
    if args.capacity_factor is not None and not args.capacity_factor > 0:
        ap.error(f"--capacity-factor must be > 0, got {args.capacity_factor}")

    import torch

    from ..config import CapacityConfig
    from ..tiny import encode, load_tiny_moe

    torch.manual_seed(0)
    model = load_tiny_moe()
    prompts = [encode(p).tolist() for p in PROMPTS]
    ref = generate_reference(model, prompts, args.max_new_tokens)
    status = 0
    if args.check:
        res = serve(model, prompts, args.max_new_tokens, max_batch_tokens=args.max_batch_tokens)
        print(f"continuous batching, dropless: {len(prompts)} requests, {len(res.steps)} steps, "
              f"{len(res.calls)} MoE layer calls, {res.wall_s:.2f} s")
        print(format_steps(res))
        bad = [i for i, (a, b) in enumerate(zip(res.outputs, ref)) if a != b]
        for i in bad:
            print(f"MISMATCH request {i}: generate_batch {res.outputs[i]} != generate {ref[i]}")
        print(f"{len(prompts) - len(bad)}/{len(prompts)} outputs equal plain generate")
        status = 1 if bad else 0
    if args.capacity_factor is not None:
        cap = CapacityConfig(capacity_factor=args.capacity_factor)
        res = serve(model, prompts, args.max_new_tokens, capacity=cap, max_batch_tokens=args.max_batch_tokens)
        share = res.decode_drop_share()
        same = sum(a == b for a, b in zip(res.outputs, ref))
        print(f"\nunder {cap}:")
        print(format_steps(res))
        print(f"dropped share: decode-only steps {share['decode']:.1%}, steps with prefill {share['mixed']:.1%}; "
              f"{same}/{len(prompts)} outputs still equal plain generate")
    return status
