"""Tile configurations for the fused MoE GEMMs, chosen by token count.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, M = T*K/E average rows per expert.
A config is a dict:
  BLOCK_M      rows per tile; also the alignment block of align_block_size (one expert per M-block)
  BLOCK_N      output columns per tile
  BLOCK_K      reduction step
  GROUP_M      M-blocks walked together before moving along N (L2 reuse of weight tiles)
  num_warps, num_stages   Triton launch options
  "ALIGN":     optional: how align_block_size runs ("auto", "one_program", "chunked"; default "auto")
  "down":      optional dict overriding BLOCK_N/BLOCK_K/GROUP_M/num_warps/num_stages for the second GEMM,
               and its SPLIT_K (default 1): the reduction over F cut into chunks, one program each, partial
               sums added by the combine (more programs when few experts are hit; a tuning candidate)
Decode-sized batches (few rows per expert) are bound by reading the expert weights: they get
BLOCK_M=16 so little work is spent on padding rows, and deep pipelines to stream weights.
Prefill-sized batches are bound by the tensor cores: they get 128x128 tiles on 8 warps.
Every default is fitted to the shared memory one block may use (backend.device_limits: read from the
CUDA device, the sm_90 values without one).
Tuned tables per GPU can be registered with register_tuned_configs(), or loaded from the JSON that
`python -m moe_ref.bench tune` writes (load_tuned_configs); tables in moe_ref/kernels/tuned/*.json ship with
the package and are loaded on import. The tuned token count nearest to T (on a log scale) wins, as vLLM
does with its per-GPU JSON configs, but only within a factor of TUNED_REACH: a table measured at
T <= 16 says nothing about T = 16384, which then gets the default.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

from .align import ALIGN_METHODS, ONE_PROGRAM_MAX_SLOTS
from .backend import SM90_LIMITS, DeviceLimits, cdiv

# {device_name: {(E, D, F, dtype_name): {T: config}}}; filled by register_tuned_configs()
TUNED_CONFIGS: dict[str, dict[tuple, dict[int, dict]]] = {}

# under the interpreter every program instance runs in numpy: few, large-ish tiles are fastest
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=1)

CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")

TUNED_REACH = 2  # a tuned entry for t tokens serves t / TUNED_REACH <= T <= t * TUNED_REACH


def register_tuned_configs(device_name: str, E: int, D: int, F: int, dtype_name: str,
                           table: dict[int, dict]) -> None:
    """Add a tuned table {T: config} for one GPU (torch.cuda.get_device_name()) and MoE shape."""
    if not table:
        raise ValueError("table must map token counts to configs, got an empty table")
    for t, cfg in table.items():
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"table keys must be token counts (ints >= 1), got {t!r}")
        check_config(cfg, f"table[{t}]")
    TUNED_CONFIGS.setdefault(device_name, {})[(E, D, F, dtype_name)] = {t: dict(c) for t, c in table.items()}


def check_config(cfg: dict, name: str = "config") -> None:
    """Raise ValueError unless cfg has the keys above with tl.dot-compatible tile sizes."""
    if not isinstance(cfg, dict):
        raise TypeError(f"{name} must be a dict, got {type(cfg).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{name} lacks {missing}; a config needs {CONFIG_KEYS}")
    for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = cfg[k]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"{name}[{k!r}] must be a power of two >= 16 (tl.dot tiles), got {v!r}")
    if cfg.get("ALIGN", "auto") not in ALIGN_METHODS:
        raise ValueError(f"{name}['ALIGN'] must be one of {ALIGN_METHODS}, got {cfg['ALIGN']!r}")
    down = cfg.get("down", {})
    for k, v in down.items():
        if k == "SPLIT_K":
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}['down']['SPLIT_K'] must be an int >= 1, got {v!r}")
            continue
        if k not in CONFIG_KEYS or k == "BLOCK_M":
            raise ValueError(f"{name}['down'] may override {CONFIG_KEYS[1:]} and set SPLIT_K, got {k!r}")
        if k in ("BLOCK_N", "BLOCK_K") and (not isinstance(v, int) or v < 16 or v & (v - 1)):
            raise ValueError(f"{name}['down'][{k!r}] must be a power of two >= 16, got {v!r}")


def default_config(T: int, E: int, K: int, D: int, F: int) -> dict:
    """Heuristic tiles by average rows per expert (T*K/E). Untuned starting points for Hopper, before
    fit_to_dtype (get_config applies it)."""
    rows_per_expert = T * K / max(E, 1)
    if rows_per_expert <= 16:  # decode: weight-bandwidth bound; 64 columns per tile keep each weight row
        # read a 128-byte line (bf16) or more, split-K (a tuning candidate) adds programs where few experts are hit
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)
    elif rows_per_expert <= 128:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=4, num_warps=4, num_stages=3)
    elif rows_per_expert <= 512:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    else:  # prefill: tensor-core bound; 4 stages where shared memory allows (fit_to_dtype trims them)
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    return cfg


def get_config(T: int, E: int, K: int, D: int, F: int, dtype_name: str = "bfloat16",
               device_name: str | None = None, interpreter: bool = False,
               limits: DeviceLimits = SM90_LIMITS) -> dict:
    """The config for T tokens: a tuned table entry (nearest T, log scale, within TUNED_REACH) when one
    exists, else default_config fitted to the shared memory of `limits` (backend.device_limits)."""
    if interpreter:
        return dict(INTERPRETER_CONFIG)
    entry = tuned_entry(T, E, D, F, dtype_name, device_name)
    if entry is not None:
        return copy.deepcopy(entry)
    return fit_to_dtype(default_config(T, E, K, D, F), _element_size(dtype_name), limits.smem_per_block)


def tuned_entry(T: int, E: int, D: int, F: int, dtype_name: str, device_name: str | None) -> dict | None:
    """The registered config for this GPU, shape and dtype whose token count t is nearest to T (log scale)
    among those with t / TUNED_REACH <= T <= t * TUNED_REACH (not a copy); None if there is none."""
    table = TUNED_CONFIGS.get(device_name or "", {}).get((E, D, F, dtype_name))
    near = [t for t in table or () if t <= T * TUNED_REACH and T <= t * TUNED_REACH]
    if not near:
        return None
    return table[min(near, key=lambda t: (abs(math.log(t) - math.log(T)), t))]


def launch_configs(T: int, E: int, K: int, D: int, F: int, dtype_name: str, device_name: str | None,
                   interpreter: bool, limits: DeviceLimits = SM90_LIMITS) -> tuple[dict, dict]:
    """(first GEMM options, second GEMM options) = split_config(get_config(...)), without the copies and
    checks on every call: the launchers' fast path (shared dicts: never mutate them)."""
    if interpreter:
        return _interpreter_split()
    entry = tuned_entry(T, E, D, F, dtype_name, device_name)
    if entry is not None:
        return split_config(entry)
    return _default_split(T, E, K, D, F, _element_size(dtype_name), limits.smem_per_block)


def _element_size(dtype_name: str) -> int:
    return 4 if dtype_name == "float32" else 2


@functools.lru_cache(maxsize=4096)
def _default_split(T: int, E: int, K: int, D: int, F: int, element_size: int, budget: int) -> tuple[dict, dict]:
    return split_config(fit_to_dtype(default_config(T, E, K, D, F), element_size, budget))


@functools.lru_cache(maxsize=None)
def _interpreter_split() -> tuple[dict, dict]:
    return split_config(INTERPRETER_CONFIG)


def smem_bytes(cfg: dict, element_size: int, weight_tiles: int = 2) -> int:
    """Shared memory of the software pipeline: stages x (A tile + weight tiles); the first GEMM has 2.

    An upper bound of what Triton allocates (it keeps num_stages or num_stages - 1 buffers of each tile)."""
    return cfg["num_stages"] * (cfg["BLOCK_M"] * cfg["BLOCK_K"] + weight_tiles * cfg["BLOCK_K"] * cfg["BLOCK_N"]) \
        * element_size


def fits_smem(cfg: dict, element_size: int, budget: int = SM90_LIMITS.smem_per_block) -> bool:
    """Whether both GEMMs of cfg plan for at most `budget` bytes of shared memory (smem_bytes)."""
    first, second = split_config(cfg)
    return smem_bytes(first, element_size, 2) <= budget and smem_bytes(second, element_size, 1) <= budget


def fit_to_dtype(cfg: dict, element_size: int, budget: int = SM90_LIMITS.smem_per_block) -> dict:
    """Shrink num_stages, then BLOCK_K (not below 32), until both GEMMs fit `budget` bytes of shared memory
    (DeviceLimits.smem_per_block), or as far as that goes (fits_smem says whether it got there).
    The defaults are sized for 2-byte dtypes; fp32 tiles are twice as large."""
    first, second = split_config(cfg)
    for part, tiles in ((first, 2), (second, 1)):
        while smem_bytes(part, element_size, tiles) > budget and (part["num_stages"] > 2 or part["BLOCK_K"] > 32):
            if part["num_stages"] > 2:
                part["num_stages"] -= 1
            else:
                part["BLOCK_K"] //= 2
    return dict(first, down={k: v for k, v in second.items() if k != "BLOCK_M"})


def split_config(cfg: dict) -> tuple[dict, dict]:
    """(first GEMM options, second GEMM options): 'down' overrides apply to the second only."""
    check_config(cfg)
    first = {k: cfg[k] for k in CONFIG_KEYS}
    second = dict(first, **cfg.get("down", {}))
    if "ALIGN" in cfg:  # the alignment belongs to the first GEMM's plan
        first["ALIGN"] = cfg["ALIGN"]
    return first, second


# ------------------------------------------------------------------------------ tuned tables on disk

TUNED_KIND = "moe_ref tuned configs"  # the "kind" field of a file written by `python -m moe_ref.bench tune`
TUNED_DIR = Path(__file__).parent / "tuned"  # tables shipped with the package, loaded on import


def load_tuned_configs(path: str | Path) -> int:
    """Register every table in a JSON file written by `python -m moe_ref.bench tune`; returns how many.

    A table is keyed by the GPU it was measured on (machine.device, as torch.cuda.get_device_name()
    names it), so it is used only on that GPU. Later registrations replace earlier ones."""
    path = Path(path)
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("kind") != TUNED_KIND:
        raise ValueError(f"{path} is not a tuned-config file (its 'kind' is not {TUNED_KIND!r}); "
                         "write one with `python -m moe_ref.bench tune`")
    device, dtype_name = data["machine"]["device"], data["dtype"]
    n = 0
    for entry in data["entries"]:
        if entry["table"]:
            register_tuned_configs(device, entry["E"], entry["D"], entry["F"], dtype_name,
                                   {int(t): cfg for t, cfg in entry["table"].items()})
            n += 1
    return n


for _path in sorted(TUNED_DIR.glob("*.json")):
    load_tuned_configs(_path)


# ------------------------------------------------------------------ the tuning search space (bench tune times it)

# (BLOCK_N, BLOCK_K, num_warps, num_stages) tried at each BLOCK_M; few rows per expert: weight streaming
_SMALL_TILES = ((32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3))

_LARGE_TILES = ((64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3))

WAVES = 2  # programs per SM a second GEMM should have: with fewer, SMs sit idle



def split_k_for(cfg: dict, T: int, E: int, K: int, D: int, F: int, sm_count: int = SM90_LIMITS.sm_count) -> int:
    """A SPLIT_K worth trying for cfg's second GEMM: 1 unless its programs (hit experts x N-tiles, one
    M-block each at decode) fill fewer than WAVES * sm_count and F is long enough for >= 4 BLOCK_K steps
    per chunk; then the power of two that brings the programs to WAVES * sm_count, at most 8."""
    second = split_config(cfg)[1]
    programs = min(E, T * K) * cdiv(D, second["BLOCK_N"])
    steps = cdiv(F, second["BLOCK_K"])
    target = WAVES * sm_count
    if programs >= target or steps < 8:
        return 1
    n = 1
    while n * programs < target:
        n *= 2
    return max(1, min(n, 8, steps // 4))



def _key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)



def candidate_configs(T: int, E: int, K: int, D: int, F: int, element_size: int = 2, limit: int = 8,
                      limits: DeviceLimits = SM90_LIMITS) -> list[dict]:
    """The configs tried at T: the untuned default first, then (decode, few programs) the default with a split
    second GEMM, then (2..ONE_PROGRAM_MAX_SLOTS slots) the default with the four-kernel alignment, then tiles
    around it; all fitted to the shared memory of `limits` (backend.device_limits), those that cannot be
    left out."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    r = T * K / max(E, 1)
    block_ms = (16,) if r <= 16 else (16, 32) if r <= 64 else (32, 64) if r <= 256 else (64, 128)
    tiles = _SMALL_TILES if r <= 64 else _LARGE_TILES
    group_m = 1 if r <= 16 else 8
    raw = [default_config(T, E, K, D, F)]
    budget = limits.smem_per_block
    split = split_k_for(fit_to_dtype(raw[0], element_size, budget), T, E, K, D, F, limits.sm_count) if r <= 16 else 1
    if split > 1:  # decode with few programs in the second GEMM: the default with its reduction split
        raw.append(dict(raw[0], down=dict(raw[0].get("down", {}), SPLIT_K=split)))
    if T > 1 and T * K <= ONE_PROGRAM_MAX_SLOTS:  # "auto" aligns in one program here: try the four-kernel way too
        raw.append(dict(raw[0], ALIGN="chunked"))
    for bn, bk, warps, stages in tiles:  # tiles outside, BLOCK_M inside: a short limit still tries both BLOCK_M
        for bm in block_ms:
            raw.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m, num_warps=warps, num_stages=stages))
    out, seen = [], set()
    for i, cfg in enumerate(raw):
        cfg = fit_to_dtype(cfg, element_size, budget)
        if i > 0 and not fits_smem(cfg, element_size, budget):
            continue  # too large for this GPU even fitted (the default stays: it is the baseline)
        if _key(cfg) not in seen:
            seen.add(_key(cfg))
            out.append(cfg)
    return out[:limit]

