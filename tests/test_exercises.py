"""The exercise checkers (moe_ref.exercises): each passes a reference solution, catches a wrong one and
shows the differing elements, and reports an untouched stub as "not attempted" without raising.

The reference solutions live here, not in the notebooks: the notebooks carry stubs only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as Fn

from moe_ref import exercises as ex

# ------------------------------------------------------------------ reference solutions (one per checker)


def counts_ok(ids, E):
    f = ids.reshape(-1)
    return torch.bincount(f[f >= 0], minlength=E)


def counts_wrong(ids, E):  # counts dropped ids (-1) as expert 0
    return torch.bincount(ids.reshape(-1).clamp(min=0), minlength=E)


def _ffn(x, w13_e, w2_e):
    F = w2_e.shape[1]
    h = x @ w13_e.t()
    return (Fn.silu(h[:, :F]) * h[:, F:]) @ w2_e.t()


def dense_ok(x, ids, w, w13, w2):
    y = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        y += ((ids == e) * w).sum(1, keepdim=True).to(x.dtype) * _ffn(x, w13[e], w2[e])
    return y


def dense_wrong(x, ids, w, w13, w2):  # forgets the gate weights
    return dense_ok(x, ids, torch.ones_like(w), w13, w2)


def reason_ok(q, oldest, now, closing, max_tokens, max_wait):
    if q >= max_tokens:
        return "full"
    if closing:
        return "close"
    if now >= oldest + max_wait:
        return "timeout"
    return None


def reason_wrong(q, oldest, now, closing, max_tokens, max_wait):  # checks closing first
    return "close" if closing else reason_ok(q, oldest, now, closing, max_tokens, max_wait)


def take_ok(lengths, max_tokens):
    n = total = 0
    for L in lengths:
        if n and total + L > max_tokens:
            break
        n, total = n + 1, total + L
    return n


def take_wrong(lengths, max_tokens):  # a too-long first request takes nothing
    n = total = 0
    for L in lengths:
        if total + L > max_tokens:
            break
        n, total = n + 1, total + L
    return n


def imbalance_ok(counts):
    mean = counts.double().mean()
    return 1.0 if mean == 0 else float(counts.max() / mean)


def imbalance_wrong(counts):  # max / min
    return float(counts.max() / counts.min().clamp(min=1))


def offsets_ok(counts):
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def offsets_wrong(counts):  # the inclusive sum, one short
    return counts.cumsum(0)


def _sorted_slots(ids, E):
    flat = ids.reshape(-1)
    key = torch.where(flat >= 0, flat, E)
    order = torch.sort(key, stable=True).indices
    return order[: int((flat >= 0).sum())]


def group_ok(ids, E):
    return _sorted_slots(ids, E)


def group_wrong(ids, E):  # an unstable order within the expert: reversed
    flat = ids.reshape(-1)
    key = torch.where(flat >= 0, flat, E) * (flat.numel() + 1) - torch.arange(flat.numel())
    return torch.sort(key).indices[: int((flat >= 0).sum())]


def rank_ok(ids, E):
    flat = ids.reshape(-1)
    valid = flat >= 0
    onehot = Fn.one_hot(flat.clamp(min=0), E) * valid[:, None]
    r = (onehot.cumsum(0) - onehot).gather(1, flat.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, r, -1)


def rank_wrong(ids, E):  # inclusive count
    return torch.where(ids.reshape(-1) >= 0, rank_ok(ids, E) + 1, -1)


def permute_ok(x, ids, E):
    return x.index_select(0, _sorted_slots(ids, E) // max(ids.shape[1], 1))


def permute_wrong(x, ids, E):  # slot id used as a token id
    s = _sorted_slots(ids, E)
    return x.index_select(0, s % max(x.shape[0], 1)) if x.shape[0] else x.new_zeros(0, x.shape[1])


def unpermute_ok(ys, ids, w, E):
    T, K = ids.shape
    inv = torch.full((T * K,), ys.shape[0], dtype=torch.long)
    inv[_sorted_slots(ids, E)] = torch.arange(ys.shape[0])
    padded = torch.cat([ys, ys.new_zeros(1, ys.shape[1])])
    return (padded[inv].view(T, K, ys.shape[1]) * w.to(ys.dtype)[..., None]).sum(1)


def unpermute_wrong(ys, ids, w, E):  # no weights
    return unpermute_ok(ys, ids, torch.ones_like(w), E)


def grouped_ok(x, ids, w, w13, w2):
    E = w13.shape[0]
    xs = permute_ok(x, ids, E)
    counts = counts_ok(ids, E)
    offs = offsets_ok(counts).tolist()
    ys = torch.cat([_ffn(xs[offs[e]:offs[e + 1]], w13[e], w2[e]) for e in range(E)]) if E else xs
    return unpermute_ok(ys, ids, w, E)


def grouped_wrong(x, ids, w, w13, w2):  # every block through expert 0
    E = w13.shape[0]
    xs = permute_ok(x, ids, E)
    return unpermute_ok(_ffn(xs, w13[0], w2[0]), ids, w, E)


def capacity_ok(T, E, K, cf, min_c):
    return max(min_c, math.ceil(round(T * K * cf / E, 9)))


def capacity_wrong(T, E, K, cf, min_c):  # forgets K
    return max(min_c, math.ceil(round(T * cf / E, 9)))


def _drop(ids, order, E, C):
    flat = ids.reshape(-1).clone()
    seen = [0] * E
    for s in order.tolist():
        e = int(flat[s])
        if e < 0:
            continue
        if seen[e] >= C:
            flat[s] = -1
        seen[e] += 1
    return flat.view(ids.shape)


def position_ok(ids, E, C):
    T, K = ids.shape
    return _drop(ids, torch.arange(T * K).view(T, K).t().reshape(-1), E, C)


def position_wrong(ids, E, C):  # slot order (t, k) instead of (k, t)
    return _drop(ids, torch.arange(ids.numel()), E, C)


def probability_ok(ids, w, E, C):
    return _drop(ids, torch.sort(-w.reshape(-1), stable=True).indices, E, C)


def probability_wrong(ids, w, E, C):  # keeps the lowest weights
    return _drop(ids, torch.sort(w.reshape(-1), stable=True).indices, E, C)


def padded_ok(counts, bm):
    return int(((counts + bm - 1) // bm * bm).sum())


def padded_wrong(counts, bm):  # pads empty experts to a block too
    return int((torch.clamp((counts + bm - 1) // bm, min=1) * bm).sum())


def align_ok(ids, E, bm):
    T, K = ids.shape
    slots = _sorted_slots(ids, E)
    counts = counts_ok(ids, E)
    padded = (counts + bm - 1) // bm * bm
    start = padded.cumsum(0) - padded
    offs = offsets_ok(counts)
    out = torch.full((int(padded.sum()),), T * K, dtype=torch.long)
    for e in range(E):
        out[int(start[e]): int(start[e]) + int(counts[e])] = slots[int(offs[e]): int(offs[e + 1])]
    return out, torch.repeat_interleave(torch.arange(E), padded // bm)


def align_wrong(ids, E, bm):  # padding rows hold 0 instead of the sentinel
    out, experts = align_ok(ids, E, bm)
    return torch.where(out == ids.numel(), 0, out), experts


def combine_ok(slot_out, ids):
    T, K = ids.shape
    v = slot_out.view(T, K, slot_out.shape[1])
    return torch.where((ids >= 0)[..., None], v, 0.0).sum(1)


def combine_wrong(slot_out, ids):  # multiplies by a 0/1 mask: NaN * 0 = NaN
    T, K = ids.shape
    return (slot_out.view(T, K, slot_out.shape[1]) * (ids >= 0)[..., None]).sum(1)


# ------------------------------------------------------------------ 02b continuous batching


def hit_ok(T, E, K):
    return E * (1 - (1 - K / E) ** T)


def hit_wrong(T, E, K):  # T*K distinct experts, capped at E: as if no two tokens ever shared an expert
    return float(min(E, T * K))


def schedule_ok(prompt_left, decoding, budget, chunk):
    room, takes = budget - decoding, []
    for p in prompt_left:
        take = min(p, room, chunk or p)
        if chunk is None and take < p:
            return takes + [0] * (len(prompt_left) - len(takes))
        takes.append(take)
        room -= take
    return takes


def schedule_wrong(prompt_left, decoding, budget, chunk):  # forgets the decode tokens already in the step
    return schedule_ok(prompt_left, 0, budget, chunk)


def ttft_ok(arrivals, token_times):
    ttft = torch.tensor([t[0] - a for a, t in zip(arrivals, token_times)], dtype=torch.float64)
    gaps = sorted(b - a for t in token_times for a, b in zip(t, t[1:]))
    return ttft, gaps[math.ceil(0.99 * len(gaps)) - 1] if gaps else 0.0


def ttft_wrong(arrivals, token_times):  # the mean gap instead of the 99th percentile
    ttft, _ = ttft_ok(arrivals, token_times)
    gaps = [b - a for t in token_times for a, b in zip(t, t[1:])]
    return ttft, sum(gaps) / len(gaps) if gaps else 0.0


# ------------------------------------------------------------------ 06 expert parallelism


def _per_rank_dest(ids, E, P, splits):
    """[(rank, dest [T_p, K])] for each rank's own tokens: destination rank of each assignment, -1 dropped."""
    El = E // P
    return [(p, torch.where(part >= 0, part // El, -1)) for p, part in enumerate(ids.split(splits))]


def traffic_ok(ids, E, P, splits):
    out = torch.zeros(P, P, dtype=torch.long)
    for p, dest in _per_rank_dest(ids, E, P, splits):
        d = dest.reshape(-1)
        out[p] = torch.bincount(d[d >= 0], minlength=P)
    return out


def traffic_wrong(ids, E, P, splits):  # sends by expert id modulo P (round-robin placement, not contiguous)
    return traffic_ok(torch.where(ids >= 0, (ids % P) * (E // P), -1), E, P, splits)


def unique_ok(ids, E, P, splits):
    out = torch.zeros(P, P, dtype=torch.long)
    for p, dest in _per_rank_dest(ids, E, P, splits):
        hit = torch.zeros(dest.shape[0], P + 1, dtype=torch.long).scatter_(1, torch.where(dest >= 0, dest, P), 1)
        out[p] = hit[:, :P].sum(0)
    return out


def unique_wrong(ids, E, P, splits):  # one row per assignment: no deduplication
    return traffic_ok(ids, E, P, splits)


def bytes_sent_ok(traffic, row_bytes):
    off = traffic - torch.diag(traffic.diagonal())
    return (off.sum(1) + off.sum(0)) * row_bytes


def bytes_sent_wrong(traffic, row_bytes):  # counts the local copies as link bytes too
    return (traffic.sum(1) + traffic.sum(0)) * row_bytes


# ------------------------------------------------------------------ 06b past one node


def inter_ok(traffic, N, L):
    node = torch.arange(N * L) // L
    return int(traffic[node[:, None] != node[None, :]].sum())


def inter_wrong(traffic, N, L):  # every off-diagonal byte, as if each rank were its own node
    return int(traffic.sum() - traffic.diagonal().sum())


def node_topk_ok(scores, K, N, M):
    T, E = scores.shape
    En = E // N
    node = scores.view(T, N, En).topk(min(2, En), dim=-1).values.sum(-1)  # [T, N]
    keep = torch.zeros(T, N, dtype=torch.bool).scatter_(1, node.topk(M, dim=-1).indices, True)
    ids = scores.masked_fill(~keep.repeat_interleave(En, dim=1), float("-inf")).topk(K, dim=-1).indices
    return scores.gather(1, ids), ids


def node_topk_wrong(scores, K, N, M):  # scores a node by its best expert only
    T, E = scores.shape
    En = E // N
    node = scores.view(T, N, En).max(-1).values
    keep = torch.zeros(T, N, dtype=torch.bool).scatter_(1, node.topk(M, dim=-1).indices, True)
    ids = scores.masked_fill(~keep.repeat_interleave(En, dim=1), float("-inf")).topk(K, dim=-1).indices
    return scores.gather(1, ids), ids


def _replicate(loads, R, P, prefer_fresh):
    ld = loads.double()
    E = ld.numel()
    copies = torch.ones(E, dtype=torch.long)
    for _ in range(R):
        copies[int(torch.argmax(ld / copies))] += 1
    per_copy = ld / copies
    items = sorted(((float(per_copy[e]), e) for e in range(E) for _ in range(int(copies[e]))),
                   key=lambda it: (-it[0], it[1]))
    Sl = (E + R) // P
    load, held = [0.0] * P, [[] for _ in range(P)]
    for w, e in items:
        free = [r for r in range(P) if len(held[r]) < Sl]
        pool = ([r for r in free if e not in held[r]] or free) if prefer_fresh else free
        r = min(pool, key=lambda q: (load[q], q))
        held[r].append(e)
        load[r] += w
    return copies, torch.tensor([e for r in range(P) for e in sorted(held[r])], dtype=torch.long)


def replicate_ok(loads, R, P):
    return _replicate(loads, R, P, prefer_fresh=True)


def replicate_wrong(loads, R, P):  # may put two copies of one expert on the same rank
    return _replicate(loads, R, P, prefer_fresh=False)


# ------------------------------------------------------------------ 08 choosing a strategy


def a2a_ok(traffic, topo):
    P, L = traffic.shape[0], topo.ranks_per_node
    node = torch.arange(P) // L
    same = node[:, None] == node[None, :]
    off = ~torch.eye(P, dtype=torch.bool)
    t = 0.0
    for mask, bps, lat in ((same & off, topo.intra_bps, topo.intra_latency_s),
                           (~same, topo.inter_bps, topo.inter_latency_s)):
        part = torch.where(mask, traffic.double(), 0.0)
        for b in (part.sum(1), part.sum(0)):
            t = max([t] + [lat + float(v) / bps for v in b if v > 0])
    return t


def a2a_wrong(traffic, topo):  # adds the two link classes instead of running them at the same time
    P, L = traffic.shape[0], topo.ranks_per_node
    node = torch.arange(P) // L
    same = node[:, None] == node[None, :]
    inside = torch.where(same, traffic.double(), 0.0).fill_diagonal_(0.0)
    across = torch.where(~same, traffic.double(), 0.0)
    only = lambda m, bps, lat: torch.where(m > 0, lat + m / bps, 0.0)
    t = torch.zeros(P, dtype=torch.float64)
    for b_in, b_out in ((inside.sum(1), across.sum(1)), (inside.sum(0), across.sum(0))):
        t = torch.maximum(t, only(b_in, topo.intra_bps, topo.intra_latency_s)
                          + only(b_out, topo.inter_bps, topo.inter_latency_s))
    return float(t.max()) if P else 0.0


def _expert_s(rows, hit, D, F):
    if rows == 0:
        return 0.0
    return max((hit * 3 * D * F * 2 + rows * (2 * D + 2 * F) * 2) / 4.3e12, 6 * D * F * rows / 790e12)


def layer_ok(traffic, rows, hit, topo, D, F):
    row = 2 * D
    compute = max(_expert_s(int(r), int(h), D, F) for r, h in zip(rows, hit))
    return a2a_ok(traffic * row, topo) + compute + a2a_ok(traffic.t() * row, topo)


def layer_wrong(traffic, rows, hit, topo, D, F):  # the combine forgotten
    return a2a_ok(traffic * 2 * D, topo) + max(_expert_s(int(r), int(h), D, F) for r, h in zip(rows, hit))


def _loads_of(ids, E, P):
    El = E // P
    base, extra = divmod(ids.shape[0], P)
    splits = [base + (p < extra) for p in range(P)]
    traffic = torch.zeros(P, P, dtype=torch.long)
    per_expert = torch.zeros(E, dtype=torch.long)
    for p, part in enumerate(ids.split(splits)):
        f = part.reshape(-1)
        f = f[f >= 0]
        traffic[p] = torch.bincount(f // El, minlength=P)
        per_expert += torch.bincount(f, minlength=E)
    pe = per_expert.view(P, El)
    return traffic, pe.sum(1), (pe > 0).sum(1)


def ep_ok(ids, E, D, F, topologies):
    times = {P: layer_ok(*_loads_of(ids, E, P), topo, D, F) for P, topo in topologies.items()}
    return min(times, key=lambda P: (times[P], P))


def ep_wrong(ids, E, D, F, topologies):  # prices the compute only: more ranks always look better
    def compute(P):
        _, rows, hit = _loads_of(ids, E, P)
        return max(_expert_s(int(r), int(h), D, F) for r, h in zip(rows, hit))

    return min(topologies, key=lambda P: (compute(P), P))


SOLUTIONS = {
    "check_expert_counts": (counts_ok, counts_wrong),
    "check_dense_moe": (dense_ok, dense_wrong),
    "check_flush_reason": (reason_ok, reason_wrong),
    "check_take": (take_ok, take_wrong),
    "check_load_imbalance": (imbalance_ok, imbalance_wrong),
    "check_offsets": (offsets_ok, offsets_wrong),
    "check_group_by_expert": (group_ok, group_wrong),
    "check_rank_in_expert": (rank_ok, rank_wrong),
    "check_permute": (permute_ok, permute_wrong),
    "check_unpermute": (unpermute_ok, unpermute_wrong),
    "check_grouped_moe": (grouped_ok, grouped_wrong),
    "check_expert_capacity": (capacity_ok, capacity_wrong),
    "check_drop_by_position": (position_ok, position_wrong),
    "check_drop_by_probability": (probability_ok, probability_wrong),
    "check_padded_rows": (padded_ok, padded_wrong),
    "check_align_block_size": (align_ok, align_wrong),
    "check_combine": (combine_ok, combine_wrong),
    "check_expected_hit": (hit_ok, hit_wrong),
    "check_step_schedule": (schedule_ok, schedule_wrong),
    "check_ttft_itl": (ttft_ok, ttft_wrong),
    "check_traffic_matrix": (traffic_ok, traffic_wrong),
    "check_unique_destinations": (unique_ok, unique_wrong),
    "check_bytes_sent": (bytes_sent_ok, bytes_sent_wrong),
    "check_inter_node_bytes": (inter_ok, inter_wrong),
    "check_node_limited_topk": (node_topk_ok, node_topk_wrong),
    "check_replicate_experts": (replicate_ok, replicate_wrong),
    "check_all_to_all_time": (a2a_ok, a2a_wrong),
    "check_layer_time": (layer_ok, layer_wrong),
    "check_ep_degree": (ep_ok, ep_wrong),
}
CHECKS = sorted(n for n in ex.__all__ if n.startswith("check_"))


def test_every_checker_has_a_reference_solution_here():
    assert sorted(SOLUTIONS) == CHECKS


@pytest.mark.parametrize("name", CHECKS)
def test_reference_solution_passes(name, capsys):
    res = getattr(ex, name)(SOLUTIONS[name][0])
    out = capsys.readouterr().out
    assert res and res.status == "passed", out
    assert res.passed_cases == res.cases >= 6 and f"✓ {name}" in out


@pytest.mark.parametrize("name", CHECKS)
def test_wrong_solution_fails_and_shows_what_differs(name, capsys):
    res = getattr(ex, name)(SOLUTIONS[name][1])
    out = capsys.readouterr().out
    assert not res and res.status == "failed", out
    assert f"✗ {name}" in out and "inputs:" in out and "expected:" in out and "got:" in out
    assert res.failed_case and repr(res.failed_case) in out
    assert res.expected != res.got and res.expected in out and res.got in out, out  # the two values that differ


@pytest.mark.parametrize("name", CHECKS)
@pytest.mark.parametrize("stub", ["raises", "returns None"])
def test_untouched_stub_is_not_attempted(name, stub, capsys):
    def my_solution(*args):
        if stub == "raises":
            raise NotImplementedError
        return None

    res = getattr(ex, name)(my_solution)
    out = capsys.readouterr().out
    assert res.status == "not attempted" and not res, out
    assert "not attempted" in out and "my_solution" in out


def test_tensor_failures_name_the_differing_indices(capsys):
    res = ex.check_combine(SOLUTIONS["check_combine"][1])
    out = capsys.readouterr().out
    assert not res and "elements differ" in out and "at (" in out and "expected" in out and "got nan" in out


def test_a_crash_on_a_later_case_is_a_failure_with_its_error(capsys):
    def crashes_on_empty(counts):
        if counts.sum() == 0:
            raise ZeroDivisionError("empty batch")
        return float(counts.max() / counts.double().mean())

    res = ex.check_load_imbalance(crashes_on_empty)
    out = capsys.readouterr().out
    assert res.status == "failed" and res.failed_case == "all zero (empty batch)"
    assert "ZeroDivisionError: empty batch" in out


def test_shape_and_dtype_mismatches_are_reported(capsys):
    assert not ex.check_offsets(lambda counts: counts)  # [E], not [E+1]
    assert "shape differs: expected [6], got [5]" in capsys.readouterr().out
    assert not ex.check_expert_counts(lambda ids, E: counts_ok(ids, E).float())
    assert "expected an integer tensor" in capsys.readouterr().out


def test_the_checkers_cover_the_edge_cases():
    names = ex.check_permute(permute_ok, verbose=False).case_names
    for edge in ("T=0", "E=1", "K=E", "one hot expert", "odd sizes", "dropped"):
        assert any(edge in n for n in names), (edge, names)


def test_a_non_callable_is_refused():
    with pytest.raises(TypeError, match="pass your function itself"):
        ex.check_permute(permute_ok(torch.zeros(1, 2), torch.zeros(1, 1, dtype=torch.long), 1))
