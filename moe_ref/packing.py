"""Prepacked expert weights: each expert's CPU weight reordered once into the blocked layout oneDNN's GEMM reads.

Legend: E experts, N output columns, K inputs (w [E, N, K]: w13 [E, 2F, D] or w2 [E, D, F]), n rows of one expert.
A GEMM on a plain row-major weight makes oneDNN reorder that weight into its own blocked layout on every call, and
torch's float32 GEMM (MKL) keeps a product with few rows on one thread. At decode the weight is read once per call
and both costs are the whole call: on this project's 2-core development machine, 1 row by a [4096, 1024] bf16
weight takes ~0.65-0.8 ms with torch.mm and ~0.3-0.4 ms on the packed weight (memory speed). CPU inference stacks
pack weights once, when a model is loaded (IPEX, oneDNN graph, torch.compile's freezing, llama.cpp's repacking).

prepack(w13, w2) packs every expert of the given weight stacks and remembers them; the grouped strategy's GEMMs
(grouped.ffn_rows) then run on the packed copies for those very tensors. Packing does not pay everywhere (oneDNN has
a fixed cost per call that a small float32 GEMM on few rows never earns back on some machines), so by default
prepack also times the plain and packed GEMMs on the weight itself at a few row counts (moe_ref.cpu_gemm) and keeps
the fastest for each (`PackedWeight.choice`); where the packed copy never wins it is not kept. tune=False packs
and always uses the packed copy. Packing is explicit (MoELayer.prepack()) because it costs a second copy of the
expert weights and a moment of timing, and because a packed copy does not follow changes made to the weights
afterwards: a change made through the tensor (an in-place op, load_state_dict, copy_ under no_grad) bumps its
version counter, so the next call finds the copy stale, warns and uses the plain weights; a change made through
`.data` bypasses that counter and is not seen: call prepack again after it (and after changing torch's threads).
Packed GEMMs give each output the same products as torch.mm, summed in another order: equal within rounding.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .cpu_gemm import GemmChoice, choose_gemms, fixed_choice, packed_linear

__all__ = ["PACK_DTYPES", "PackedWeight", "prepack", "unpack", "packed_for", "prepack_unsupported"]

PACK_DTYPES = (torch.float32, torch.bfloat16)
_PACKS: dict[int, PackedWeight] = {}  # id(weight) -> its packed copy; an entry goes when its weight is freed


def _stamp(w: torch.Tensor) -> tuple:
    """What a packed copy was made from: storage, geometry, dtype and the version counter (bumped by in-place ops)."""
    return (w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w._version)


def prepack_unsupported(w: torch.Tensor) -> str | None:
    """Why w cannot be packed (None when it can): a 3-D CPU tensor in PACK_DTYPES, tracked, with oneDNN here."""
    if not isinstance(w, torch.Tensor):
        return f"expected a torch.Tensor, got {type(w).__name__}"
    if w.dim() != 3:
        return f"expected an expert weight stack [E, N, K], got shape {list(w.shape)}"
    if w.device.type != "cpu":
        return f"packed weights are for CPU GEMMs; this weight is on {w.device}"
    if w.dtype not in PACK_DTYPES:
        return f"packed weights support {[str(d) for d in PACK_DTYPES]}, got {w.dtype}"
    if w.is_inference():
        return ("an inference tensor has no version counter, so a packed copy could not tell when it went stale; "
                "create the weights outside torch.inference_mode()")
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return f"this torch ({torch.__version__}) has no oneDNN linear with packed weights"
    if w.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "oneDNN has no bfloat16 GEMM on this CPU"
    return None


class PackedWeight:
    """The prepared copies of one expert weight stack w [E, N, K] and the GEMM method to use per row count.

    choice: a cpu_gemm.GemmChoice, timed on w (tune=True; `measure` replaces the timer, for tests) or "packed"
    everywhere (tune=False). experts: E opaque oneDNN tensors, [N, K] each, in its blocked layout, for mm(e, a, out);
    None where the choice never uses them (the plain weight is faster at every row count: no second copy).
    """

    def __init__(self, w: torch.Tensor, tune: bool = True, measure=None):
        why = prepack_unsupported(w)
        if why is not None:
            raise ValueError(f"cannot prepack this weight: {why}")
        self.stamp = _stamp(w)
        self.shape = tuple(w.shape)  # [E, N, K]
        with torch.no_grad():
            experts = tuple(torch.ops.mkldnn._reorder_linear_weight(w[e].contiguous(), None)
                            for e in range(w.shape[0]))  # E opaque oneDNN tensors, [N, K] each
        self.choice: GemmChoice = choose_gemms(w, experts, measure=measure) if tune else fixed_choice("packed")
        self.experts = experts if self.choice.uses_packed else None
        self.warned_threads = False

    def fresh_for(self, w: torch.Tensor) -> bool:
        """True while w is the tensor this copy was packed from, unchanged through its version counter."""
        return _stamp(w) == self.stamp

    def mm(self, e: int, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [n, N] = a [n, K] @ w[e].t() on the oneDNN-packed copy (a new [n, N] product copied into out)."""
        return packed_linear(a, self.experts[e], out)


def prepack(*weights: torch.Tensor, tune: bool = True, measure=None) -> None:
    """Pack each expert weight stack (w13 [E, 2F, D], w2 [E, D, F]) for the grouped strategy's CPU GEMMs.

    tune: time the plain and packed GEMMs on each weight and use the faster per row count (PackedWeight.choice);
    False: always the packed copy. `measure` replaces the timer (cpu_gemm.time_gemms; tests). Replaces an earlier
    pack of the same tensor. ValueError (naming the weight) where one cannot be packed: not on the CPU, not
    float32/bfloat16, an inference tensor, or no oneDNN in this torch (prepack_unsupported).
    """
    for i, w in enumerate(weights):
        why = prepack_unsupported(w)
        if why is not None:
            raise ValueError(f"cannot prepack weight {i} (shape {list(getattr(w, 'shape', []))}): {why}")
    for w in weights:
        key = id(w)
        if key not in _PACKS:
            weakref.finalize(w, _PACKS.pop, key, None)  # the entry goes with the tensor (ids are reused)
        _PACKS[key] = PackedWeight(w, tune=tune, measure=measure)


def unpack(*weights: torch.Tensor) -> None:
    """Forget the packed copies of these weights (their GEMMs use the plain weights again)."""
    for w in weights:
        _PACKS.pop(id(w), None)


def packed_for(w: torch.Tensor) -> PackedWeight | None:
    """The packed copy of w when prepack made one and w has not changed since; else None.

    A copy found stale (w changed in place since it was packed) is dropped with a warning, once.
    """
    p = _PACKS.get(id(w))
    if p is None:
        return None
    if p.fresh_for(w):
        return p
    del _PACKS[id(w)]
    warnings.warn(f"an expert weight {list(p.shape)} changed since it was prepacked: its packed copy is dropped and "
                  "the plain weight is used; call prepack again (MoELayer.prepack()) to pack the new values",
                  RuntimeWarning, stacklevel=3)
    return None
