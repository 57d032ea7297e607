"""Where the P ranks sit, what their links cost, and how long an all-to-all takes on them (α–β model).

Legend: P ranks = N nodes × L ranks per node; rank r sits on node r // L with local index r % L.
Bytes, seconds, bytes/s. A traffic matrix B [P, P] holds the bytes rank p sends to rank q (diagonal: a
local copy, no link).

A link class c (intra-node, inter-node) moves b bytes from one rank in α_c + b / β_c seconds: α_c the
latency, β_c the bandwidth *per rank and per direction* (a rank's NVLink share, its own NIC). A rank's
intra-node and inter-node transfers use different hardware and run at the same time, and so do its sends
and receives (full duplex). One all-to-all therefore takes

    t = max over ranks p of max(send_intra_p, send_inter_p, recv_intra_p, recv_inter_p),
    send_c_p = α_c + (bytes p sends over class c) / β_c   (0 when it sends nothing over c),

the slowest rank's slowest send or receive (the collective ends when its last byte lands). A staged
(hierarchical) all-to-all is a sequence of such steps, and their times add.

The presets' bandwidths are documented spec values (sources in docs/topology.md), not measurements: NVLink
on H100/H200 SXM, 900 GB/s bidirectional per GPU = 450 GB/s per direction; a 400 Gb/s InfiniBand NIC per
GPU = 50 GB/s per direction; PCIe Gen5 x16, 128 GB/s bidirectional = 64 GB/s per direction. The latencies
are assumed orders of magnitude (a few µs per collective step), not spec values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..validate import check_int, check_number

__all__ = ["Topology", "NVLINK_BPS", "IB400_BPS", "PCIE5_BPS", "NVLINK_LATENCY_S", "IB_LATENCY_S",
           "PCIE_LATENCY_S", "TOPOLOGY_PRESETS", "topology_preset", "link_classes", "inter_node_bytes",
           "all_to_all_time", "layer_comm_time", "staged_time"]

NVLINK_BPS = 450e9  # bytes/s per direction per GPU: H100/H200 SXM NVLink, 900 GB/s bidirectional (spec)
IB400_BPS = 50e9  # bytes/s per direction: one 400 Gb/s InfiniBand NIC per GPU (spec: 400 Gb/s = 50 GB/s)
PCIE5_BPS = 64e9  # bytes/s per direction: PCIe Gen5 x16, 128 GB/s bidirectional (spec)
NVLINK_LATENCY_S = 3e-6  # assumed: a few µs per all-to-all step inside a node (not a spec value)
IB_LATENCY_S = 5e-6  # assumed: a few µs per step across nodes with RDMA (not a spec value)
PCIE_LATENCY_S = 5e-6  # assumed (not a spec value)


@dataclass(frozen=True)
class Topology:
    """N nodes × L ranks per node, one link class inside a node and one between nodes.

    intra_bps / inter_bps: bytes/s per rank and per direction; intra_latency_s / inter_latency_s: α per step.
    """

    nodes: int
    ranks_per_node: int
    intra_bps: float = NVLINK_BPS
    inter_bps: float = IB400_BPS
    intra_latency_s: float = NVLINK_LATENCY_S
    inter_latency_s: float = IB_LATENCY_S
    name: str = ""

    def __post_init__(self):
        check_int("nodes", self.nodes, 1)
        check_int("ranks_per_node", self.ranks_per_node, 1)
        for f in ("intra_bps", "inter_bps"):
            check_number(f, getattr(self, f), 0, strict=True)
        for f in ("intra_latency_s", "inter_latency_s"):
            check_number(f, getattr(self, f), 0)

    @property
    def world_size(self) -> int:
        """P = N * L."""
        return self.nodes * self.ranks_per_node

    def node_of(self, rank: int) -> int:
        return check_int("rank", rank, 0, self.world_size - 1) // self.ranks_per_node

    def local_index(self, rank: int) -> int:
        return check_int("rank", rank, 0, self.world_size - 1) % self.ranks_per_node

    def with_nodes(self, nodes: int, ranks_per_node: int | None = None) -> Topology:
        """The same links with another layout."""
        return replace(self, nodes=nodes, ranks_per_node=ranks_per_node or self.ranks_per_node)

    def describe(self) -> str:
        return (f"{self.name or 'topology'}: {self.nodes} node(s) x {self.ranks_per_node} rank(s); intra "
                f"{self.intra_bps / 1e9:.0f} GB/s, {self.intra_latency_s * 1e6:.0f} µs; inter "
                f"{self.inter_bps / 1e9:.0f} GB/s, {self.inter_latency_s * 1e6:.0f} µs (per rank, per direction)")


# name: (intra bandwidth, intra latency, inter bandwidth, inter latency, default ranks per node)
_LINKS = {
    "nvlink": (NVLINK_BPS, NVLINK_LATENCY_S, IB400_BPS, IB_LATENCY_S, 8),  # H100/H200 SXM node, IB across
    "pcie": (PCIE5_BPS, PCIE_LATENCY_S, IB400_BPS, IB_LATENCY_S, 8),  # PCIe Gen5 cards, IB across
}
TOPOLOGY_PRESETS = {
    "single-gpu": ("nvlink", 1, 1),
    "h200-node": ("nvlink", 1, 8),  # one 8-GPU NVLink node
    "pcie-node": ("pcie", 1, 8),  # one 8-GPU PCIe Gen5 server
    "h200-2nodes": ("nvlink", 2, 8),  # two NVLink nodes over 400 Gb/s InfiniBand
    "h200-4nodes": ("nvlink", 4, 8),
}


def topology_preset(name: str, nodes: int | None = None, ranks_per_node: int | None = None) -> Topology:
    """A documented preset (TOPOLOGY_PRESETS), optionally with another N or L."""
    if name not in TOPOLOGY_PRESETS:
        raise ValueError(f"topology preset must be one of {sorted(TOPOLOGY_PRESETS)}, got {name!r}")
    links, n, lpn = TOPOLOGY_PRESETS[name]
    ib, il, eb, el, _ = _LINKS[links]
    return Topology(nodes or n, ranks_per_node or lpn, ib, eb, il, el, name=name)


def _check_traffic(traffic, topo: Topology) -> torch.Tensor:
    if not isinstance(topo, Topology):
        raise TypeError(f"topology must be a moe_ref.parallel.Topology, got {type(topo).__name__}")
    m = torch.as_tensor(traffic).double()
    P = topo.world_size
    if m.shape != (P, P):
        raise ValueError(f"traffic must be [P, P] = [{P}, {P}] for {topo.nodes} node(s) x {topo.ranks_per_node}, "
                         f"got {tuple(m.shape)}")
    if bool((m < 0).any()):
        raise ValueError("traffic must hold non-negative byte counts")
    return m


def link_classes(topo: Topology) -> torch.Tensor:
    """[P, P] int: 0 the same rank (no link), 1 inside a node, 2 between nodes."""
    node = torch.arange(topo.world_size) // topo.ranks_per_node  # [P]
    cls = torch.where(node[:, None] == node[None, :], 1, 2)
    cls.fill_diagonal_(0)
    return cls


def inter_node_bytes(traffic, topo: Topology) -> int:
    """Bytes of a traffic matrix [P, P] that cross between nodes."""
    m = _check_traffic(traffic, topo)
    return int(m[link_classes(topo) == 2].sum())


def _rank_times(m: torch.Tensor, topo: Topology) -> torch.Tensor:
    """[P] α–β time of each rank: its slowest of send/receive over intra/inter links."""
    cls = link_classes(topo)
    out = torch.zeros(topo.world_size, dtype=torch.float64)
    for c, bps, lat in ((1, topo.intra_bps, topo.intra_latency_s), (2, topo.inter_bps, topo.inter_latency_s)):
        part = torch.where(cls == c, m, 0.0)  # [P, P] bytes over this class
        for b in (part.sum(1), part.sum(0)):  # [P] sent, received
            out = torch.maximum(out, torch.where(b > 0, lat + b / bps, 0.0))
    return out


def all_to_all_time(traffic, topo: Topology, per_rank: bool = False):
    """Seconds one all-to-all with traffic [P, P] bytes takes on `topo` (see module doc); [P] if per_rank."""
    t = _rank_times(_check_traffic(traffic, topo), topo)
    return t if per_rank else float(t.max()) if t.numel() else 0.0


def layer_comm_time(traffic, topo: Topology, hierarchical: bool = False) -> float:
    """Dispatch + combine of one MoE layer: the all-to-all of traffic [P, P] and of its transpose.

    hierarchical=True: each runs as two sequential steps (the inter-node part, then the intra-node part),
    as moe_ref.parallel's hierarchical scheme does; the steps' times add.
    """
    m = _check_traffic(traffic, topo)
    if not hierarchical:
        return all_to_all_time(m, topo) + all_to_all_time(m.t(), topo)
    cls = link_classes(topo)
    steps = [torch.where(cls == 2, m, 0.0), torch.where(cls == 1, m, 0.0)]
    return staged_time(steps, topo) + staged_time([s.t() for s in reversed(steps)], topo)


def staged_time(steps, topo: Topology) -> float:
    """Seconds of a sequence of all-to-all steps (each a [P, P] traffic matrix), one after the other."""
    return sum(all_to_all_time(s, topo) for s in steps)
