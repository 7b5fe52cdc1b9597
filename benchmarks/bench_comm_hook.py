"""Bytes the top-k DDP communication hook sends against DDP's dense all-reduce, side by side.

Two processes (gloo on CPU, or NCCL with --backend nccl on two GPUs) train a GPT-2 from a small
config (6 x 384, 30M parameters) for --iterations steps under DDP, once with the default
all-reduce and once per --density with subnetscope's top-k hook (error feedback per bucket, the
first iteration dense). Prints bytes sent per rank over the run, the ratio to dense, the seconds
per iteration, and the relative distance of the final weights from the dense run's.
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
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * iterations
    t0 = time.perf_counter()
    for it in range(iterations):
        ids = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(10 * it + rank)).to(device)
        ddp(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - t0) / iterations
    if rank == 0:
        results[density] = {"bytes": state.bytes_sent if state else dense_bytes, "dense_bytes": dense_bytes,
                            "seconds": seconds, "weights": torch.cat([p.detach().cpu().reshape(-1) for p in model.parameters()])}
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import torch.multiprocessing as mp

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--density", type=float, nargs="+", default=[0.01, 0.1], help="fractions sent (default 0.01 0.1)")
    p.add_argument("--iterations", type=int, default=6, help="training iterations (default 6)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo", help="(default gloo, CPU)")
    args = p.parse_args()
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
    print(f"dense all-reduce: {dense['bytes'] / 1e6:.1f} MB per rank over {args.iterations} iterations, "
          f"{dense['seconds']:.3f} s/iteration")
    for density in args.density:
        r = results[density]
        drift = float((r["weights"] - dense["weights"]).norm() / dense["weights"].norm())
        print(f"top-k density {density}: {r['bytes'] / 1e6:.1f} MB ({r['bytes'] / r['dense_bytes']:.3f}x dense), "
              f"{r['seconds']:.3f} s/iteration ({r['seconds'] / dense['seconds']:.2f}x), "
              f"final weights {drift:.2e} from the dense run's (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
