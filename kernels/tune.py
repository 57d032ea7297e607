"""Tune fused_moe's tile configs on the GPU at hand: time a few candidates per token count, keep the fastest.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, r = T*K/E average rows per expert.
For each shape and T: one routing (random x through the layer's router, as the benchmark draws it),
the output of the untuned default config checked against the `grouped` strategy, then each candidate
(candidate_configs: the default plus a few tiles around it for this r) compiled, checked against the
default's output (a config that disagrees is never kept) and timed with the benchmark's Timer (CUDA
events, L2 flushed before each call). The fastest becomes the table entry for T.
The JSON written here (tuned.json, with a chart tuned.png) is what load_tuned_configs() registers;
copy it into kernels/tuned/ to ship it (loaded on import, used only on the GPU it names).

  python -m moe_ref.kernels.tune --shapes mixtral qwen3 --out build/tune       # on a GPU
  python -m moe_ref.kernels.tune --device cpu --shapes cpu-small --tokens 1 4  # dry run (interpreter;
                                                                               # its times mean nothing)
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from moe_ref.bench import DTYPES, SHAPES, _have_matplotlib
from moe_ref.bench_gpu import AGREE_RTOL as REF_RTOL
from moe_ref.bench_gpu import Timer, _tensor, device_info, make_layer, make_routing, max_rel_err, write_json
from moe_ref.strategy import get_strategy

from .align import ONE_PROGRAM_MAX_SLOTS
from .backend import ENABLE_HINT, cdiv, interpreter_active
from .configs import TUNED_KIND, default_config, fit_to_dtype, split_config
from .fused_moe import TileConfigShrunk, fused_moe

# (BLOCK_N, BLOCK_K, num_warps, num_stages) tried at each BLOCK_M; few rows per expert: weight streaming
_SMALL_TILES = ((32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3))
_LARGE_TILES = ((64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3))
AGREE_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}  # vs the default's output
SM_PROGRAMS = 264  # two waves of 132 SMs (H100/H200): a second GEMM with fewer programs leaves SMs idle


def split_k_for(cfg: dict, T: int, E: int, K: int, D: int, F: int) -> int:
    """A SPLIT_K worth trying for cfg's second GEMM: 1 unless its programs (hit experts x N-tiles, one
    M-block each at decode) fill fewer than SM_PROGRAMS and F is long enough for >= 4 BLOCK_K steps per
    chunk; then the power of two that brings the programs to SM_PROGRAMS, at most 8."""
    second = split_config(cfg)[1]
    programs = min(E, T * K) * cdiv(D, second["BLOCK_N"])
    steps = cdiv(F, second["BLOCK_K"])
    if programs >= SM_PROGRAMS or steps < 8:
        return 1
    n = 1
    while n * programs < SM_PROGRAMS:
        n *= 2
    return max(1, min(n, 8, steps // 4))


def _key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


def candidate_configs(T: int, E: int, K: int, D: int, F: int, element_size: int = 2, limit: int = 8) -> list[dict]:
    """The configs tried at T: the untuned default first, then (decode, few programs) the default with a split
    second GEMM, then (2..ONE_PROGRAM_MAX_SLOTS slots) the default with the four-kernel alignment, then tiles
    around it; all fitted to shared memory."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    r = T * K / max(E, 1)
    block_ms = (16,) if r <= 16 else (16, 32) if r <= 64 else (32, 64) if r <= 256 else (64, 128)
    tiles = _SMALL_TILES if r <= 64 else _LARGE_TILES
    group_m = 1 if r <= 16 else 8
    raw = [default_config(T, E, K, D, F)]
    split = split_k_for(fit_to_dtype(raw[0], element_size), T, E, K, D, F) if r <= 16 else 1
    if split > 1:  # decode with few programs in the second GEMM: the default with its reduction split
        raw.append(dict(raw[0], down=dict(raw[0].get("down", {}), SPLIT_K=split)))
    if T > 1 and T * K <= ONE_PROGRAM_MAX_SLOTS:  # "auto" aligns in one program here: try the four-kernel way too
        raw.append(dict(raw[0], ALIGN="chunked"))
    for bn, bk, warps, stages in tiles:  # tiles outside, BLOCK_M inside: a short limit still tries both BLOCK_M
        for bm in block_ms:
            raw.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages))
    out, seen = [], set()
    for cfg in raw:
        cfg = fit_to_dtype(cfg, element_size)
        if _key(cfg) not in seen:
            seen.add(_key(cfg))
            out.append(cfg)
    return out[:limit]


def tune_shape(shape, tokens, *, dtype=torch.bfloat16, device="cuda", timer=None, limit: int = 8,
               deadline: float | None = None, seed: int = 0, log=print) -> dict:
    """One entry of the tuned file for `shape` (moe_ref.bench.Shape): table {T: best config} and every trial.

    deadline: time.perf_counter() value after which no more candidates are timed (T left untuned keep
    the default; they are listed in `untuned`)."""
    device = torch.device(device)
    timer = timer or Timer(device, budget_ms=40.0, min_reps=3, max_reps=20)
    E, D, F, K = shape.num_experts, shape.d_model, shape.d_ff, shape.top_k
    el = torch.empty(0, dtype=dtype).element_size()
    entry = dict(shape=shape.name, E=E, D=D, F=F, K=K, table={}, trials=[], untuned=[], speedup_vs_default={})
    layer = make_layer(shape, dtype, device, seed)
    w13, w2 = layer.w13, layer.w2
    grouped = get_strategy("grouped")
    for T in tokens:
        if deadline is not None and time.perf_counter() > deadline:
            entry["untuned"].append(dict(tokens=T, reason="time limit reached"))
            continue
        x, r = make_routing(layer, T, 0.0, seed + T)
        ids, wts = r.topk_ids, r.topk_weights
        with torch.inference_mode():
            y_ref = _tensor(grouped(x, r, w13, w2)).float()  # [T, D] the definitional path, for the default
            y_default = None  # [T, D] the default config's output, for the candidates
            for i, cfg in enumerate(candidate_configs(T, E, K, D, F, el, limit)):
                if i > 0 and deadline is not None and time.perf_counter() > deadline:
                    break  # the default (i == 0) is always measured: it is the baseline of the speedup
                trial = _trial(T, cfg, i == 0, x, ids, wts, w13, w2, y_ref if i == 0 else y_default,
                               REF_RTOL if i == 0 else AGREE_RTOL[dtype], timer)
                entry["trials"].append(trial)
                if trial["status"] != "ok":
                    log(f"  {shape.name} T={T}: config {cfg}: {trial['status']} ({trial['reason']})")
                    if i == 0:
                        break  # without a working default there is nothing to compare the others with
                    continue
                if i == 0:
                    y_default = trial.pop("y")
                trial.pop("y", None)
        measured = [t for t in entry["trials"] if t["tokens"] == T and t["status"] == "ok"]
        default = next((t for t in measured if t["default"]), None)
        best = min(measured, key=lambda t: t["median_ms"], default=None)
        if default is None:
            entry["untuned"].append(dict(tokens=T, reason="the default config failed or disagreed"))
            continue
        entry["table"][str(T)] = best["config"]
        entry["speedup_vs_default"][str(T)] = default["median_ms"] / best["median_ms"]
        log(f"  {shape.name} T={T}: default {default['median_ms']:.3f} ms, best {best['median_ms']:.3f} ms "
            f"({entry['speedup_vs_default'][str(T)]:.2f}x, {len(measured)} configs timed): {best['config']}")
        del x, r, y_ref, y_default
    del layer, w13, w2
    return entry


def _trial(T: int, cfg: dict, is_default: bool, x, ids, wts, w13, w2, y_check, rtol: float, timer) -> dict:
    """Run cfg once (compiling it), check its output against y_check, time it: a trial record (+ "y")."""
    trial = dict(tokens=T, config=cfg, default=is_default)
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TileConfigShrunk)
            y = fused_moe(x, ids, wts, w13, w2, config=cfg)  # [T, D]; compiles on the first use of cfg
            timer.sync()
        trial["first_call_s"] = time.perf_counter() - t0
        shrunk = [w for w in caught if issubclass(w.category, TileConfigShrunk)]
        if shrunk:  # the launcher shrank the config to fit shared memory: what ran is not cfg
            return dict(trial, status="shrunk", reason="; ".join(str(w.message)[:200] for w in shrunk))
        trial["max_rel_err"] = max_rel_err(y, y_check)
        if trial["max_rel_err"] > rtol:
            return dict(trial, status="wrong", reason=f"max rel err {trial['max_rel_err']:.2e} > {rtol:.0e}")
        trial.update(status="ok", **timer(lambda: fused_moe(x, ids, wts, w13, w2, config=cfg)))
        trial["y"] = y.float()
    except Exception as e:  # out of resources, a compiler error: record it, the caller tries the next config
        msg = str(e).splitlines()[0][:300] if str(e) else ""
        trial.update(status="error", reason=f"{type(e).__name__}: {msg}")
    return trial


def tune(shapes, tokens, *, dtype=torch.bfloat16, device="cuda", limit: int = 8, time_limit_s: float | None = None,
         on_progress=None, log=print) -> dict:
    """The tuned-config file (a dict) for every shape: entries in the order of `shapes`."""
    t0 = time.perf_counter()
    deadline = None if time_limit_s is None else t0 + time_limit_s
    result = dict(kind=TUNED_KIND, machine=device_info(device), dtype=str(dtype).removeprefix("torch."),
                  settings=dict(tokens=list(tokens), shapes=[s.name for s in shapes], limit=limit,
                                time_limit_s=time_limit_s), entries=[], complete=False)
    for shape in shapes:
        log(f"tuning {shape.name} (E={shape.num_experts}, D={shape.d_model}, F={shape.d_ff}, K={shape.top_k})")
        result["entries"].append(tune_shape(shape, tokens, dtype=dtype, device=device, limit=limit,
                                            deadline=deadline, log=log))
        result["elapsed_s"] = time.perf_counter() - t0
        if on_progress:
            on_progress(result)
    result["complete"] = not any(e["untuned"] for e in result["entries"])
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["mixtral", "qwen3"], choices=sorted(SHAPES))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 4096, 16384])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--limit", type=int, default=8, help="configs tried per token count (the default first)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; token counts past it stay untuned")
    p.add_argument("--device", default="cuda", help="'cpu' runs the loop under TRITON_INTERPRET=1 (a dry run)")
    p.add_argument("--out", default="build/tune", help="folder for tuned.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tuning needs a CUDA device and torch.cuda.is_available() is False here; "
              "use --device cpu (with TRITON_INTERPRET=1) for a dry run")
        return 2
    if any(t < 1 for t in args.tokens):
        p.error(f"--tokens must be >= 1, got {args.tokens}")
    if args.limit < 1:
        p.error(f"--limit must be >= 1 (the default config is always the first), got {args.limit}")
    if device.type != "cuda" and not interpreter_active():
        print(f"on {device} the kernels run only under Triton's interpreter: {ENABLE_HINT}")
        return 2
    path = Path(args.out) / "tuned.json"
    result = tune([SHAPES[s] for s in args.shapes], args.tokens, dtype=DTYPES[args.dtype], device=device,
                  limit=args.limit, time_limit_s=args.time_limit, on_progress=lambda r: write_json(r, path))
    write_json(result, path)
    if _have_matplotlib():
        from moe_ref.plots import plot_tuning

        plot_tuning(result).savefig(path.with_suffix(".png"), dpi=120, bbox_inches="tight")
        print(f"wrote {path.with_suffix('.png')}")
    else:
        print(f"no matplotlib here: no chart (draw it elsewhere: moe_ref.plots.plot_tuning(json.load(open('{path}'))))")
    print(f"wrote {path} ({'complete' if result['complete'] else 'partial: some token counts untuned'}); "
          f"use it with load_tuned_configs('{path}') or `python -m moe_ref.bench --gpu --tuned {path}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
