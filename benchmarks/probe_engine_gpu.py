"""GPU diagnostics of the engine's batched pass, on bench_engine.py's medium pair.

  check  : analyze_pair on cuda (segments) against analyze_pair on the CPU (tensor by tensor),
           every tensor's counts and statistics; then three calls in one process
  ops    : per aten op, the synchronized time of each launch in a fresh process's first and second
           pass over a synthetic 16.8M-weight segment (CUDA loads a kernel's code on first launch)
  phases : a fresh process's first and second engine call split into waiting for reads and
           segment compute (the first segment apart)
  modules: a fresh process's first and second launch of ops the engine uses or could use; CUDA
           loads kernel code per family (source file) on first use, so an op whose family is
           loaded already costs nothing extra (run it twice: the first process reads the library
           files from disk)

Run: python benchmarks/probe_engine_gpu.py {check,ops,phases,modules} [--workdir DIR]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_engine import build_pair  # noqa: E402
from subnetscope import segments  # noqa: E402
from subnetscope.changes import ChangeRules  # noqa: E402
from subnetscope.checkpoint import open_checkpoint  # noqa: E402
from subnetscope.engine import analyze_pair  # noqa: E402

FIELDS = ("abs_max", "abs_mean", "abs_std", "abs_sum", "relative_norm")


def timed_pair(base: Path, tuned: Path, device: str):
    t0 = time.perf_counter()
    pair = analyze_pair(open_checkpoint(str(base)), open_checkpoint(str(tuned)), device=device, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return pair, time.perf_counter() - t0


def check(base: Path, tuned: Path) -> None:
    times = [timed_pair(base, tuned, "cuda")[1] for _ in range(2)]
    gpu, last = timed_pair(base, tuned, "cuda")
    cpu, cpu_s = timed_pair(base, tuned, "cpu")
    differing = [g.name for g, c in zip(gpu.tensors, cpu.tensors)
                 if g.changed != c.changed
                 or (g.nonfinite_base, g.nonfinite_tuned) != (c.nonfinite_base, c.nonfinite_tuned)
                 or any(abs(getattr(g, f) - getattr(c, f)) > 1e-5 * max(abs(getattr(c, f)), 1e-12) for f in FIELDS)]
    print(f"in-process cuda calls: {[round(t, 3) for t in times + [last]]} s; cpu {cpu_s:.3f} s")
    print(f"tensors {len(gpu.tensors)}, differing {len(differing)} {differing[:3]}; "
          f"shells equal: {gpu.shells == cpu.shells}; "
          f"exact {gpu.changed('exact')} vs {cpu.changed('exact')}")


def ops() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    record: list[tuple[str, float]] = []

    class SyncTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            torch.cuda.synchronize()
            record.append((func.__name__, time.perf_counter() - t))
            return out

    n1, n2, nowhere = 4096 * 4096, 1024, (Path(), 0, 0)
    members = [segments.Member("transformer.h.0.mlp.c_fc.weight", (4096, 4096), n1, 0, 1, nowhere, nowhere),
               segments.Member("transformer.h.0.mlp.c_fc.bias", (n2,), n2, n1, None, nowhere, nowhere)]
    gen = torch.Generator().manual_seed(0)  # made on the CPU, so that no kernel is loaded before the probe
    a = (torch.randn(n1 + n2, generator=gen) * 0.02).to(torch.bfloat16)
    b = torch.where(torch.rand(n1 + n2, generator=gen) < 0.05, a * 1.05 + 1e-3, a).to(torch.bfloat16)
    a, b = a.to("cuda"), b.to("cuda")
    for attempt in ("first", "second"):
        record.clear()
        with SyncTimer():
            list(segments.segment_stats(a, b, segments.Segment(torch.bfloat16, members, n1 + n2), ChangeRules()))
        top = sorted(record, key=lambda r: -r[1])[:12]
        print(f"{attempt} pass: {sum(t for _, t in record):.3f} s in {len(record)} ops; slowest: "
              + ", ".join(f"{name} {t * 1000:.1f} ms" for name, t in top))


def modules() -> None:
    n = 1 << 20
    gen = torch.Generator().manual_seed(0)  # inputs made on the CPU: no kernel is loaded before the probe
    a = (torch.randn(n, generator=gen) * 0.02).to(torch.bfloat16)
    f, m = torch.randn(n, generator=gen), torch.rand(n, generator=gen) < 0.5
    idx = torch.randint(0, n, (n // 20,), generator=gen).sort().values
    slots = torch.randint(0, 4000, (n // 20,), generator=gen)
    a, f, d, m, idx, slots = (x.to("cuda") for x in (a, f, f.double(), m, idx, slots))
    ai = a.view(torch.int16)
    offsets = torch.tensor([0, 1000, 50000, n], device="cuda")
    probes = {
        "xor int16": lambda: ai ^ ai, "xor bool": lambda: m ^ m, "or bool": lambda: m | m,
        "nonzero int16": lambda: ai.nonzero(), "nonzero bool": lambda: m.nonzero(),
        "ne int16": lambda: ai != ai, "eq float32": lambda: f == f, "le float32": lambda: f <= f,
        "le float64": lambda: d <= 0.5,
        "cast bf16 to float32": lambda: a.float(), "cast bool to float64": lambda: m.double(),
        "abs float32": lambda: f.abs(), "sub float32": lambda: f - f, "add int64": lambda: idx + 3,
        "mul float32": lambda: f * f, "mul float64": lambda: d * d, "isfinite": lambda: torch.isfinite(f),
        "where": lambda: torch.where(m, f, 0.0),
        "segment_reduce sum": lambda: torch.segment_reduce(d, "sum", offsets=offsets, unsafe=True, initial=0),
        "segment_reduce max": lambda: torch.segment_reduce(f, "max", offsets=offsets, unsafe=True, initial=0),
        "searchsorted": lambda: torch.searchsorted(idx, offsets),
        "gather bf16": lambda: a.gather(0, idx), "gather int64": lambda: idx.gather(0, slots),
        "scatter_add_ int64": lambda: torch.zeros(4000, dtype=torch.long, device="cuda").scatter_add_(0, slots, slots),
        "index_select bf16": lambda: a.index_select(0, idx), "index_select int64": lambda: idx.index_select(0, slots),
        "bincount": lambda: torch.bincount(slots, minlength=4000), "sum float64": lambda: d.sum(),
        "cumsum int64": lambda: slots.cumsum(0),
    }

    def launch_ms(fn) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1000

    times = [(name, launch_ms(fn), launch_ms(fn)) for name, fn in probes.items()]
    print(f"first launches {sum(t for _, t, _ in times):.0f} ms in all (first / second, ms): "
          + ", ".join(f"{name} {t1:.1f} / {t2:.2f}" for name, t1, t2 in times))


def phases(base: Path, tuned: Path) -> None:
    spent: dict[str, float] = {}
    wait = segments.RangeReader.wait
    stats = segments.segment_stats

    def timed_wait(self, futures):
        t = time.perf_counter()
        wait(self, futures)
        spent["wait_reads"] = spent.get("wait_reads", 0) + time.perf_counter() - t

    def timed_stats(*args, **kwargs):
        t = time.perf_counter()
        out = list(stats(*args, **kwargs))
        key = "first_segment" if "first_segment" not in spent else "other_segments"
        spent[key] = spent.get(key, 0) + time.perf_counter() - t
        return iter(out)

    segments.RangeReader.wait, segments.segment_stats = timed_wait, timed_stats
    for call in ("first", "second"):
        spent.clear()
        total = timed_pair(base, tuned, "cuda")[1]
        print(f"{call} call: {total:.3f} s; " + ", ".join(f"{k} {v:.3f} s" for k, v in spent.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("probe", choices=("check", "ops", "phases", "modules"), help="which diagnostic (see above)")
    p.add_argument("--workdir", default="/tmp/subnetscope-bench", help="where bench_engine.py keeps its pairs")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("these probes need a CUDA GPU")
    torch.zeros(1, device="cuda")  # the CUDA context, as in bench_engine.py
    if args.probe == "ops":
        ops()
        return
    if args.probe == "modules":
        modules()
        return
    base, tuned = build_pair(Path(args.workdir), "medium", 0.05)
    if args.probe == "check":
        check(base, tuned)
    else:
        phases(base, tuned)


if __name__ == "__main__":
    main()
