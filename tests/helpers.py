"""Test helpers: random configurations and a comparison that shows what differs."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import moe_ref

# tolerances against the float64 reference, by compute dtype (documented in docs/testing.md)
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float16: dict(rtol=2e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=2e-2),
}


def make_case(T, D, F, E, K, *, dtype=torch.float64, seed=0, renormalize=True):
    """A layer and an input x [T, D] with deterministic random values."""
    cfg = moe_ref.MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, renormalize=renormalize)
    layer = moe_ref.MoELayer(cfg, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, D, generator=g).to(dtype)
    return layer, x


@st.composite
def configs(draw):
    """(T, D, F, E, K, renormalize, seed): E=1 and K=E, T=0, odd sizes among them."""
    E = draw(st.sampled_from([1, 2, 3, 8, 16]))
    K = draw(st.integers(1, E))
    T = draw(st.sampled_from([0, 1, 2, 7, 33, 64]))
    D = draw(st.sampled_from([4, 16, 33]))
    F = draw(st.sampled_from([3, 8, 22]))
    return T, D, F, E, K, draw(st.booleans()), draw(st.integers(0, 10_000))


def hand_routing(ids, weights=None):
    ids = torch.as_tensor(ids, dtype=torch.long)
    if weights is None:
        weights = torch.full(ids.shape, 1.0 / max(ids.shape[1], 1))
    return moe_ref.Routing(topk_ids=ids, topk_weights=torch.as_tensor(weights, dtype=torch.float32))


def assert_close(actual, expected, dtype=None, msg=""):
    tol = TOL[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), **tol, msg=lambda m: f"{msg}\n{m}")


def cpu_sweep(shape, providers, tokens, **kw):
    """The device sweep on the CPU at a tiny shape: timer, limits and sweep at their smallest (a logic check)."""
    from moe_ref.bench import sweep, timing

    timer = timing.Timer("cpu", budget_ms=1, min_reps=1)
    limits = timing.measure_limits("cpu", torch.float32, timer, copy_bytes=1 << 16, matmul_sizes=(32,))
    return sweep.run_sweep([shape], list(tokens), providers, device="cpu", dtype=torch.float32, timer=timer,
                           limits=limits, progress=False, **kw)


class _Node(dict):
    """A dict read with attributes, as nbformat's NotebookNode (nb.cells[0].source)."""

    __getattr__ = dict.__getitem__


def _node(v):
    if isinstance(v, dict):
        return _Node({k: _node(x) for k, x in v.items()})
    return [_node(x) for x in v] if isinstance(v, list) else v


def read_notebook(path):
    """A notebook (v4) as nested attribute dicts, sources joined into strings, without importing nbformat.

    nbformat pulls in jsonschema (seconds of import per process): the fast tier reads notebooks with this,
    and leaves the schema check (nbformat.validate) to the slow tier.
    """
    import json
    from pathlib import Path

    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    for c in nb["cells"]:
        if isinstance(c.get("source"), list):
            c["source"] = "".join(c["source"])
    return _node(nb)


def examples(n: int) -> int:
    """A test's own hypothesis example count, capped by MOE_REF_HYPOTHESIS_EXAMPLES when that is set (make check)."""
    import os

    cap = os.environ.get("MOE_REF_HYPOTHESIS_EXAMPLES")
    return min(n, int(cap)) if cap else n
