"""GRPO data-parallel scaling: the same run (seed, global batch, steps) on 1 GPU and on N GPUs, side by side.

  one  : python main_grpo.py ... on the first GPU alone
  many : accelerate launch --multi_gpu --num_processes N main_grpo.py ... (DDP; each process samples and
         trains on batch_size / N prompts, gradients all-reduced)

Both runs write metrics.jsonl; the benchmark reads generated tokens/s (all processes' completion tokens over
the step's wall time, median of the steps after --warmup), their ratio (target >= 1.8x on 2 GPUs), and
whether the trackers agree: for every step and rule, the number of weights counted as changed by the one-GPU
run minus the N-GPU run's (DDP sums gradients in another order, so the last bits of an update can differ:
see tests/test_grpo_run.py::test_two_processes_match_one for the CPU bound), and the largest difference in
the mean reward (the same completions give 0).
Run: python benchmarks/bench_ddp_scaling.py --policy smollm2-135m-instruct --dataset FILE [--steps 12]
     python benchmarks/bench_ddp_scaling.py --tiny   (CPU, tiny-gpt2, 2 processes over gloo via torchrun:
                                                      a check that it runs)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def grpo_args(args: argparse.Namespace, output_dir: Path) -> list[str]:
    return ["--policy", args.policy, "--dataset", args.dataset, "--reward", args.reward,
            "--batch_size", str(args.batch_size), "--group_size", str(args.group_size),
            "--max_new_tokens", str(args.max_new_tokens), "--max_steps", str(args.steps),
            "--save_every", str(args.steps), "--eval_every", str(10**6), "--precision", args.precision,
            "--seed", str(args.seed), "--lr", str(args.lr), "--device", args.device, "--no_tqdm",
            "--output_dir", str(output_dir)]


def launch(command: list[str], env: dict[str, str], log: Path) -> None:
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        print(log.read_text()[-3000:])
        raise SystemExit(f"{command[:4]} failed (exit {done.returncode}); log: {log}")


def tokens_per_s(metrics: list[dict], warmup: int) -> float:
    return statistics.median(m["throughput/tokens_per_s"] for m in metrics[warmup:])


def count_differences(one: list[dict], many: list[dict], numel: int) -> dict[str, int]:
    """Per rule, the largest |changed weights (1 GPU) - changed weights (N GPUs)| over the steps."""
    rules = sorted(k.split("/", 1)[1] for k in one[0] if k.startswith("changed/") and k.count("/") == 1)
    return {r: max(round(abs(a[f"changed/{r}"] - b[f"changed/{r}"]) * numel) for a, b in zip(one, many))
            for r in rules}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="smollm2-135m-instruct", help="a real model's name or folder")
    p.add_argument("--dataset", help="prompt file (e.g. an IMDB .jsonl.gz); default builtin")
    p.add_argument("--reward", default="vader", help="(default vader)")
    p.add_argument("--processes", type=int, default=2, help="GPUs of the data-parallel run (default 2)")
    p.add_argument("--batch_size", type=int, default=64, help="global prompts per step (default 64)")
    p.add_argument("--group_size", type=int, default=8, help="completions per prompt (default 8)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="(default 64)")
    p.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the speed (default 2)")
    p.add_argument("--precision", default="mixed", choices=("mixed", "bf16", "fp32"), help="(default mixed)")
    p.add_argument("--lr", type=float, default=1e-6, help="(default 1e-6)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--workdir", default="/tmp/subnetscope-ddp-bench", help="run folders and logs")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny-gpt2, torchrun over gloo: a check that it runs")
    args = p.parse_args()
    args.device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.policy, args.batch_size, args.group_size, args.max_new_tokens, args.steps, args.precision = (
            "tiny-gpt2", 4, 2, 8, 3, "fp32")
        args.warmup = 1
    args.dataset = args.dataset or "builtin"
    if args.batch_size % args.processes:
        p.error(f"--batch_size {args.batch_size} must split over --processes {args.processes}")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one_dir, many_dir = work / "one", work / f"many{args.processes}"
    script = str(ROOT / "main_grpo.py")
    launch([sys.executable, script, *grpo_args(args, one_dir)],
           {**env, **({} if args.tiny else {"CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0")[:1]})},
           work / "one.log")
    if args.tiny:
        many = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes), script]
    else:
        many = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                script]
    launch([*many, *grpo_args(args, many_dir)], env, work / "many.log")

    from subnetscope.checkpoint import open_checkpoint
    from subnetscope.logger import read_metrics

    one, multi = read_metrics(one_dir / "metrics.jsonl"), read_metrics(many_dir / "metrics.jsonl")
    base = open_checkpoint(str(one_dir / "base"))
    numel = sum(base.numel(n) for n in base.names())
    speed_one, speed_many = tokens_per_s(one, args.warmup), tokens_per_s(multi, args.warmup)
    print(f"{args.policy}: {args.batch_size} prompts x {args.group_size} completions, {args.max_new_tokens} new "
          f"tokens, {args.steps} steps, --precision {args.precision}, on {args.device}")
    print(f"tokens/s, 1 process : {speed_one:.0f} (median step {statistics.median(m['time/step'] for m in one):.3f} s)")
    print(f"tokens/s, {args.processes} processes: {speed_many:.0f} (median step "
          f"{statistics.median(m['time/step'] for m in multi):.3f} s)")
    print(f"scaling: {speed_many / speed_one:.2f}x (target >= {0.9 * args.processes:.1f}x)")
    print(f"largest |mean reward difference| over the steps: "
          f"{max(abs(a['reward/mean'] - b['reward/mean']) for a, b in zip(one, multi)):.3g}")
    print(f"changed weights, largest |1 process - {args.processes}| over the steps, of {numel:,}: "
          f"{json.dumps(count_differences(one, multi, numel))}")


if __name__ == "__main__":
    main()
