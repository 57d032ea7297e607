"""Process launchers on loopback: a spawned gloo group for tests and notebooks, and torchrun for the CLI.

Legend: P ranks (world_size); no tensors here (each rank builds its own T tokens, D d_model, E experts).
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on the loopback interface (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_entry(fn, rank, world_size, port, backend, collective_timeout, args, q):
    """One spawned rank: join the group, run fn, report ("ok", value) or ("error", traceback) on q."""
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


def _collect(q, procs, timeout: float) -> dict[int, tuple[str, object]]:
    """Reports from q until every rank reported, died (exit without a report) or the deadline passed."""
    results: dict[int, tuple[str, object]] = {}
    deadline = time.monotonic() + timeout
    gone_since: dict[int, float] = {}
    while len(results) < len(procs) and time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=0.1)
            results[rank] = (status, payload)
        except queue.Empty:
            for r, pr in enumerate(procs):  # a process that exited without a report (killed, crashed)
                if r not in results and pr.exitcode is not None:
                    if time.monotonic() - gone_since.setdefault(r, time.monotonic()) > 2.0:
                        results[r] = ("died", pr.exitcode)
    return results


def run_local_group(fn, world_size: int, args=(), *, timeout: float = 60.0, collective_timeout: float = 20.0,
                    backend: str = "gloo") -> dict[int, tuple[str, object]]:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes joined in a loopback process group.

    Bounded in time: each collective fails after `collective_timeout` s, and any process still running
    after `timeout` s is killed. Returns {rank: (status, payload)} with status "ok" (payload = fn's return
    value, which must pickle), "error" (the exception and a short traceback), "died" (exit code, no
    report) or "timeout". fn must be importable by name (a module-level function), as spawn requires.
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_group_entry, daemon=True,
                         args=(fn, r, world_size, port, backend, collective_timeout, tuple(args), q))
             for r in range(world_size)]
    for pr in procs:
        pr.start()
    results = _collect(q, procs, timeout)
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
