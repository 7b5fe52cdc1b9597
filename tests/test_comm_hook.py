"""The top-k DDP communication hook on 2 real processes (gloo, CPU): the bytes it counts follow its
formula and are what the processes write to their sockets, and the averaged sparse gradient (and so the
SGD update) equals an independent computation from each process's own gradients; and the trainers'
--ddp_topk_density under torchrun."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from subnetscope.aspg import TopKHookState, topk_hook

from .conftest import at_once

ROOT = Path(__file__).resolve().parents[1]
DENSITY = 0.1
LR = 0.1
ITERATIONS = 3
HEADER_ALLOWANCE = 1024  # bytes of gloo framing per collective, at most (measured: 288-576)


def socket_bytes_written() -> int:
    """Bytes this process (every thread) has passed to write()/writev(): gloo's sends among them."""
    return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["wchar"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 32),
                                torch.nn.Tanh(), torch.nn.Linear(32, 4))
    params = list(model.parameters())
    position = {id(p): i for i, p in enumerate(params)}
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.004)  # several buckets
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    state = TopKHookState(DENSITY, start_iter=1)
    buckets = []

    def recording_hook(hook_state, bucket):
        buckets.append(([position[id(p)] for p in bucket.parameters()], bucket.buffer().numel()))
        return topk_hook(hook_state, bucket)

    ddp.register_comm_hook(state, recording_hook)
    steps = []
    for it in range(ITERATIONS):
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(100 * it + rank))
        local = [g.clone() for g in torch.autograd.grad(model(x).square().mean(), params)]
        before = [p.detach().clone() for p in params]
        buckets.clear()
        sent_before, wire_before = state.bytes_sent, socket_bytes_written()
        ddp(x).square().mean().backward()
        wire = socket_bytes_written() - wire_before
        steps.append({"local": local, "synced": [p.grad.clone() for p in params], "before": before,
                      "buckets": list(buckets), "hook_bytes": state.bytes_sent - sent_before, "wire_bytes": wire})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps[-1]["after"] = [p.detach().clone() for p in params]
    results[rank] = steps
    dist.destroy_process_group()


def _two_ranks() -> dict | None:
    """Each rank's steps of _worker, or None without /proc/self/io."""
    if not Path("/proc/self/io").is_file():
        return None
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    return dict(results)


def _grpo_under_torchrun(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(ROOT / "main_grpo.py"), "--easy", "--policy", "tiny-gpt2", "--device", "cpu",
                           "--precision", "fp32", "--batch_size", "4", "--max_steps", "3", "--no_tqdm",
                           "--ddp_topk_density", str(DENSITY), "--output_dir", str(out)],
                          capture_output=True, text=True, cwd=ROOT, check=False)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> tuple[dict | None, Path, subprocess.CompletedProcess]:
    """This file's two multi-process runs, side by side: the hook's two ranks (None without /proc/self/io), and
    GRPO under torchrun (its folder and result)."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    ranks, grpo = at_once(_two_ranks, lambda: _grpo_under_torchrun(out))
    return ranks, out, grpo


@pytest.fixture(scope="module")
def two_ranks(ddp_runs) -> dict:
    if ddp_runs[0] is None:
        pytest.skip("needs /proc/self/io (Linux I/O accounting) to count the bytes written")
    return ddp_runs[0]


def formula_bytes(buckets: list, dense: bool) -> int:
    """The hook's formula: a dense iteration sends each bucket's n float32 entries (4 bytes); a sparse one
    ceil(density·n) entries as int32 index + float32 value (8 bytes)."""
    return sum(4 * n if dense else 8 * math.ceil(DENSITY * n) for _, n in buckets)


@pytest.mark.slow
def test_hook_bytes_follow_the_formula_and_the_sockets(two_ranks):
    for rank, steps in two_ranks.items():
        for it, step in enumerate(steps):
            buckets = step["buckets"]
            assert len(buckets) == 1 if it == 0 else len(buckets) >= 2  # DDP rebuilds its buckets after the first
            expected = formula_bytes(buckets, dense=it == 0)
            assert step["hook_bytes"] == expected, (rank, it)
            collectives = len(buckets) * (1 if it == 0 else 2)  # an all-reduce, or two all-gathers, per bucket
            assert expected <= step["wire_bytes"] <= expected + HEADER_ALLOWANCE * collectives, (rank, it, step)


@pytest.mark.slow
def test_two_processes_average_the_independent_top_k(two_ranks):
    """Recomputed here from each rank's own local gradients (taken without DDP): per bucket, in the
    bucket's parameter order, grad + residual, the top ceil(density·n) by magnitude, the rest kept as
    the next residual, and the mean of the two ranks' sparse vectors; the first iteration the dense mean."""
    residuals: dict[tuple[int, int], torch.Tensor] = {}
    r0, r1 = two_ranks[0], two_ranks[1]
    for it in range(ITERATIONS):
        expected = [(a + b) / 2 for a, b in zip(r0[it]["local"], r1[it]["local"])]
        if it > 0:
            for b, (order, n) in enumerate(r0[it]["buckets"]):
                sparse = []
                for rank, steps in two_ranks.items():
                    flat = torch.cat([steps[it]["local"][i].reshape(-1) for i in order])
                    corrected = flat + residuals.get((rank, b), torch.zeros(n))
                    top = corrected.abs().topk(math.ceil(DENSITY * n)).indices
                    kept = torch.zeros(n)
                    kept[top] = corrected[top]
                    residuals[rank, b] = corrected - kept
                    sparse.append(kept)
                mean = (sparse[0] + sparse[1]) / 2
                for i, piece in zip(order, mean.split([r0[it]["local"][i].numel() for i in order])):
                    expected[i] = piece.view_as(expected[i])
        for rank, steps in two_ranks.items():
            step = steps[it]
            for i, want in enumerate(expected):
                torch.testing.assert_close(step["synced"][i], want, rtol=1e-6, atol=1e-8)
                torch.testing.assert_close(step["after"][i], step["before"][i] - LR * want, rtol=1e-6, atol=1e-8)
            if it > 0:
                share = sum(int((g != 0).sum()) for g in step["synced"]) / sum(g.numel() for g in step["synced"])
                assert share <= 2 * DENSITY + 0.02  # a sparse average: at most both ranks' entries (+ rounding)


@pytest.mark.slow
def test_grpo_under_torchrun_sends_the_top_k_and_logs_its_bytes(ddp_runs):
    _, out, result = ddp_runs
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    settings = json.loads((out / "run_config.json").read_text())
    total = sum(math.prod(shape) for shape in settings["parameters"].values())  # tiny GPT-2: 42,848 weights
    # every weight's float32 gradient is in DDP's buckets; they fit one (25 MB cap): the formula in one term
    assert [r["comm/dense_bytes"] for r in records] == [4 * total] * 3
    assert [r["comm/topk_bytes"] for r in records] == [4 * total] + [8 * math.ceil(DENSITY * total)] * 2
    assert settings["settings"]["ddp_topk_density"] == DENSITY
