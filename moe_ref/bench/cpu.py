"""The CPU benchmark: our strategies and transformers' experts implementations side by side, against the bound.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k.
The GEMM-only bound runs just the expert GEMMs and SwiGLU that the grouped strategy runs, on rows already grouped
by expert in the layout those GEMMs read, with the routing's own expert loads: no routing, permutation, gate
weights or combine. That is the very ffn_rows loop on [N, D] row blocks, or where ffn_rows takes its batched path
(which the strategy runs as grouped.batched_moe, gathering x straight into padded rows) the torch.bmm pairs, chunk
of experts by chunk, on a padded [E*C, D] buffer already filled (grouped.padded_ffn), without the gather and without
ffn_rows's copies into and out of it.
Every strategy must spend at least that.
Providers, all on the same weights and the same routing:
  ours     the registered strategy functions ("loop", "grouped", "grouped_mm", ...), called directly;
           with prepack (the default, where this torch can) the layer's expert weights are packed for oneDNN
           once per layer (MoELayer.prepack, which also times plain and packed GEMMs per row count and keeps the
           faster), so "grouped" and the bound run their GEMMs by that choice, and "grouped_plain" is the grouped
           strategy on the plain weights beside them (what packing and the timed choice buy)
  peers    transformers' experts implementations (hf_eager, hf_grouped_mm, hf_batched_mm), where installed;
           hf_batched_mm gathers [T*K, 2F, D] weights, so it is skipped past BATCHED_MM_BYTES
  parts    at T >= PARTS_MIN_TOKENS (where the bound target applies): grouped's plan, gather and combine on the way
           grouped takes (grouped_parts), each timed right after an untimed call of the bound (timing.after), as a
           forward meets it after GEMMs that streamed the weights: the work the bound leaves out, so that the bound
           plus the parts accounts for grouped's time (timed warm, in a loop of themselves, each part cost from a
           quarter to most of what it costs there)
All providers of one (shape, dtype, T) run interleaved through timing.time_cpu with a pinned thread count;
each row keeps the median, the IQR and the thread count, and a row that timing.distrust flags (faster than
its own bound, or a wide spread) carries a `warning`.
"""

from __future__ import annotations

import itertools

import torch

from ..config import MoEConfig
from ..grouped import _run, ffn_path, ffn_rows, forward_plan, padded_chunks, padded_ffn, padded_rows
from ..layer import MoELayer
from ..packing import prepack_unsupported
from ..permute import combine_slots
from ..strategy import get_strategy
from .providers import hf_experts_providers
from .shapes import DTYPES, Shape
from .timing import BUSY, after, distrust, extend, median_ci_coverage, paired_ratio, paired_ratio_ci, progress, time_cpu

__all__ = ["bench_cpu", "gemm_only", "grouped_parts", "print_table", "cpu_targets", "CPU_STRATEGIES", "CPU_PEERS",
           "BATCHED_MM_BYTES", "PLAIN", "PARTS", "PARTS_MIN_TOKENS", "CONFIRM_ROUNDS"]

CPU_STRATEGIES = ("loop", "grouped", "grouped_mm")
CPU_PEERS = ("hf_eager", "hf_grouped_mm", "hf_batched_mm")
BATCHED_MM_BYTES = 1 << 30  # hf_batched_mm's gathered weights above this are not timed (memory, minutes)
BOUND = "gemm_only"
PLAIN = "grouped_plain"  # the grouped strategy on the plain (unpacked) weights, timed when the layer is packed
PARTS = ("plan", "gather", "combine")  # grouped_parts: rows "grouped:plan", ... (part_of "grouped")
BOUND_MIN_TOKENS = 1024  # cpu_targets's bound target applies from this T on
PARTS_MIN_TOKENS = BOUND_MIN_TOKENS  # the parts are timed from this T on: where the bound target applies
CONFIRM_ROUNDS = 24  # bench_cpu's extra rounds for a verdict within the noise of its first rounds


def gemm_only(x: torch.Tensor, counts: list[int], w13: torch.Tensor, w2: torch.Tensor):
    """A callable doing just the expert GEMMs (+SwiGLU) on pre-grouped rows, as the grouped strategy runs them: the
    bound. ffn_rows on [N, D] blocks, or on its batched path padded_ffn on a filled padded buffer [E*C, D]."""
    D, bounds = x.shape[1], [0, *itertools.accumulate(counts)]  # [E+1] block bounds
    xb = x.new_empty(bounds[-1], D)  # [N, D] rows already grouped by expert (filled below where they are read)
    out = x.new_empty(bounds[-1], D)
    if ffn_path(xb, bounds, w13, w2, out) == "batched":
        rows = padded_rows(bounds, counts)
        buf = x.new_empty(rows.experts * rows.capacity, D).normal_()  # [E*C, D] rows already grouped and padded
        return lambda: padded_ffn(buf, rows, w13, w2)
    xb.normal_()

    def run():
        ffn_rows(xb, bounds, w13, w2, out)

    return run


def grouped_parts(x: torch.Tensor, r, w13: torch.Tensor, w2: torch.Tensor) -> dict:
    """{"grouped:<part>": fn()} for each of PARTS: the grouped strategy's work outside the bound, each part alone,
    on this case's routing and by the way the strategy takes (grouped.grouped_moe, outside autograd):
      plan     grouped.forward_plan: slot_counts, the path decision and the plan the forward reads (padded_plan
               on the batched path, row_plan elsewhere), what the forward does before its first copy of a row;
      gather   x's rows into the rows the GEMMs read: chunk by chunk into padded rows, as padded_ffn gathers them
               (batched path), or the permute into grouped rows [N, D] (every other path);
      combine  combine_slots out of the GEMMs' output (computed once beforehand).
    Each fn returns what its part makes (tests check it against the strategy's own). The bound is the rest. bench_cpu
    times each part right after the bound (timing.after): in a forward the parts follow GEMMs that streamed the
    weights through the caches, and timed warm, in a loop of themselves, they cost from a quarter to most of that."""
    D, F = x.shape[1], w2.shape[2]
    f = forward_plan(x, r.topk_ids, w13, w2)
    plan = f.plan

    def plan_part():
        return forward_plan(x, r.topk_ids, w13, w2).plan

    if f.path == "batched":
        C, src = plan.rows.capacity, plan.src
        chunks = padded_chunks(plan.rows, D, F, x.element_size())
        ys = padded_ffn(x, plan.rows, w13, w2, src=src)  # [E*C, D]

        def gather():
            return [x.index_select(0, src[e0 * C:e1 * C]) for e0, e1 in chunks]  # [e*C, D] each
    else:
        torch.index_select(x, 0, plan.token_ids, out=f.xs)
        ys = _run(f.path, f.sizes, f.xs, f.bounds, w13, w2, f.xs.clone())  # [N, D]

        def gather():
            return torch.index_select(x, 0, plan.token_ids, out=x.new_empty(f.bounds[-1], D))  # the permute

    def combine():
        return combine_slots(ys, plan.slot_rows, r.topk_weights, dropped=f.dropped)

    return {"grouped:plan": plan_part, "grouped:gather": gather, "grouped:combine": combine}


def _paths(layer: MoELayer, counts: list[int], fns: dict) -> dict[str, str]:
    """{provider: grouped.ffn_path} for the bound and the grouped strategy (packed weights where the layer is) and
    grouped_plain (plain weights): which of ffn_rows's ways each case's expert GEMMs took."""
    bounds = [0, *itertools.accumulate(counts)]  # [E+1]
    rows = layer.w13.new_empty(bounds[-1], layer.w13.shape[2])  # [N, D]: only its shape and layout are read
    paths = {BOUND: ffn_path(rows, bounds, layer.w13, layer.w2, rows.new_empty(rows.shape))}
    if "grouped" in fns:
        paths["grouped"] = ffn_path(rows, bounds, layer.w13, layer.w2, rows)  # ys over xs, as the strategy does
    if PLAIN in fns:
        paths[PLAIN] = ffn_path(rows, bounds, layer.w13.detach(), layer.w2.detach(), rows)
    return paths


def _batched_mm_bytes(shape: Shape, T: int, elt: int) -> int:
    return T * shape.top_k * 3 * shape.d_model * shape.d_ff * elt  # gathered w13 + w2 per (token, choice)


def _providers(layer: MoELayer, x: torch.Tensor, r, strategies, peers, shape: Shape, T: int) -> tuple[dict, dict]:
    """({name: fn()}, {name: why skipped}) for one case."""
    fns, skipped = {}, {}
    for s in strategies:
        fn = get_strategy(s)
        fns[s] = lambda fn=fn: fn(x, r, layer.w13, layer.w2)
    if "grouped" in strategies and layer.prepacked:  # other tensor objects on the same storage: not packed
        w13, w2, fn = layer.w13.detach(), layer.w2.detach(), get_strategy("grouped")
        fns[PLAIN] = lambda: fn(x, r, w13, w2)
    hf = hf_experts_providers(layer) if peers else {}
    for p in peers:
        impl = hf.get(p.removeprefix("hf_"))
        if impl is None:
            skipped[p] = "not available in this transformers" if hf else "transformers is not installed"
        elif p == "hf_batched_mm" and _batched_mm_bytes(shape, T, x.element_size()) > BATCHED_MM_BYTES:
            skipped[p] = (f"gathers {_batched_mm_bytes(shape, T, x.element_size()) / 2**30:.1f} GiB of weights "
                          f"(> {BATCHED_MM_BYTES / 2**30:.0f} GiB)")
        else:
            fns[p] = lambda impl=impl: impl(x, r)
    return fns, skipped


def bench_cpu(shapes, token_counts, dtypes, strategies=CPU_STRATEGIES, peers=CPU_PEERS, reps: int = 7,
              threads: int | None = None, progress_bar: bool = True, clock=None, prepack: bool = True,
              confirm: int = CONFIRM_ROUNDS) -> list[dict]:
    """Rows {shape, dtype, tokens, provider, status, seconds (median), iqr_s, ratio_to_bound, threads, times_s,
    weights, warning?}. ratio_to_bound is paired (timing.paired_ratio: the median of the per-round ratios);
    times_s the per-round seconds; weights "packed" where the provider's GEMMs run by the prepacked layer's choice
    (the grouped strategy and the bound), else "plain"; the bound's row of a prepacked layer also holds
    gemm_methods {"w13": {rows: method}, "w2": ...}: what prepack timed fastest per row count; the rows of the
    bound, grouped and grouped_plain hold path: the way grouped.ffn_rows ran their expert GEMMs (grouped.ffn_path).
    At T >= PARTS_MIN_TOKENS the rows "grouped:plan", "grouped:gather" and "grouped:combine" (part_of "grouped", no
    weights, after "gemm_only") time grouped's work outside the bound (grouped_parts), in the same rounds, each call
    right after an untimed call of the bound (timing.after), as in a forward.
    confirm: where a target's limit lies inside the interval of the case's paired ratio after `reps` rounds
    (cpu_targets), `confirm` more interleaved rounds of grouped and the other side of that ratio (the bound, or
    every transformers peer: which one is the best may change) are timed and appended (timing.extend; 0: none).
    rounds: how many rounds a row holds, first_rounds (on a row with more): `reps`. Such a verdict has had two looks
    at the data; cpu_targets gives its interval the coverage that allows for both.

    shapes: a Shape or a list of them. status "ok" or "skipped" (with `reason`). threads: torch's thread count,
    pinned for every case (default: the current one). clock: see timing.time_cpu (tests pass a fake one).
    prepack: pack each layer's expert weights (MoELayer.prepack) where packing.prepack_unsupported allows.
    """
    shapes = [shapes] if isinstance(shapes, Shape) else list(shapes)
    jobs = [(sh, dt, T) for sh in shapes for dt in dtypes for T in token_counts]
    bar = progress(len(jobs), progress_bar, desc="bench cpu")
    rows, layer, layer_key = [], None, None
    for sh, dt_name, T in jobs:
        dtype = DTYPES[dt_name]
        if (sh.name, dt_name) != layer_key:  # one layer alive at a time, rebuilt per (shape, dtype)
            layer = None
            cfg = MoEConfig(sh.d_model, sh.d_ff, sh.num_experts, sh.top_k)
            layer, layer_key = MoELayer(cfg, dtype=dtype, seed=0), (sh.name, dt_name)
            if prepack and prepack_unsupported(layer.w13) is None:
                layer.prepack()
            methods = {k: {n: v["method"] for n, v in c.items()} for k, c in layer.gemm_choices().items()}
        x = torch.randn(T, sh.d_model, generator=torch.Generator().manual_seed(T)).to(dtype)  # [T, D]
        with torch.inference_mode():
            r = layer.route(x)
            counts = torch.bincount(r.topk_ids.reshape(-1), minlength=sh.num_experts).tolist()
            fns, skipped = _providers(layer, x, r, strategies, peers, sh, T)
            paths = _paths(layer, counts, fns)
            bound = gemm_only(x, counts, layer.w13, layer.w2)
            parts = ({n: after(bound, f) for n, f in grouped_parts(x, r, layer.w13, layer.w2).items()}
                     if "grouped" in fns and T >= PARTS_MIN_TOKENS else {})
            timed = {BOUND: bound, **fns, **parts}
            times = time_cpu(timed, rounds=reps, threads=threads, clock=clock)
            base = dict(shape=sh.name, dtype=dt_name, tokens=T)
            packed = {BOUND, "grouped"} if layer.prepacked else set()
            case = _case_rows(base, times, parts, paths, methods, packed)
            close = [t for t in cpu_targets(case) if _within_noise(t)] if confirm else []
            if close:  # the limit inside a verdict's interval: more rounds of its two sides narrow it
                # every peer, not just the best: more rounds may make another one the best, and it needs them too
                peers_too = {n for n in timed if n.startswith("hf_")} if any("peer" in t for t in close) else set()
                names = sorted({"grouped"} | {BOUND for t in close if "peer" not in t} | peers_too)
                more = time_cpu({n: timed[n] for n in names}, rounds=confirm, threads=threads, clock=clock)
                times = {n: extend(t, more[n]) if n in more else t for n, t in times.items()}
                case = _case_rows(base, times, parts, paths, methods, packed, first=reps)
        rows += case
        rows += [dict(base, provider=p, status="skipped", reason=why) for p, why in skipped.items()]
        bar.update(1)
    bar.close()
    return rows


def _case_rows(base: dict, times: dict, parts: dict, paths: dict, methods: dict, packed: set,
               first: int | None = None) -> list[dict]:
    """bench_cpu's rows of one case from its timings (time_cpu, maybe extended): one row per provider and part;
    first: the rounds timed before the extension, kept as first_rounds on each row that has more."""
    # a part is meant to take less than the bound: only its spread can make it untrusted
    flags = {**distrust({n: t for n, t in times.items() if n not in parts}, BOUND),
             **distrust({n: t for n, t in times.items() if n in parts})}
    rows = []
    for name, t in times.items():
        row = dict(base, provider=name, status="ok", seconds=t["median_s"], iqr_s=t["iqr_s"],
                   ratio_to_bound=paired_ratio(t, times[BOUND]), threads=t["threads"], rounds=len(t["times_s"]),
                   times_s=t["times_s"], weights="packed" if name in packed else "plain")
        if first is not None and len(t["times_s"]) > first:
            row["first_rounds"] = first
        if name == BOUND and methods:
            row["gemm_methods"] = methods
        if name in paths:
            row["path"] = paths[name]
        if name in parts:  # no weights of its own: a part of the grouped strategy's forward, timed after the bound
            del row["weights"]
            row.update(part_of="grouped", after=BOUND)
        if name in flags:
            row["warning"] = flags[name]
        rows.append(row)
    return rows


def cpu_targets(rows: list[dict], min_tokens: int = BOUND_MIN_TOKENS, bound_limit: float = 1.10) -> list[dict]:
    """The CPU targets on bench_cpu's rows, one entry per measured case; never "met" where not measured.

    - grouped <= bound_limit x the GEMM-only bound at every T >= min_tokens (each shape and dtype);
    - grouped <= 1.0 x the best transformers experts implementation measured at the same case (the one with
      the lowest median; the ratio paired round by round, as ratio_to_bound is).
    A bound entry of a case with part rows (grouped_parts) also holds parts {part: ratio to the bound} and
    bound_plus_parts, 1 + their sum: the bound plus the work it leaves out, each part timed as a forward meets it
    (right after the bound's GEMMs): what grouped's ratio comes to where its GEMMs take the bound's time.
    trusted: no provider row of the case carries a warning (the part rows' own spreads do not count).
    ci [lo, hi] and coverage: the distribution-free interval of the paired ratio (timing.paired_ratio_ci: two order
    statistics of the per-round ratios, 95 % from 6 rounds on) and rounds, how many rounds it pairs, where the rows
    kept their rounds. Where bench_cpu timed more rounds because the first ones left the verdict within noise, the
    interval is the one over all of them, and its coverage is lowered by what the first look's interval could miss
    (either look's interval may miss the median: at least 1 - (1 - c_first) - (1 - c_all), 95.5 % for 7 + 24); a
    limit inside it is within the noise of the run: the verdict could go either way on a rerun."""
    ok = {(r["shape"], r["dtype"], r["tokens"], r["provider"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for (sh, dt, T, prov), r in sorted(ok.items()):
        if prov != "grouped":
            continue
        case = dict(shape=sh, dtype=dt, tokens=T, trusted=not any(
            "warning" in v for (s2, d2, t2, _), v in ok.items()
            if (s2, d2, t2) == (sh, dt, T) and not v.get("part_of")))
        if T >= min_tokens:
            entry = dict(case, target=f"grouped <= {bound_limit:.2f}x the GEMM-only bound at T >= {min_tokens}",
                         value=r["ratio_to_bound"], limit=bound_limit, met=bool(r["ratio_to_bound"] <= bound_limit),
                         **_interval(r, ok.get((sh, dt, T, BOUND))))
            parts = {p.split(":", 1)[1]: v["ratio_to_bound"] for (s2, d2, t2, p), v in ok.items()
                     if (s2, d2, t2) == (sh, dt, T) and v.get("part_of") == "grouped"}
            if parts:  # what the bound leaves out, each part as a forward meets it
                entry.update(parts=parts, bound_plus_parts=1.0 + sum(parts.values()))
            out.append(entry)
        peers = {p: v["seconds"] for (s2, d2, t2, p), v in ok.items() if (s2, d2, t2) == (sh, dt, T)
                 and p.startswith("hf_")}
        if peers:
            best = min(peers, key=peers.get)
            value = paired_ratio(_timing(r), _timing(ok[(sh, dt, T, best)]))
            out.append(dict(case, target="grouped <= 1.0x the best transformers experts implementation",
                            value=value, limit=1.0, peer=best, met=bool(value <= 1.0),
                            **_interval(r, ok[(sh, dt, T, best)])))
    return out


def _interval(row: dict, base: dict | None) -> dict:
    """{ci: [lo, hi], coverage, rounds} of row's paired ratio to base (timing.paired_ratio_ci; rounds: how many
    it pairs), or {} without rounds."""
    ci = paired_ratio_ci(_timing(row), _timing(base)) if base is not None else None
    if ci is None:
        return {}
    n, first = min(len(row["times_s"]), len(base["times_s"])), row.get("first_rounds", base.get("first_rounds"))
    coverage = ci[2]
    if first is not None and n > first:  # looked at after `first` rounds, then after n: either interval may miss
        coverage -= 1 - median_ci_coverage(first)
    return dict(ci=[ci[0], ci[1]], coverage=coverage, rounds=n)


def _within_noise(target: dict) -> bool:
    """Whether a cpu_targets entry's limit lies inside the interval of its ratio (the verdict could flip)."""
    return bool(target.get("ci")) and target["ci"][0] <= target["limit"] <= target["ci"][1]


def _timing(row: dict) -> dict:
    """A row as timing.paired_ratio reads it (per-round times where the row kept them)."""
    return dict(median_s=row["seconds"], times_s=row.get("times_s"))


def print_table(rows: list[dict], targets: list[dict] | None = None) -> None:
    """One line per row: ms (median +- IQR/2) and the ratio to the GEMM-only bound; then the targets."""
    if any(r.get("weights") == "packed" for r in rows):
        print(f"weights: grouped and {BOUND} run each expert GEMM by the method MoELayer.prepack timed fastest for its "
              f"row count (torch.mm, a column split, or the weights packed once for oneDNN); {PLAIN} and every other "
              "provider on the plain weights")
        seen = set()
        for r in rows:
            if r.get("gemm_methods") and (r["shape"], r["dtype"]) not in seen:
                seen.add((r["shape"], r["dtype"]))
                print(f"  {r['shape']} {r['dtype']}: " + "; ".join(
                    f"{w} " + " ".join(f"{n}:{m}" for n, m in ms.items()) for w, ms in r["gemm_methods"].items()))
    print(f"{'shape':10} {'dtype':5} {'T':>5} {'provider':14} {'ms':>10} {'+-':>7} {'x bound':>8}"
          + ("  path" if any(r.get("path") for r in rows) else ""))
    for r in rows:
        head = f"{r['shape']:10} {r['dtype']:5} {r['tokens']:5d} {r['provider']:14}"
        if r.get("status", "ok") != "ok":
            print(f"{head} {'-':>10} {'':7} {'':8}  skipped: {r.get('reason', '')}")
            continue
        print(f"{head} {r['seconds'] * 1e3:10.3f} {r.get('iqr_s', 0.0) * 5e2:7.3f} {r['ratio_to_bound']:8.2f}"
              + (f"  {r['path']}" if r.get("path") else "") + (f"  ! {r['warning']}" if r.get("warning") else ""))
    for t in targets or []:
        mark = "met   " if t["met"] else "MISSED"
        peer = f" ({t['peer']})" if t.get("peer") else ""
        note = "" if t["trusted"] else "  (untrusted case)"
        if t.get("ci"):
            lo, hi = t["ci"]
            noise = "; the limit lies inside it: within this run's noise" if _within_noise(t) else ""
            over = f" over {t['rounds']} rounds" if t.get("rounds") else ""
            note = f"  [{100 * t['coverage']:.0f} % interval {lo:.2f}-{hi:.2f}x{over}{noise}]" + note
        parts = ("; outside the bound, each part right after its GEMMs: "
                 + " + ".join(f"{p} {v:.3f}x" for p, v in t["parts"].items())
                 + f", bound + parts {t['bound_plus_parts']:.2f}x") if t.get("parts") else ""
        print(f"{mark} {t['target']}: {t['shape']} {t['dtype']} T={t['tokens']}: {t['value']:.2f}x{peer}{parts}{note}")
    if targets:
        close = sum(map(_within_noise, targets))
        print(f"targets: {sum(t['met'] for t in targets)} of {len(targets)} met; {close} verdict(s) within this run's "
              "noise (the limit inside the interval of the paired ratio)")
    n = sum(1 for r in rows if r.get("warning"))
    if n:
        print(f"WARNING: {n} row(s) marked '!': {BUSY}")
