"""Tune fused_moe's tile configs on the GPU at hand: time a few candidates per token count, keep the fastest.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, r = T*K/E average rows per expert.
For each shape and T: one routing (random x through the layer's router, as the benchmark draws it),
the output of the untuned default config checked against the `grouped` strategy, then each candidate
(kernels.configs.candidate_configs: the default plus a few tiles around it for this r) compiled, checked against the
default's output (a config that disagrees is never kept) and timed with the benchmark's Timer (triton's
do_bench on CUDA: L2 flushed before each call). The fastest becomes the table entry for T. Shared memory and
SM count are those of the GPU at hand (backend.device_limits). The JSON is rewritten after every
token count, so a run that is stopped keeps everything it measured.
The JSON written here (tuned.json, with a chart tuned.png) is what load_tuned_configs() registers;
copy it into moe_ref/kernels/tuned/ to ship it (loaded on import, used only on the GPU it names).

  python -m moe_ref.bench tune --shapes mixtral qwen3 --out build/tune       # on a GPU
  python -m moe_ref.bench tune --device cpu --shapes cpu-small --tokens 1 4  # dry run (interpreter;
                                                                               # its times mean nothing)
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from ..kernels.backend import ENABLE_HINT, device_limits, interpreter_active
from ..kernels.configs import TUNED_KIND, candidate_configs
from ..kernels.fused_moe import TileConfigShrunk, fused_moe
from ..strategy import get_strategy
from .providers import make_layer, make_routing, max_rel_err, output_tensor
from .report import device_info, have_matplotlib, write_json
from .shapes import DTYPES, SHAPES, dtype_name
from .sweep import AGREE_RTOL as REF_RTOL
from .timing import Timer

__all__ = ["tune", "tune_shape", "run_tune", "AGREE_RTOL"]

AGREE_RTOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}  # vs the default's output



def tune_shape(shape, tokens, *, dtype=torch.bfloat16, device="cuda", timer=None, limit: int = 8,
               deadline: float | None = None, seed: int = 0, log=print, on_token=None) -> dict:
    """One entry of the tuned file for `shape` (moe_ref.bench.Shape): table {T: best config} and every trial.

    deadline: time.perf_counter() value after which no more candidates are timed (T left untuned keep
    the default; they are listed in `untuned`). on_token(entry) runs after each token count, however it
    ended (tune() saves the file there)."""
    device = torch.device(device)
    limits = device_limits(device)
    timer = timer or Timer(device, budget_ms=40.0, min_reps=3)
    E, D, F, K = shape.num_experts, shape.d_model, shape.d_ff, shape.top_k
    el = torch.empty(0, dtype=dtype).element_size()
    entry = dict(shape=shape.name, E=E, D=D, F=F, K=K, table={}, trials=[], untuned=[], speedup_vs_default={})
    layer = make_layer(shape, dtype, device, seed)
    w13, w2 = layer.w13, layer.w2
    grouped = get_strategy("grouped")
    for T in tokens:
        try:
            if deadline is not None and time.perf_counter() > deadline:
                entry["untuned"].append(dict(tokens=T, reason="time limit reached"))
                continue
            x, r = make_routing(layer, T, 0.0, seed + T)
            ids, wts = r.topk_ids, r.topk_weights
            with torch.inference_mode():
                y_ref = output_tensor(grouped(x, r, w13, w2)).float()  # [T, D] the definitional path, for the default
                y_default = None  # [T, D] the default config's output, for the candidates
                for i, cfg in enumerate(candidate_configs(T, E, K, D, F, el, limit, limits)):
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
        finally:  # every token count saved as soon as it is done: a run stopped later keeps it
            if on_token:
                on_token(entry)
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
    result = dict(kind=TUNED_KIND, machine=device_info(device), dtype=dtype_name(dtype),
                  settings=dict(tokens=list(tokens), shapes=[s.name for s in shapes], limit=limit,
                                time_limit_s=time_limit_s), entries=[], complete=False)
    for shape in shapes:
        log(f"tuning {shape.name} (E={shape.num_experts}, D={shape.d_model}, F={shape.d_ff}, K={shape.top_k})")
        done = list(result["entries"])

        def progress(entry, done=done):  # after each token count: the shapes done, and this one so far
            result["entries"] = done + [entry]
            result["elapsed_s"] = time.perf_counter() - t0
            if on_progress:
                on_progress(result)

        result["entries"] = done + [tune_shape(shape, tokens, dtype=dtype, device=device, limit=limit,
                                               deadline=deadline, log=log, on_token=progress)]
    result["complete"] = not any(e["untuned"] for e in result["entries"])
    result["elapsed_s"] = time.perf_counter() - t0
    return result



def run_tune(args) -> int:
    """python -m moe_ref.bench tune: tuned.json (rewritten after every token count) and tuned.png."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tuning needs a CUDA device and torch.cuda.is_available() is False here; "
              "use --device cpu (with TRITON_INTERPRET=1) for a dry run")
        return 2
    if any(t < 1 for t in args.tokens):
        print(f"--tokens must be >= 1, got {args.tokens}")
        return 2
    if args.limit < 1:
        print(f"--limit must be >= 1 (the default config is always the first), got {args.limit}")
        return 2
    if device.type != "cuda" and not interpreter_active():
        print(f"on {device} the kernels run only under Triton's interpreter: {ENABLE_HINT}")
        return 2
    path = Path(args.out) / "tuned.json"
    result = tune([SHAPES[s] for s in args.shapes], args.tokens, dtype=DTYPES[args.dtype], device=device,
                  limit=args.limit, time_limit_s=args.time_limit, on_progress=lambda r: write_json(r, path))
    write_json(result, path)
    if have_matplotlib():
        from ..plots import plot_tuning

        plot_tuning(result).savefig(path.with_suffix(".png"), dpi=120, bbox_inches="tight")
        print(f"wrote {path.with_suffix('.png')}")
    else:
        print(f"no matplotlib here: no chart (draw it elsewhere: python -m moe_ref.bench plot {path})")
    print(f"wrote {path} ({'complete' if result['complete'] else 'partial: some token counts untuned'}); "
          f"use it with load_tuned_configs('{path}') or `python -m moe_ref.bench gpu --tuned {path}`")
    return 0
