"""The reference itself, checked on a case computed by hand."""

import math

import torch
import torch.nn.functional as F

import moe_ref
from helpers import hand_routing


def test_reference_known_answer():
    # E=2, D=2, F=1: expert e computes w2[e] * silu(g) * u with g = w13[e][0] @ x, u = w13[e][1] @ x
    w13 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [1.0, 1.0]]], dtype=torch.float64)  # [2, 2, 2]
    w2 = torch.tensor([[[1.0], [2.0]], [[-1.0], [0.5]]], dtype=torch.float64)  # [2, 2, 1]
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    r = hand_routing([[0, 1], [1, -1]], [[0.25, 0.75], [1.0, 0.0]])

    def expert(e, v):
        g, u = float(w13[e][0] @ v), float(w13[e][1] @ v)
        a = g / (1 + math.exp(-g)) * u
        return torch.tensor([float(w2[e][0, 0]) * a, float(w2[e][1, 0]) * a], dtype=torch.float64)

    want = torch.stack([0.25 * expert(0, x[0]) + 0.75 * expert(1, x[0]), expert(1, x[1])])
    got = moe_ref.reference_moe(x, r, w13, w2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_swiglu_halves():
    gu = torch.arange(8.0).view(2, 4)
    torch.testing.assert_close(moe_ref.swiglu(gu), F.silu(gu[:, :2]) * gu[:, 2:])


def test_route_softmax_topk_renorm():
    x = torch.randn(6, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    r = moe_ref.route(x, w, top_k=2)
    probs = torch.softmax((x @ w.t()).float(), -1)
    top = probs.topk(2, -1)
    torch.testing.assert_close(r.topk_ids, top.indices)
    torch.testing.assert_close(r.topk_weights, top.values / top.values.sum(-1, keepdim=True))
    assert r.topk_weights.dtype == torch.float32 and r.logits.shape == (6, 4)
    raw = moe_ref.route(x, w, top_k=2, renormalize=False)
    torch.testing.assert_close(raw.topk_weights, top.values)


def test_route_sigmoid():
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    r = moe_ref.route(x, w, top_k=3, scoring="sigmoid", renormalize=False)
    torch.testing.assert_close(r.topk_weights, torch.sigmoid(x @ w.t()).sort(-1, descending=True).values)
