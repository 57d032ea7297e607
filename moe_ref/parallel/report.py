"""Text report of one EP forward: a line per rank and the group summary printed by rank 0.

Legend: T tokens, D d_model, E experts, P ranks, El = E / P; traffic in rows of D values and in bytes.
"""

from __future__ import annotations

from ..ep_plan import EPRankStats, shard_bounds
from .topology import Topology, inter_node_bytes, layer_comm_time


def fmt_bytes(n: float) -> str:
    """n bytes as B / KiB / MiB / GiB (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def rank_line(st: EPRankStats, num_experts: int, backend: str) -> str:
    """One rank's share: its experts, own tokens, rows and bytes sent / received, drops of its tokens."""
    return (f"[rank {st.rank}/{st.world_size}] backend={backend} experts "
            f"{shard_bounds(num_experts, st.world_size, st.rank)} own tokens {st.num_tokens} "
            f"sent rows {st.send_rows.tolist()} recv rows {st.recv_rows.tolist()} "
            f"local expert load {st.local_expert_load.tolist()} bytes sent {fmt_bytes(st.bytes_sent)} "
            f"received {fmt_bytes(st.bytes_received)} meta {fmt_bytes(st.meta_bytes_sent)} "
            f"dropped(own) {st.dropped_own}")


def summary(st: EPRankStats, num_experts: int, args, backend: str) -> str:
    """The group view: [P, P] traffic matrix, per-rank load, capacity outcome, grouped vs naive rows."""
    P = st.world_size
    tr = st.traffic_rows  # [P, P]
    off = int(tr.sum() - tr.diagonal().sum())
    T = int(st.rank_tokens.sum())
    naive_rows = 2 * T * (P - 1)
    grouped_rows = 2 * off
    out = [f"== expert parallel: P={P} ({backend}), preset {args.preset} (E={num_experts}), T={T}, "
           f"skew={args.skew}, capacity_factor={args.capacity_factor}, overflow={args.overflow}, "
           f"scheme={args.scheme}",
           "traffic matrix, dispatch rows from rank p (row) to rank q (col):"]
    out += ["  " + " ".join(f"{int(v):6d}" for v in row) for row in tr]
    out.append(f"per-rank own tokens {st.rank_tokens.tolist()}; expert rows computed per rank "
               f"{st.rank_load.tolist()}; imbalance (max/mean) {st.imbalance:.3f}")
    out.append(f"capacity C={st.capacity} dropped={st.dropped} dropped_tokens={st.dropped_tokens} "
               f"rerouted={st.rerouted} passes={st.passes}")
    if args.scheme in ("grouped", "overlap"):
        out.append(f"token rows crossing links (dispatch + combine): grouped all_to_all {grouped_rows} "
                   f"({fmt_bytes(grouped_rows * st.row_bytes)}) vs naive all-gather/reduce-scatter "
                   f"{naive_rows} ({fmt_bytes(naive_rows * st.row_bytes)}, 2*T*(P-1)): "
                   f"{grouped_rows / max(naive_rows, 1):.2f}x")
    return "\n".join(out)


def inter_node_lines(flat: EPRankStats, hier: EPRankStats, ranks_per_node: int) -> str:
    """The last lines of a --ranks-per-node run: token bytes crossing between nodes, hierarchical vs flat.

    Dispatch + combine (the combine moves the transpose back). The modeled times use the documented spec
    bandwidths of NVLink inside a node and a 400 Gb/s NIC per rank across (moe_ref.parallel.topology) on
    the same bytes; they are a model, not a measurement of this run.
    """
    P = flat.world_size
    topo = Topology(P // ranks_per_node, ranks_per_node)
    fb, hb = flat.traffic_bytes, hier.traffic_bytes  # [P, P] dispatch bytes
    f_inter, h_inter = 2 * inter_node_bytes(fb, topo), 2 * inter_node_bytes(hb, topo)
    ratio = h_inter / f_inter if f_inter else float("nan")
    tf, th = layer_comm_time(fb, topo), layer_comm_time(hb, topo, hierarchical=True)
    return "\n".join([
        f"layout: {topo.nodes} nodes x {ranks_per_node} ranks per node (P={P})",
        f"inter-node token bytes (dispatch + combine): hierarchical {fmt_bytes(h_inter)} vs flat "
        f"{fmt_bytes(f_inter)} ({ratio:.2f}x)",
        f"inter-node rows: hierarchical {h_inter // hier.row_bytes} vs flat {f_inter // flat.row_bytes}; modeled "
        f"all-to-all time on NVLink + 400 Gb/s IB (spec bandwidths): hierarchical {th * 1e6:.1f} us vs flat "
        f"{tf * 1e6:.1f} us",
    ])
