"""Bytes the top-k DDP communication hook sends against DDP's dense all-reduce, side by side, measured.

Two processes (gloo on CPU, or NCCL with --backend nccl on two GPUs) train a GPT-2 from a small
config (6 x 384, 30M parameters) for --iterations steps under DDP, once with the default
all-reduce and once per --density with subnetscope's top-k hook (error feedback per bucket, the
first iteration dense). Per step, rank 0 reports the bytes its process wrote to its sockets during
backward (gloo only: /proc/self/io's wchar, every thread, measured), beside the hook's own count (its
formula: n·4 bytes per bucket of n entries when dense, ceil(density·n)·8 when sparse), the ratios to
the dense run, the seconds per iteration, and the relative distance of the final weights from the
dense run's. "first" = iteration 1 (dense in every run), "later" = the mean of the others.
Run: python benchmarks/bench_comm_hook.py [--density 0.01 0.1] [--iterations 6]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def socket_bytes_written() -> int | None:
    """Bytes this process has passed to write()/writev() (gloo's sends among them); None where unknown."""
    io = Path("/proc/self/io")
    if not io.is_file():
        return None
    return int(dict(line.split(": ") for line in io.read_text().splitlines())["wchar"])


def _worker(rank: int, port: int, backend: str, density: float | None, iterations: int, results) -> None:
    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel

    from subnetscope.aspg import register_topk_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=2)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=384, n_head=6, n_positions=128, resid_pdrop=0.0,
                                       embd_pdrop=0.0, attn_pdrop=0.0)).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = register_topk_hook(ddp, density) if density is not None else None
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    dense_step = sum(p.numel() * p.element_size() for p in model.parameters())
    wire, counted = [], []
    t0 = time.perf_counter()
    for it in range(iterations):
        ids = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(10 * it + rank)).to(device)
        loss = ddp(input_ids=ids, labels=ids).loss
        sent, before = (state.bytes_sent if state else 0), socket_bytes_written()
        loss.backward()
        after = socket_bytes_written()
        wire.append(after - before if backend == "gloo" and before is not None else None)
        counted.append(state.bytes_sent - sent if state else dense_step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - t0) / iterations
    if rank == 0:
        results[density] = {"wire": wire, "counted": counted, "seconds": seconds,
                            "weights": torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])}
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mb(values: list) -> str:
    return "n/a" if values[0] is None else f"{sum(values) / len(values) / 1e6:.3f}"


def main() -> int:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--density", type=float, nargs="+", default=[0.01, 0.1], help="fractions sent (default 0.01 0.1)")
    p.add_argument("--iterations", type=int, default=6, help="training iterations, at least 2 (default 6)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo", help="(default gloo, CPU)")
    args = p.parse_args()
    if args.iterations < 2:
        p.error("--iterations must be at least 2 (the first is dense in every run)")
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    for density in [None, *args.density]:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, port, args.backend, density, args.iterations, results))
                 for r in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            print(f"density {density}: a worker failed", file=sys.stderr)
            return 1
    dense = results[None]
    print(f"2 processes, {args.backend}, GPT-2 6 x 384, {args.iterations} iterations; MB per step written by rank 0 "
          "(measured on its sockets) and counted by the hook's formula")
    print("run | measured first | measured later | counted later | measured later / dense | counted later / dense "
          "| s/iteration | final weights from dense (relative)")
    for density in [None, *args.density]:
        r = results[density]
        later_wire, later_counted = r["wire"][1:], r["counted"][1:]
        name = "dense all-reduce" if density is None else f"top-k {density}"
        ratio_wire = ("n/a" if later_wire[0] is None else
                      f"{sum(later_wire) / sum(dense['wire'][1:]):.4f}")
        ratio_counted = sum(later_counted) / sum(dense["counted"][1:])
        drift = float((r["weights"] - dense["weights"]).norm() / dense["weights"].norm())
        print(f"{name} | {_mb(r['wire'][:1])} | {_mb(later_wire)} | {_mb(later_counted)} | {ratio_wire} | "
              f"{ratio_counted:.4f} | {r['seconds']:.3f} ({r['seconds'] / dense['seconds']:.2f}x) | {drift:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
