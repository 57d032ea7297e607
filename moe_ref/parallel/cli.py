"""The torchrun CLI: one EP forward on every rank, checked against the single-process layer.

Legend: T tokens (T_total: the whole batch), D d_model, F d_ff, E experts, K top-k, P ranks, El = E / P.

    MASTER_ADDR=127.0.0.1 torchrun --nproc-per-node 4 -m moe_ref.parallel --check
    MASTER_ADDR=127.0.0.1 torchrun --nproc-per-node 4 -m moe_ref.parallel --check --ranks-per-node 2
    MASTER_ADDR=127.0.0.1 torchrun --nproc-per-node 4 -m moe_ref.parallel --check --overlap

--ranks-per-node L lays the P processes out as P / L nodes of L ranks and runs the hierarchical scheme
(subgroups from new_group) next to the flat one: both are checked, and the last lines compare the bytes
that cross between nodes. --overlap runs the two-micro-batch scheme with async_op=True collectives.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from ..capacity import apply_capacity
from ..config import CapacityConfig, MoEConfig
from ..ep_plan import SCHEMES, shard_experts
from ..layer import MoELayer, moe_forward
from ..reference import reference_moe
from ..skew import skewed_routing
from .report import inter_node_lines, rank_line, summary
from .split import split_tokens
from .transport import all_gather_uneven, ep_forward

PRESETS = {  # name: (D, F, E, K); E and K of real models, D and F cut down to run on CPU ranks
    "tiny": (64, 128, 8, 2),
    "cpu-small": (256, 512, 8, 2),
    "mixtral-mini": (128, 448, 8, 2),
    "olmoe-mini": (128, 64, 64, 8),
    "qwen3-mini": (128, 48, 128, 8),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrun --nproc-per-node P -m moe_ref.parallel",
                                description="Expert-parallel MoE forward on torch.distributed; --check compares "
                                            "with the single-process layer.")
    p.add_argument("--check", action="store_true", help="compare with the single-process MoELayer and reference")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, default=256, help="global T (split over ranks)")
    p.add_argument("--uneven", action="store_true", help="uneven token split: rank 0 gets none, the last most")
    p.add_argument("--skew", type=float, default=0.0, help="Zipf skew of expert popularity (0 = router as is)")
    p.add_argument("--capacity-factor", type=float, default=None, help="apply capacity (default: dropless)")
    p.add_argument("--overflow", default="drop", choices=["drop", "reroute", "spill", "dropless", "error"])
    p.add_argument("--drop-policy", default="position", choices=["position", "probability"])
    p.add_argument("--strategy", default="grouped", help="local expert strategy")
    p.add_argument("--scheme", default="grouped", choices=sorted(SCHEMES))
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a stuck collective fails")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="lay the ranks out as nodes of this many ranks: run the hierarchical all-to-all and "
                        "compare its inter-node bytes with the flat one")
    p.add_argument("--overlap", action="store_true",
                   help="two micro-batches with async_op=True all_to_all (dispatch of one during the other's "
                        "expert compute)")
    return p


def _uneven_splits(T: int, P: int) -> list[int]:
    """Rank 0 gets no tokens, rank p>0 a share growing with p (a rank with no tokens of its own)."""
    if P == 1:
        return [T]
    w = list(range(P))
    s = [T * wi // sum(w) for wi in w]
    s[-1] += T - sum(s)
    return s


def _capacity(args) -> CapacityConfig | None:
    if args.capacity_factor is None:
        return None
    return CapacityConfig(capacity_factor=args.capacity_factor, drop_policy=args.drop_policy, overflow=args.overflow)


def _init_group(timeout: float) -> tuple[str, torch.device]:
    """init_process_group from torchrun's environment: NCCL when every rank has a GPU, else gloo."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # loopback only
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", "1"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    dev = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    return backend, dev


def main(argv=None) -> int:
    """torchrun entry point (`python -m moe_ref.parallel`): EP forward vs single-process, per-rank report."""
    parser = _parser()
    args = parser.parse_args(argv)
    cf = args.capacity_factor
    for rule, value, ok in (("--tokens must be >= 0", args.tokens, args.tokens >= 0),
                            ("--skew must be >= 0", args.skew, args.skew >= 0),  # (nan fails each rule)
                            ("--timeout must be > 0", args.timeout, args.timeout > 0),
                            ("--capacity-factor must be > 0", cf, cf is None or cf > 0)):
        if not ok:  # refused before any process group is set up
            parser.error(f"{rule}, got {value}")
    backend, dev = _init_group(args.timeout)
    try:
        return _run(args, backend, dev)
    finally:
        dist.destroy_process_group()


def _scheme(args) -> str:
    """The scheme this run checks: --ranks-per-node -> hierarchical, --overlap -> overlap, else --scheme."""
    if args.ranks_per_node is not None and args.overlap:
        raise SystemExit("--ranks-per-node and --overlap are separate schemes: choose one")
    if (args.ranks_per_node is not None or args.overlap) and args.scheme != "grouped":
        raise SystemExit(f"--scheme {args.scheme} cannot be combined with --ranks-per-node or --overlap")
    if args.ranks_per_node is not None:
        if args.ranks_per_node < 1 or dist.get_world_size() % args.ranks_per_node:
            raise SystemExit(f"--ranks-per-node {args.ranks_per_node} must divide the world size "
                             f"{dist.get_world_size()}")
        return "hierarchical"
    return "overlap" if args.overlap else args.scheme


def _run(args, backend: str, dev: torch.device) -> int:
    """This rank's part of the forward, the check, the report; exit code 0 when every rank passed."""
    rank, P = dist.get_rank(), dist.get_world_size()
    scheme = _scheme(args)
    args.scheme = scheme  # what the summary reports
    D, F, E, K = PRESETS[args.preset]
    layer = MoELayer(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K), dtype=getattr(torch, args.dtype),
                     seed=args.seed).to(dev)  # same seeded weights on every rank
    g = torch.Generator().manual_seed(args.seed + 1)
    x_all = torch.randn(args.tokens, D, generator=g).to(dev, layer.w13.dtype)  # [T_total, D] same on every rank
    splits = _uneven_splits(args.tokens, P) if args.uneven else split_tokens(args.tokens, P)
    lo = sum(splits[:rank])
    x = x_all[lo: lo + splits[rank]]  # [T, D] this rank's own tokens
    routing = skewed_routing(x, layer.router_weight, K, args.skew)  # skew=0: exactly layer.route(x)
    cap = _capacity(args)
    w13, w2 = shard_experts(layer.w13.detach(), layer.w2.detach(), P, rank)  # [El, 2F, D], [El, D, F]
    runs = {scheme: None}
    if scheme == "hierarchical":
        runs["grouped"] = None  # the flat all-to-all on the same layout, for the inter-node comparison
    for name in runs:
        runs[name] = ep_forward(x, routing, w13, w2, num_experts=E, strategy=args.strategy, capacity=cap,
                                scheme=name, ranks_per_node=args.ranks_per_node)
    out = runs[scheme]
    lines, ok = [rank_line(out.stats, E, backend)], True
    if args.check:
        for name, o in runs.items():
            ys = torch.cat(all_gather_uneven(o.output))  # [T_total, D] on every rank
            good, line = _check(args, layer, x_all, ys, o.stats, cap)
            ok = ok and good
            lines.append(line if name == scheme else line.replace("check OK", f"check OK ({name} too)"))
    for p in range(P):  # print rank by rank, in order
        if p == rank:
            print("\n".join(lines), flush=True)
        dist.barrier()
    if rank == 0:
        print(summary(out.stats, E, args, backend), flush=True)
    failed = torch.tensor([0 if ok else 1], device=dev)
    dist.all_reduce(failed)
    if rank == 0 and args.check:
        print("CHECK PASSED on all ranks" if int(failed) == 0 else f"CHECK FAILED on {int(failed)} rank(s)",
              flush=True)
    if rank == 0 and scheme == "hierarchical":
        print(inter_node_lines(runs["grouped"].stats, out.stats, args.ranks_per_node), flush=True)
    return 0 if int(failed) == 0 else 1


def _check(args, layer: MoELayer, x_all: torch.Tensor, ys: torch.Tensor, st, cap) -> tuple[bool, str]:
    """ys [T_total, D] (all ranks' EP output) vs the single-process layer and the float64 reference."""
    K, E = layer.cfg.top_k, layer.cfg.num_experts
    r_all = skewed_routing(x_all, layer.router_weight, K, args.skew)  # [T_total, K]
    single = moe_forward(x_all, r_all, layer.w13, layer.w2, strategy="grouped", capacity=cap)
    final = apply_capacity(r_all, E, cap)
    ref = sum(reference_moe(x_all.double(), r, layer.w13.double(), layer.w2.double()) for r in final.passes)
    tol = dict(rtol=1e-9, atol=1e-10) if ys.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    try:
        torch.testing.assert_close(ys, single.output, **tol)
        torch.testing.assert_close(ys.double(), ref, **tol)
        if st.dropped != single.stats.dropped or st.passes != single.stats.passes:
            raise AssertionError(f"capacity outcome differs: EP dropped {st.dropped} passes {st.passes}, "
                                 f"single dropped {single.stats.dropped} passes {single.stats.passes}")
    except AssertionError as e:
        return False, f"[rank {st.rank}] CHECK FAILED: {e}"
    err = float((ys.double() - ref).abs().max()) if ys.numel() else 0.0
    return True, (f"[rank {st.rank}] check OK: all {args.tokens} outputs match single-process MoELayer and "
                  f"reference_moe (max abs err vs float64 reference {err:.2e})")
