"""Load-balance and quality metrics: how uneven the experts are, what capacity drops, what that costs.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, C capacity per expert.

- load_imbalance(counts)           max / mean of the per-expert loads (1 = perfectly even).
- coefficient_of_variation(counts) std / mean (population std; 0 = perfectly even).
- drop_share(stats)                dropped assignments / routed assignments (T*K).
- padding_waste(stats)             padded rows / computed expert rows (static buffers).
- capacity_quality_table(...)      drop share and output error vs dropless, per
                                   (capacity factor, skew, overflow): the table the chart is drawn from.

`python -m moe_ref.capacity_table` (or `moe_ref.metrics.main()`) prints that table for a CPU-sized
layer (T=1024, D=256, F=512, E=8, K=2); `--out FILE.json` also writes it with the run's metadata.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch

from .config import CapacityConfig
from .stats import MoEStats

__all__ = ["load_imbalance", "coefficient_of_variation", "drop_share", "padding_waste",
           "relative_error", "capacity_quality_table", "format_table"]


def _counts(counts) -> torch.Tensor:
    if isinstance(counts, MoEStats):
        counts = counts.expert_counts
    if not isinstance(counts, torch.Tensor):
        try:
            counts = torch.as_tensor(counts, dtype=torch.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"counts must be a 1-D tensor or sequence of numbers, got {type(counts).__name__}") from e
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D [E] tensor, got shape {tuple(counts.shape)}")
    counts = counts.double()
    if bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError("counts must be finite and >= 0")
    return counts


def load_imbalance(counts) -> float:
    """max / mean of per-expert loads counts [E] (or an MoEStats). 1.0 when even, and when all are 0."""
    c = _counts(counts)
    mean = float(c.mean())
    return 1.0 if mean == 0 else float(c.max()) / mean


def coefficient_of_variation(counts) -> float:
    """std / mean of per-expert loads counts [E] (population std). 0.0 when even, and when all are 0."""
    c = _counts(counts)
    mean = float(c.mean())
    return 0.0 if mean == 0 else float(c.std(unbiased=False)) / mean


def _check_stats(stats) -> MoEStats:
    if not isinstance(stats, MoEStats):
        raise TypeError(f"stats must be a moe_ref.MoEStats (out.stats), got {type(stats).__name__}")
    return stats


def drop_share(stats: MoEStats) -> float:
    """Share of routed assignments (T*K) that capacity dropped: stats.dropped / stats.routed (0 if none)."""
    s = _check_stats(stats)
    return 0.0 if s.routed == 0 else s.dropped / s.routed


def padding_waste(stats: MoEStats) -> float:
    """Share of computed expert rows that were padding: stats.padded_slots / stats.computed_rows (0 if none)."""
    s = _check_stats(stats)
    return 0.0 if s.computed_rows == 0 else s.padded_slots / s.computed_rows


def relative_error(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    """||y - y_ref||_F / ||y_ref||_F in float64 (0 when both are zero, inf when only y_ref is)."""
    d = float((y.double() - y_ref.double()).norm())
    n = float(y_ref.double().norm())
    return (0.0 if d == 0 else math.inf) if n == 0 else d / n


def capacity_quality_table(layer, x: torch.Tensor, capacity_factors: Sequence[float], skews: Sequence[float],
                           overflows: Sequence[str] = ("drop", "reroute"), drop_policy: str = "position",
                           min_capacity: int = 1, strategy: str = "grouped", hot_seed: int | None = None,
                           progress: bool = False) -> list[dict]:
    """What capacity costs: one row per (skew, capacity factor, overflow), in that nesting order.

    For each skew the routing is `skewed_routing(x, layer.router_weight, K, skew)` (layer's
    renormalize/scoring); every overflow is compared with the dropless output of that same routing.
    Row fields:
      skew, capacity_factor, overflow, drop_policy: the setting;
      capacity:        C per expert;
      load_imbalance:  max/mean expert load of the routing (before capacity);
      dropped:         assignments dropped; drop_share = dropped / (T*K);
      dropped_tokens:  tokens that lost all K assignments; rerouted: assignments moved;
      rel_error:       ||y - y_dropless|| / ||y_dropless|| (Frobenius, float64).
    """
    from .skew import skewed_routing  # local: skew imports the router only, but keep metrics light

    x2d = x.reshape(-1, x.shape[-1])  # [T, D]
    cfg = layer.cfg
    settings = [(s, cf, ov) for s in skews for cf in capacity_factors for ov in overflows]
    for _, cf, ov in settings:  # validate everything before the first forward
        CapacityConfig(capacity_factor=cf, min_capacity=min_capacity, drop_policy=drop_policy, overflow=ov)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(settings), desc="capacity table")
    rows = []
    with torch.inference_mode():
        for skew in skews:
            r = skewed_routing(x2d, layer.router_weight, cfg.top_k, skew, renormalize=cfg.renormalize,
                               scoring=cfg.scoring, hot_seed=hot_seed)
            base = layer(x2d, strategy=strategy, routing=r)  # dropless
            imb = load_imbalance(base.stats.expert_counts)
            for cf in capacity_factors:
                for ov in overflows:
                    cap = CapacityConfig(capacity_factor=cf, min_capacity=min_capacity, drop_policy=drop_policy,
                                         overflow=ov)
                    out = layer(x2d, strategy=strategy, routing=r, capacity=cap)
                    s = out.stats
                    rows.append(dict(skew=float(skew), capacity_factor=float(cf), overflow=ov,
                                     drop_policy=drop_policy, capacity=s.capacity, load_imbalance=imb,
                                     dropped=s.dropped, drop_share=drop_share(s), dropped_tokens=s.dropped_tokens,
                                     rerouted=s.rerouted, rel_error=relative_error(out.output, base.output)))
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text (markdown) table of capacity_quality_table rows."""
    head = ("| skew | capacity factor | C | overflow | max/mean load | drop share | dropped tokens | rerouted "
            "| rel. error |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['skew']:g} | {r['capacity_factor']:g} | {r['capacity']} | {r['overflow']} | "
                     f"{r['load_imbalance']:.2f} | {r['drop_share']:.2%} | {r['dropped_tokens']} | "
                     f"{r['rerouted']} | {r['rel_error']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    """Print the capacity quality table (drop and reroute vs capacity factor at two skews)."""
    from .config import MoEConfig
    from .layer import MoELayer

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factors", type=float, nargs="+", default=[0.5, 1.0, 1.25, 2.0])
    p.add_argument("--skews", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--drop-policy", default="position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the rows and metadata to this JSON file")
    a = p.parse_args(argv)
    if a.tokens < 0:
        p.error(f"--tokens must be >= 0, got {a.tokens}")
    layer = MoELayer(MoEConfig(d_model=a.d_model, d_ff=a.d_ff, num_experts=a.experts, top_k=a.top_k), seed=a.seed)
    x = torch.randn(a.tokens, a.d_model, generator=torch.Generator().manual_seed(a.seed + 1))  # [T, D]
    rows = capacity_quality_table(layer, x, a.capacity_factors, a.skews, drop_policy=a.drop_policy)
    print(f"T={a.tokens} D={a.d_model} F={a.d_ff} E={a.experts} K={a.top_k} float32, drop_policy={a.drop_policy}, "
          f"seed={a.seed}; rel. error = ||y - y_dropless|| / ||y_dropless||")
    print(format_table(rows))
    if a.out:
        import datetime
        import json
        import pathlib
        import platform

        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    torch=torch.__version__, python=platform.python_version(), device="cpu", dtype="float32",
                    args=vars(a))
        path = pathlib.Path(a.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
