"""Expert parallelism (EP): experts sharded over P ranks, tokens moved by all_to_all.

Legend: T tokens, D d_model, F d_ff, E experts, K top-k, C capacity per expert, P ranks, El = E / P.

The per-rank plan lives in moe_ref.ep_plan (a generator that yields its collectives). This module runs it:
  - for real on torch.distributed (`ep_forward`): gloo on CPU, NCCL on CUDA, launched by torchrun:
        MASTER_ADDR=127.0.0.1 torchrun --nproc-per-node 4 -m moe_ref.parallel --check
  - simulated in one process (`simulate_ep`): P virtual ranks run the same generator in lockstep and
    the all_to_all / all_gather are answered by list shuffles of the same split sizes. The simulation
    meters every byte between every pair of ranks, so it can compare the grouped all_to_all with the
    naive scheme (`scheme="naive"`: all-gather every token to every rank, reduce-scatter partial outputs).

Split sizes are host integers (torch.distributed's all_to_all_single takes Python lists), so each pass
synchronises once on the counts; production systems (DeepEP, pplx) avoid that with fixed-size buffers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass, field

import torch

from .config import CapacityConfig, MoEConfig
from .ep_plan import (
    AllGather,
    AllToAll,
    EPRankStats,
    check_world,
    naive_rank_program,
    rank_program,
    shard_bounds,
    shard_experts,
)
from .router import Routing, check_x2d

__all__ = ["EPOutput", "EPSimResult", "EPRankStats", "ep_forward", "simulate_ep", "split_tokens",
           "shard_experts", "shard_bounds", "run_with_torch_distributed", "split_routing", "unique_destinations",
           "run_local_group", "free_port", "launch_torchrun", "PRESETS", "main"]

SCHEMES = {"grouped": rank_program, "naive": naive_rank_program}


@dataclass
class EPOutput:
    """What ep_forward returns on one rank: its own tokens' output and that rank's stats."""

    output: torch.Tensor  # [T, D] this rank's tokens
    stats: EPRankStats


@dataclass
class EPSimResult:
    """A simulated EP forward over P virtual ranks.

    output:        [T_total, D] all ranks' outputs concatenated in rank order (= the input order).
    rank_stats:    one EPRankStats per rank.
    traffic_bytes: {"tokens": [P, P], "meta": [P, P]} bytes rank p sent to rank q, metered by the
                   simulated transport for every collective (diagonal = local copies, not on a link).
    """

    output: torch.Tensor
    rank_stats: list[EPRankStats]
    traffic_bytes: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def traffic_rows(self) -> torch.Tensor:
        """[P, P] dispatch rows from rank p to rank q."""
        return self.rank_stats[0].traffic_rows

    @property
    def rank_load(self) -> torch.Tensor:
        """[P] expert rows computed per rank."""
        return self.rank_stats[0].rank_load

    @property
    def imbalance(self) -> float:
        return self.rank_stats[0].imbalance

    def link_bytes(self, tag: str = "tokens") -> int:
        """Bytes that crossed between distinct ranks (off-diagonal), for one tag."""
        m = self.traffic_bytes[tag]
        return int(m.sum() - m.diagonal().sum())


# ----------------------------------------------------------------------------- splitting the batch
def split_tokens(num_tokens: int, world_size: int, token_splits=None) -> list[int]:
    """Tokens per rank: `token_splits` if given (checked), else near-even contiguous chunks."""
    if token_splits is None:
        base, extra = divmod(num_tokens, world_size)
        return [base + (1 if p < extra else 0) for p in range(world_size)]
    splits = [int(s) for s in token_splits]
    if len(splits) != world_size or any(s < 0 for s in splits) or sum(splits) != num_tokens:
        raise ValueError(f"token_splits must be {world_size} non-negative ints summing to T={num_tokens}, "
                         f"got {list(token_splits)}")
    return splits


def split_routing(routing: Routing, splits: list[int]) -> list[Routing]:
    """Cut a [T_total, K] Routing into per-rank Routings along the tokens."""
    lg = routing.logits.split(splits) if routing.logits is not None else [None] * len(splits)
    return [Routing(topk_ids=i, topk_weights=w, logits=g) for i, w, g in
            zip(routing.topk_ids.split(splits), routing.topk_weights.split(splits), lg)]


def unique_destinations(routing: Routing, num_experts: int, world_size: int, token_splits=None) -> torch.Tensor:
    """[P, P] rows from rank p to rank q if each token were sent once per destination *rank* (not per expert).

    rank_program sends one row per assignment, so a token whose K experts share a rank travels twice;
    deduplicating per rank (as DeepEP does) sends it once. Computed from the routing (no transport).
    """
    El = check_world(num_experts, world_size)
    splits = split_tokens(routing.num_tokens, world_size, token_splits)
    src = torch.repeat_interleave(torch.arange(world_size), torch.tensor(splits))  # [T] source rank
    ids = routing.topk_ids  # [T, K]
    dest = torch.where(ids >= 0, ids // El, world_size)  # [T, K] destination rank (P = dropped)
    hit = torch.zeros(routing.num_tokens, world_size + 1, dtype=torch.long).scatter_(1, dest, 1)[:, :world_size]
    out = torch.zeros(world_size, world_size, dtype=torch.long)
    return out.index_add_(0, src, hit)  # [P, P]


# ----------------------------------------------------------------------------- real run
def _all_gather_uneven(t: torch.Tensor, group) -> list[torch.Tensor]:
    """all_gather where dim 0 may differ per rank: gather sizes, pad to the largest, gather, trim."""
    import torch.distributed as dist

    P = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(P)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(P)]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [o[:s] for o, s in zip(out, sizes)]


def run_with_torch_distributed(program, group=None):
    """Drive one rank's plan generator, answering each request with a torch.distributed collective."""
    import torch.distributed as dist

    try:
        req = next(program)
        while True:
            if isinstance(req, AllToAll):
                t = req.tensor.contiguous()
                out = t.new_empty((sum(req.recv_splits),) + tuple(t.shape[1:]))
                dist.all_to_all_single(out, t, req.recv_splits, req.send_splits, group=group)
                answer = out
            elif isinstance(req, AllGather):
                answer = _all_gather_uneven(req.tensor, group)
            else:
                raise TypeError(f"unknown collective request {type(req).__name__}")
            req = program.send(answer)
    except StopIteration as stop:
        return stop.value


def ep_forward(x: torch.Tensor, routing: Routing, w13_local: torch.Tensor, w2_local: torch.Tensor, *,
               num_experts: int, group=None, strategy: str = "grouped", capacity: CapacityConfig | None = None,
               scoring: str = "softmax", scheme: str = "grouped") -> EPOutput:
    """Expert-parallel MoE forward of this process's tokens x [T, D] with its shard w13_local [El, 2F, D].

    Every rank of `group` (default: the world) must call it together. routing [T, K] holds global expert
    ids. Returns this rank's output [T, D] and EPRankStats (including the group's traffic matrix).
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ep_forward needs torch.distributed initialised (torchrun + init_process_group); "
                           "for a single process use moe_ref.parallel.simulate_ep")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    prog = SCHEMES[scheme](x, routing, w13_local, w2_local, num_experts=num_experts, world_size=P, rank=rank,
                           strategy=strategy, capacity=capacity, scoring=scoring)
    y, stats = run_with_torch_distributed(prog, group)
    return EPOutput(y, stats)


# ----------------------------------------------------------------------------- simulation
def _simulate_step(reqs: list, meters: dict[str, torch.Tensor]) -> list:
    """Answer one lockstep collective of P virtual ranks with list shuffles; meter bytes p -> q."""
    P = len(reqs)
    kinds = {type(r) for r in reqs}
    if len(kinds) != 1:
        raise RuntimeError(f"ranks diverged: requests {[type(r).__name__ for r in reqs]}")
    m = meters.setdefault(reqs[0].tag, torch.zeros(P, P, dtype=torch.long))
    if isinstance(reqs[0], AllGather):
        for p, r in enumerate(reqs):
            m[p] += r.tensor.numel() * r.tensor.element_size()
        return [[r.tensor for r in reqs] for _ in range(P)]
    chunks = []
    for p, r in enumerate(reqs):
        if len(r.send_splits) != P or sum(r.send_splits) != r.tensor.shape[0]:
            raise RuntimeError(f"rank {p}: send_splits {r.send_splits} do not cut {r.tensor.shape[0]} rows")
        chunks.append(r.tensor.split(r.send_splits))
        row = r.tensor[:1].numel() * r.tensor.element_size()
        m[p] += torch.tensor(r.send_splits) * row
    out = []
    for q, r in enumerate(reqs):
        got = [chunks[p][q] for p in range(P)]
        if [g.shape[0] for g in got] != list(r.recv_splits):
            raise RuntimeError(f"rank {q}: expects {r.recv_splits} rows, peers send {[g.shape[0] for g in got]}")
        out.append(torch.cat(got))
    return out


def simulate_ep(x: torch.Tensor, routing: Routing, w13: torch.Tensor, w2: torch.Tensor, world_size: int, *,
                token_splits=None, strategy: str = "grouped", capacity: CapacityConfig | None = None,
                scoring: str = "softmax", scheme: str = "grouped") -> EPSimResult:
    """Run the EP plan on P virtual ranks in this process.

    x [T_total, D] and routing [T_total, K] are the whole batch; rank p gets the p-th contiguous chunk of
    tokens (sizes token_splits, default near-even) and experts [p*El, (p+1)*El) of w13 [E, 2F, D],
    w2 [E, D, F]. The output equals moe_forward / reference_moe of the whole batch (same capacity).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    if not isinstance(w13, torch.Tensor) or w13.dim() != 3:
        raise ValueError(f"w13 must be [E, 2F, D], got {getattr(w13, 'shape', type(w13).__name__)}")
    E = w13.shape[0]
    check_world(E, world_size)
    check_x2d(x, w13.shape[2])
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moe_ref.Routing, got {type(routing).__name__}")
    if routing.num_tokens != x.shape[0]:
        raise ValueError(f"routing has {routing.num_tokens} tokens but x has {x.shape[0]}")
    splits = split_tokens(x.shape[0], world_size, token_splits)
    progs = []
    for p, (xp, rp) in enumerate(zip(x.split(splits), split_routing(routing, splits))):
        w13p, w2p = shard_experts(w13, w2, world_size, p)
        progs.append(SCHEMES[scheme](xp, rp, w13p, w2p, num_experts=E, world_size=world_size, rank=p,
                                     strategy=strategy, capacity=capacity, scoring=scoring))
    meters: dict[str, torch.Tensor] = {}
    reqs = [next(g) for g in progs]
    while True:
        answers = _simulate_step(reqs, meters)
        nxt, done = [], []
        for g, a in zip(progs, answers):
            try:
                nxt.append(g.send(a))
            except StopIteration as stop:
                done.append(stop.value)
        if done:
            if nxt:
                raise RuntimeError("ranks diverged: some finished while others wait in a collective")
            break
        reqs = nxt
    ys, stats = zip(*done)
    return EPSimResult(output=torch.cat(ys), rank_stats=list(stats), traffic_bytes=meters)


# ----------------------------------------------------------------------------- local process groups
def free_port() -> int:
    """A free TCP port on the loopback interface (for MASTER_PORT)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_entry(fn, rank, world_size, port, backend, collective_timeout, args, q):
    import traceback

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        q.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException as e:  # report every failure, then leave (peers see the closed connection)
        q.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local_group(fn, world_size: int, args=(), *, timeout: float = 60.0, collective_timeout: float = 20.0,
                    backend: str = "gloo") -> dict[int, tuple[str, object]]:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes joined in a loopback process group.

    Bounded in time: each collective fails after `collective_timeout` s, and any process still running
    after `timeout` s is killed. Returns {rank: (status, payload)} with status "ok" (payload = fn's return
    value, which must pickle), "error" (the exception and a short traceback), "died" (exit code, no
    report) or "timeout". fn must be importable by name (a module-level function), as spawn requires.
    """
    import multiprocessing as mp
    import queue
    import time

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_group_entry, daemon=True,
                         args=(fn, r, world_size, port, backend, collective_timeout, tuple(args), q))
             for r in range(world_size)]
    for pr in procs:
        pr.start()
    results: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    gone_since: dict[int, float] = {}
    while len(results) < world_size and time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=0.1)
            results[rank] = (status, payload)
        except queue.Empty:
            for r, pr in enumerate(procs):  # a process that exited without a report (killed, crashed)
                if r not in results and pr.exitcode is not None:
                    if time.monotonic() - gone_since.setdefault(r, time.monotonic()) > 2.0:
                        results[r] = ("died", pr.exitcode)
    for r, pr in enumerate(procs):
        if r not in results:
            results[r] = ("timeout", f"rank {r} still running after {timeout:.0f} s: killed")
        if pr.is_alive():
            pr.kill()
        pr.join(5)
    return dict(sorted(results.items()))


def launch_torchrun(nproc: int, cli_args=(), timeout: float = 180.0) -> tuple[int, str]:
    """Run `torchrun --nproc-per-node nproc -m moe_ref.parallel *cli_args` on loopback; return (exit code, output).

    The launcher and its workers run in their own process group, with output in a temporary file (not a
    pipe), so on timeout the whole group is killed and a TimeoutError carries the output so far.
    """
    import signal
    import subprocess
    import tempfile

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "moe_ref.parallel", *map(str, cli_args)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.seek(0)
            tail = log.read()[-4000:]
            raise TimeoutError(f"torchrun did not finish in {timeout:.0f} s (killed); output:\n{tail}") from None
        log.seek(0)
        return code, log.read()


# ----------------------------------------------------------------------------- CLI (torchrun)
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
    return p


def _uneven_splits(T: int, P: int) -> list[int]:
    """Rank 0 gets no tokens, rank p>0 a share growing with p (a rank with no tokens of its own)."""
    if P == 1:
        return [T]
    w = list(range(P))
    s = [T * wi // sum(w) for wi in w]
    s[-1] += T - sum(s)
    return s


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def main(argv=None) -> int:
    """torchrun entry point (`python -m moe_ref.parallel`): EP forward vs single-process, per-rank report."""
    import torch.distributed as dist

    from .layer import MoELayer, moe_forward
    from .reference import reference_moe
    from .skew import skewed_routing

    args = _parser().parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # loopback only
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        return _main(args, dist, backend, MoELayer, moe_forward, reference_moe, skewed_routing)
    finally:
        dist.destroy_process_group()


def _main(args, dist, backend, MoELayer, moe_forward, reference_moe, skewed_routing) -> int:
    rank, P = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    D, F, E, K = PRESETS[args.preset]
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K)
    layer = MoELayer(cfg, dtype=dtype, seed=args.seed).to(dev)  # same seeded weights on every rank
    g = torch.Generator().manual_seed(args.seed + 1)
    x_all = torch.randn(args.tokens, D, generator=g).to(dev, dtype)  # [T_total, D] same on every rank
    splits = _uneven_splits(args.tokens, P) if args.uneven else split_tokens(args.tokens, P)
    lo = sum(splits[:rank])
    x = x_all[lo: lo + splits[rank]]  # [T, D] this rank's own tokens
    routing = skewed_routing(x, layer.router_weight, K, args.skew)  # skew=0: exactly layer.route(x)
    cap = None
    if args.capacity_factor is not None:
        cap = CapacityConfig(capacity_factor=args.capacity_factor, drop_policy=args.drop_policy,
                             overflow=args.overflow)
    w13, w2 = shard_experts(layer.w13.detach(), layer.w2.detach(), P, rank)
    out = ep_forward(x, routing, w13, w2, num_experts=E, strategy=args.strategy, capacity=cap,
                     scheme=args.scheme)
    st = out.stats
    lines = [f"[rank {rank}/{P}] backend={backend} experts {shard_bounds(E, P, rank)} own tokens {st.num_tokens} "
             f"sent rows {st.send_rows.tolist()} recv rows {st.recv_rows.tolist()} "
             f"local expert load {st.local_expert_load.tolist()} bytes sent {_fmt_bytes(st.bytes_sent)} "
             f"received {_fmt_bytes(st.bytes_received)} meta {_fmt_bytes(st.meta_bytes_sent)} "
             f"dropped(own) {st.dropped_own}"]
    ys = torch.cat(run_with_torch_distributed(_gather_gen(out.output), None))  # [T_total, D] on every rank
    ok = True
    if args.check:
        r_all = skewed_routing(x_all, layer.router_weight, K, args.skew)
        single = moe_forward(x_all, r_all, layer.w13, layer.w2, strategy="grouped", capacity=cap)
        from .capacity import apply_capacity

        final = apply_capacity(r_all, E, cap)
        ref = sum(reference_moe(x_all.double(), r, layer.w13.double(), layer.w2.double()) for r in final.passes)
        tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
        try:
            torch.testing.assert_close(ys, single.output, **tol)
            torch.testing.assert_close(ys.double(), ref, **tol)
            if st.dropped != single.stats.dropped or st.passes != single.stats.passes:
                raise AssertionError(f"capacity outcome differs: EP dropped {st.dropped} passes {st.passes}, "
                                     f"single dropped {single.stats.dropped} passes {single.stats.passes}")
            err = float((ys.double() - ref).abs().max()) if ys.numel() else 0.0
            lines.append(f"[rank {rank}] check OK: all {args.tokens} outputs match single-process MoELayer and "
                         f"reference_moe (max abs err vs float64 reference {err:.2e})")
        except AssertionError as e:
            ok = False
            lines.append(f"[rank {rank}] CHECK FAILED: {e}")
    # print rank by rank, in order
    for p in range(P):
        if p == rank:
            print("\n".join(lines), flush=True)
        dist.barrier()
    if rank == 0:
        print(_summary(st, E, args, backend), flush=True)
    flags = torch.tensor([0 if ok else 1], device=dev)
    dist.all_reduce(flags)
    if rank == 0 and args.check:
        print("CHECK PASSED on all ranks" if int(flags) == 0 else f"CHECK FAILED on {int(flags)} rank(s)", flush=True)
    return 0 if int(flags) == 0 else 1


def _gather_gen(t):
    parts = yield AllGather(t, "tokens")
    return parts


def _summary(st: EPRankStats, E: int, args, backend: str) -> str:
    P = st.world_size
    tr = st.traffic_rows
    off = int(tr.sum() - tr.diagonal().sum())
    T = int(st.rank_tokens.sum())
    naive_rows = 2 * T * (P - 1)
    grouped_rows = 2 * off
    out = [f"== expert parallel: P={P} ({backend}), preset {args.preset} (E={E}), T={T}, skew={args.skew}, "
           f"capacity_factor={args.capacity_factor}, overflow={args.overflow}, scheme={args.scheme}",
           "traffic matrix, dispatch rows from rank p (row) to rank q (col):"]
    out += ["  " + " ".join(f"{int(v):6d}" for v in row) for row in tr]
    out.append(f"per-rank own tokens {st.rank_tokens.tolist()}; expert rows computed per rank "
               f"{st.rank_load.tolist()}; imbalance (max/mean) {st.imbalance:.3f}")
    out.append(f"capacity C={st.capacity} dropped={st.dropped} dropped_tokens={st.dropped_tokens} "
               f"rerouted={st.rerouted} passes={st.passes}")
    if args.scheme == "grouped":
        out.append(f"token rows crossing links (dispatch + combine): grouped all_to_all {grouped_rows} "
                   f"({_fmt_bytes(grouped_rows * st.row_bytes)}) vs naive all-gather/reduce-scatter "
                   f"{naive_rows} ({_fmt_bytes(naive_rows * st.row_bytes)}, 2*T*(P-1)): "
                   f"{grouped_rows / max(naive_rows, 1):.2f}x")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
