"""Engine speed and memory, measured side by side in one run.

Builds a pair of bf16 checkpoints with GPT-2-medium shapes (355M parameters; --shape 4b for a
synthetic 4B-parameter pair) and a planted sparse delta, then times, each in a fresh process, the
tasks taking turns:

  read   : just reading both checkpoints' bytes (readinto a reused buffer)
  engine : subnetscope's full metrics, rank off (analyze_pair)
  usual  : from_pretrained both, state dicts, concatenate all deltas, count

(on a GPU also engine_loaded: the engine with its kernels loaded before the clock starts, by
segments.load_kernels, like the CUDA context start-up that every task does untimed; CUDA loads
each kernel's code on first launch, a per-process cost that does not grow with the checkpoint and
that the engine hides behind its reads where it can, so the two engine rows show what is left of
it), and prints the ratios the targets are stated in, with every process's peak RSS.
Run: python benchmarks/bench_engine.py [--shape medium|4b] [--device cpu|cuda] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "4b": dict(n_layer=40, n_embd=2880, n_head=20),
}


def build_pair(workdir: Path, shape: str, density: float, seed: int = 0) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    base, tuned = workdir / f"{shape}-base", workdir / f"{shape}-tuned"
    if (tuned / "model.safetensors").exists():
        return base, tuned
    config = GPT2Config(**SHAPES[shape], vocab_size=50257, n_positions=1024, torch_dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in GPT2LMHeadModel(config).state_dict().items() if k != "lm_head.weight"}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    for folder in (base, tuned):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
    a, b = {}, {}
    for name, s in shapes.items():
        w = (torch.randn(s, generator=gen, device=dev) * 0.02).to(torch.bfloat16)
        mask = torch.rand(s, generator=gen, device=dev) < density
        a[name] = w.cpu()
        b[name] = torch.where(mask, (w.float() * 1.05 + 1e-3).to(torch.bfloat16), w).cpu()
    save_file(a, str(base / "model.safetensors"), metadata={"format": "pt"})
    del a
    save_file(b, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    return base, tuned


def task_read(base: str, tuned: str, device: str) -> dict:
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    total = 0
    for folder in (base, tuned):
        with open(Path(folder) / "model.safetensors", "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return {"bytes": total}


def task_engine(base: str, tuned: str, device: str) -> dict:
    from subnetscope.checkpoint import open_checkpoint
    from subnetscope.engine import analyze_pair

    pair = analyze_pair(open_checkpoint(base), open_checkpoint(tuned), device=device, progress=False)
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()
    return {"exact_changed": pair.changed("exact"), "numel": pair.numel}


def task_usual(base: str, tuned: str, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.bfloat16).state_dict()
    deltas = torch.cat([(b[k].float() - a[k].float()).flatten() for k in a if k != "lm_head.weight"])
    changed = int((deltas != 0).sum())
    _ = int((deltas.abs() > 1e-5).sum())
    return {"exact_changed": changed, "numel": deltas.numel()}


TASKS = {"read": task_read, "engine": task_engine, "engine_loaded": task_engine, "usual": task_usual}


def run_child(task: str, base: Path, tuned: Path, device: str) -> dict:
    """Time one task in a fresh process; it reports its own peak RSS (VmHWM: wait4's ru_maxrss would
    include the parent's memory at fork time, which Linux carries across exec)."""
    cmd = [sys.executable, __file__, "--child", task, "--base", str(base), "--tuned", str(tuned), "--device", device]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark task {task} failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def child(task: str, base: str, tuned: str, device: str) -> None:
    if task != "read":
        import torch  # noqa: F401  (import cost is not part of the work being timed)
        import subnetscope.engine  # noqa: F401
        if task == "usual":
            import transformers  # noqa: F401
        if device.startswith("cuda"):
            torch.zeros(1, device=device)  # CUDA context start-up is not part of the work
        if task == "engine_loaded":
            from subnetscope.segments import load_kernels
            load_kernels(device)
    start_rss = current_rss_mb()
    t0 = time.perf_counter()
    result = TASKS[task](base, tuned, device)
    result["seconds"] = time.perf_counter() - t0
    result["rss_before_work_mb"] = start_rss
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="medium", help="checkpoint shapes (default GPT-2-medium)")
    p.add_argument("--device", default="cpu", help="where the engine computes (cpu or cuda)")
    p.add_argument("--density", type=float, default=0.05, help="fraction of weights the planted delta changes")
    p.add_argument("--workdir", default="/tmp/subnetscope-bench", help="where the checkpoints are written")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per task; the median is reported")
    p.add_argument("--skip_usual", action="store_true", help="skip the from_pretrained approach (for the 4B pair)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--tuned", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.base, args.tuned, args.device)
        return
    base, tuned = build_pair(Path(args.workdir), args.shape, args.density)
    size_gb = sum((f / "model.safetensors").stat().st_size for f in (base, tuned)) / 1e9
    tasks = ["read", "engine"] + (["engine_loaded"] if args.device.startswith("cuda") else [])
    tasks += [] if args.skip_usual else ["usual"]
    task_read(str(base), str(tuned), args.device)  # warm the page cache: every task reads warm
    runs: dict[str, list[dict]] = {task: [] for task in tasks}
    for repeat in range(args.repeats):  # interleaved, so that a drifting machine affects every task alike
        for task in tasks:
            if task != "usual" or repeat == 0:
                runs[task].append(run_child(task, base, tuned, args.device))
    results = {}
    for task, done in runs.items():
        done.sort(key=lambda r: r["seconds"])
        results[task] = done[len(done) // 2]
        results[task]["all_seconds"] = [round(r["seconds"], 3) for r in done]
    largest_pair_mb = largest_tensor_pair_mb(base)
    print(json.dumps(results, indent=1))
    e, r = results["engine"], results["read"]
    print(f"\npair: {args.shape} shapes, {e['numel'] / 1e6:.0f}M parameters, {size_gb:.2f} GB of bf16 checkpoints, "
          f"engine on {args.device}")
    print(f"read both checkpoints : {r['seconds']:.3f} s ({size_gb / r['seconds']:.2f} GB/s)")
    print(f"engine, full metrics  : {e['seconds']:.3f} s ({size_gb / e['seconds']:.2f} GB/s)  "
          f"ratio to read = {e['seconds'] / r['seconds']:.2f}x (target <= 1.5x)")
    if "engine_loaded" in results:
        w = results["engine_loaded"]
        print(f"engine, kernels loaded: {w['seconds']:.3f} s ({size_gb / w['seconds']:.2f} GB/s)  "
              f"ratio to read = {w['seconds'] / r['seconds']:.2f}x (kernel loading at start-up, untimed)")
    if "usual" in results:
        u = results["usual"]
        assert u["exact_changed"] == e["exact_changed"], "the two approaches disagree"
        print(f"usual approach        : {u['seconds']:.3f} s  "
              f"speed-up = {u['seconds'] / e['seconds']:.1f}x (target >= 5x)")
        print(f"peak RSS usual        : {u['peak_rss_mb']:.0f} MB")
    print(f"peak RSS engine       : {e['peak_rss_mb']:.0f} MB, "
          f"{e['peak_rss_mb'] - e['rss_before_work_mb']:.0f} MB above "
          f"the process before the work; largest tensor pair {largest_pair_mb:.0f} MB; "
          f"excess over the pair = {e['peak_rss_mb'] - e['rss_before_work_mb'] - largest_pair_mb:.0f} MB "
          f"(target <= 1024)")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def current_rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def largest_tensor_pair_mb(folder: Path) -> float:
    from subnetscope.checkpoint import open_checkpoint

    src = open_checkpoint(str(folder))
    return 2 * max(src.numel(n) * src.dtype(n).itemsize for n in src.names()) / 2**20


if __name__ == "__main__":
    main()
