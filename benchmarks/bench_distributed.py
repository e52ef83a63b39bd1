"""Data-parallel training throughput: rows per second of 1 and 2 processes (gloo, CPU).

Each run trains a density flow (``activation_flow(D, blocks, FAMILY, role="density")``,
float32) with :func:`pyro_lunet.train_epoch` on ``--steps`` global batches of ``--batch``
rows, after ``--warmup`` steps, one intra-op thread per process, and reports rows per
second. Under a process group ``train_epoch`` is data-parallel (each rank its share of
every global batch, one gradient all-reduce per step), so the rows are the same; the
speed-up is what spreading them buys.

Communication per step and rank: one all-reduce of every gradient, P parameters of 4
bytes; a ring all-reduce sends and receives ``2 (W - 1) / W * 4 P`` bytes per rank. The
projection for more processes is ``t(W) = t_compute(1) / W + t_allreduce(W)``, with the
compute time of one process measured here and the all-reduce time scaled from the one
measured at W = 2 by the ring's volume factor (``2 (W - 1) / W``) plus its ``2 (W - 1)``
latency terms at the measured per-message latency: an estimate for one machine with enough
cores; across machines the network's bandwidth replaces the loopback's.

This machine: 2 CPU cores shared with other work, so 2 processes is the most that can be
shown, and a busy machine takes from both; run it on an idle one (``--quick`` for a smoke
run)::

    python benchmarks/bench_distributed.py --dim 1024 --blocks 2 --family lu

Measured here (2 shared cores, load average about 6): 3,148,800 parameters, 12.6 MB of
gradients a step; 1 process 761 rows/s, 2 processes 1055 rows/s (x1.39); all-reduce 19.2 ms
at W = 2 (loopback), latency 1.3 ms; projected x1.89 / x3.35 / x5.11 / x5.94 at W = 2 / 4 /
8 / 16 on a machine with a core a process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as td
import torch.multiprocessing as mp

from pyro_lunet import Maintenance, activation_flow, train_epoch
from pyro_lunet._scoring import standard_normal


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(args):
    torch.manual_seed(0)
    flow = activation_flow(args.dim, args.blocks, args.family, role="density")
    model = torch.distributions.TransformedDistribution(
        standard_normal(args.dim, torch.zeros(()), validate_args=False), flow
    )
    return flow, model


def _allreduce_seconds(numel: int, repeats: int) -> float:
    flat = torch.zeros(numel)
    td.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        td.all_reduce(flat)
    return (time.perf_counter() - start) / repeats


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        td.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=300),
        )  # fmt: skip
    flow, model = _build(args)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-4)
    maintenance = Maintenance(flow, optimizer)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(args.batch, args.dim, generator=gen) for _ in range(args.steps)]
    train_epoch(model, batches[: args.warmup], optimizer, maintenance)
    if world > 1:
        td.barrier()
    start = time.perf_counter()
    train_epoch(model, batches, optimizer, maintenance)
    if world > 1:
        td.barrier()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in flow.parameters())
    result = {"seconds": seconds, "params": params}
    if world > 1:
        result["allreduce_s"] = _allreduce_seconds(params, 20)
        result["latency_s"] = _allreduce_seconds(1, 50)
        td.destroy_process_group()
    if rank == 0:
        with open(out, "w") as file:
            json.dump(result, file)


def run(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.json")
        mp.spawn(_worker, args=(world, _free_port(), args, out), nprocs=world, join=True)
        with open(out) as file:
            return json.load(file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--family", default="lu")
    parser.add_argument("--batch", type=int, default=512, help="global batch size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="D = 128, 5 steps")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.steps, args.warmup = 128, 5, 1
    one, two = run(1, args), run(2, args)
    rows = args.batch * args.steps
    params = one["params"]
    print(
        f"{args.family} flow, D={args.dim}, {args.blocks} blocks, {params:,} parameters, "
        f"global batch {args.batch}, {args.steps} steps (float32, 1 thread a process)"
    )
    print(f"  1 process : {rows / one['seconds']:10.0f} rows/s")
    print(f"  2 processes: {rows / two['seconds']:10.0f} rows/s "
          f"(x{one['seconds'] / two['seconds']:.2f})")  # fmt: skip
    megabytes = 4 * params / 1e6
    print(
        f"  all-reduce per step: {megabytes:.1f} MB of gradients; a ring sends 2 (W-1)/W of it "
        f"per rank ({megabytes:.1f} MB at W=2); measured {two['allreduce_s'] * 1e3:.1f} ms at "
        f"W=2, latency {two['latency_s'] * 1e6:.0f} us"
    )
    compute = one["seconds"] / args.steps
    volume_time = max(two["allreduce_s"] - 2 * two["latency_s"], 0.0)  # W=2: factor 1
    print("  projection (one machine, enough cores; t = compute/W + all-reduce):")
    for world in (2, 4, 8, 16):
        comm = volume_time * 2 * (world - 1) / world + 2 * (world - 1) * two["latency_s"]
        step = compute / world + comm
        print(f"    W={world:2d}: {args.batch / step:10.0f} rows/s (x{compute / step:.2f})")


if __name__ == "__main__":
    main()
