"""The GPU targets, as data, and their evaluation on a device result's rows.

Legend: T tokens; a row is one (shape, T, provider) measurement of the sweep (see sweep.py).
Each Target names one provider, the shapes and token counts it applies to, a metric and a threshold:
  metric "vs:<peer>"  speedup t(peer) / t(provider) at the same (shape, T)   (> 1: the provider is faster)
  any other metric    a field of the provider's row (hbm_frac_nominal, matmul_frac_nominal, ...)
A target is evaluated wherever both sides were measured; cases not measured are absent, never "met".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .providers import TRITON_PROVIDERS

__all__ = ["Target", "TARGETS", "ratios", "evaluate_targets", "targets_as_data"]

RATIO_PEERS = ("grouped_mm", "loop", "grouped")  # speedups reported for each Triton provider


@dataclass(frozen=True)
class Target:
    """provider's `metric` >= threshold at every measured (shape, T) with shape in shapes and lo <= T <= hi."""

    name: str
    provider: str
    metric: str
    threshold: float
    shapes: tuple[str, ...] | None = None  # None: every shape
    min_tokens: int = 0
    max_tokens: int | None = None

    def applies(self, shape: str, T: int) -> bool:
        return ((self.shapes is None or shape in self.shapes) and T >= self.min_tokens
                and (self.max_tokens is None or T <= self.max_tokens))


TARGETS = (
    Target("triton_graph >= 70% of the HBM roofline (4.3 TB/s) at T <= 64", "triton_graph", "hbm_frac_nominal",
           0.7, shapes=("mixtral-8x7b", "qwen3-30b-a3b"), max_tokens=64),
    Target("triton >= 60% of bf16 peak (790 TFLOP/s) at T >= 8192", "triton", "matmul_frac_nominal", 0.6,
           min_tokens=8192),
    Target("triton >= 1.1x the grouped_mm pipeline", "triton", "vs:grouped_mm", 1.1),
)


def ratios(rows: list[dict]) -> list[dict]:
    """Per (shape, T): {v}_vs_{peer} = t(peer) / t(v) for each Triton provider v, and {v}_vs_best_hf."""
    ok = {(r["shape"], r["tokens"], r["provider"]): r["median_ms"] for r in rows if r.get("status") == "ok"}
    out = []
    for shape, T in sorted({(s, t) for s, t, _ in ok}):
        row = dict(shape=shape, tokens=T)
        hf = [v for (s, t, p), v in ok.items() if s == shape and t == T and p.startswith("hf_")]
        for v in TRITON_PROVIDERS:
            tri = ok.get((shape, T, v))
            if tri is None:
                continue
            for peer in RATIO_PEERS:
                if (shape, T, peer) in ok:
                    row[f"{v}_vs_{peer}"] = ok[(shape, T, peer)] / tri
            if hf:
                row[f"{v}_vs_best_hf"] = min(hf) / tri
        if len(row) > 2:
            out.append(row)
    return out


def evaluate_targets(rows: list[dict], targets=TARGETS) -> list[dict]:
    """One entry per target and measured (shape, T): value, threshold, met."""
    ok = {(r["shape"], r["tokens"], r["provider"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for tg in targets:
        for (shape, T, prov), r in sorted(ok.items()):
            if prov != tg.provider or not tg.applies(shape, T):
                continue
            if tg.metric.startswith("vs:"):
                peer = ok.get((shape, T, tg.metric[3:]))
                value = None if peer is None else peer["median_ms"] / r["median_ms"]
            else:
                value = r.get(tg.metric)
            if value is not None:
                out.append(dict(target=tg.name, provider=prov, shape=shape, tokens=T, value=value,
                                threshold=tg.threshold, met=bool(value >= tg.threshold)))
    return out


def targets_as_data(targets=TARGETS) -> list[dict]:
    """The targets as JSON-ready dicts (written into every device result)."""
    return [asdict(t) for t in targets]
