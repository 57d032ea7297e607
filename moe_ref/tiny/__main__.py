"""`python -m moe_ref.tiny train [--smoke] ...` trains the tiny MoE LM; `... quality [--chart PNG]` measures it.

Legend: B batch, S sequence length (bytes), cf capacity factor.
quality prints the markdown table of quality_table (held-out loss and agreement per phase, overflow and cf).
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from .train import TrainConfig, train


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_ref.tiny", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train from scratch on this Python's stdlib sources and save a checkpoint")
    t.add_argument("--smoke", action="store_true", help="a seconds-long run of a toy-sized model (CI check)")
    t.add_argument("--steps", type=int, help="optimiser steps")
    t.add_argument("--batch-size", type=int, help="windows per step (B)")
    t.add_argument("--seq-len", type=int, help="bytes per window (S)")
    t.add_argument("--max-minutes", type=float, help="wall-time budget: the schedule ends by then")
    t.add_argument("--seed", type=int, help="random seed")
    t.add_argument("--out", help="checkpoint directory (default: the shipped one; a temp dir with --smoke)")
    t.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    q = sub.add_parser("quality", help="held-out loss and agreement under capacity (markdown table, optional chart)")
    q.add_argument("--capacity-factors", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.25, 1.5, 2.0])
    q.add_argument("--batch-size", type=int, default=4, help="held-out sequences (B)")
    q.add_argument("--seq-len", type=int, default=256, help="bytes per sequence (S)")
    q.add_argument("--chart", help="write the quality chart to this PNG")
    a = p.parse_args(argv)
    if a.cmd == "quality":
        for name in ("batch_size", "seq_len"):
            if getattr(a, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
        return _quality(a)
    cfg = TrainConfig.smoke(a.out or tempfile.mkdtemp(prefix="tiny_moe_smoke_")) if a.smoke else TrainConfig()
    for name in ("steps", "batch_size", "seq_len", "max_minutes", "seed"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    if a.out:
        cfg.out_dir = a.out
    try:
        cfg.__post_init__()  # the checks of the settings given
    except ValueError as e:
        p.error(str(e))
    log = train(cfg, progress_bar=not a.no_progress)
    print(f"steps {log['steps']}, held-out loss {log['final_heldout_loss']:.3f} nats/byte "
          f"(uniform {log['uniform_loss']:.2f}), wall {log['wall_time_s']:.0f} s -> {cfg.out_dir}")
    return 0


def _quality(a) -> int:
    from .charts import quality_figure
    from .quality import format_quality, quality_table

    rows = quality_table(a.capacity_factors, batch_size=a.batch_size, seq_len=a.seq_len)
    print(format_quality(rows))
    if a.chart:
        quality_figure(rows).savefig(a.chart, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
