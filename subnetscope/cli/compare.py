"""compare_architectures.py: one RL recipe on several models and seeds, then the localization study.

Trains every model × seed with the same recipe (PPO or GRPO), runs localization_analysis.py on the
first seed's runs (side-by-side figures, Gini / entropy / top-k with bootstrap intervals, the
concentration test, per-model tables including Gemma-3n's MatFormer shells), and, with several
seeds, the overlap of each model's subnetworks across seeds against the random baseline.
Finished runs are reused when the command is started again; half-done ones resume.
Every run trains at one --precision (auto: mixed on a CUDA GPU, fp32 elsewhere) and is judged at its
view dtype (bf16 under mixed); runs.csv also gives the fp32 master weights' changed fraction under mixed.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

from ..changes import ChangeRules
from ..checkpoint import find_step_checkpoints, open_checkpoint
from ..engine import analyze_overlap
from ..errors import SubnetscopeError, cli_main
from ..grpo import GRPOConfig, GRPOTrainer
from ..logger import read_metrics
from ..outputs import check_output_dir
from ..ppo import PPOConfig, PPOTrainer
from ..precision import PRECISIONS, VIEW_DTYPES
from ..report import write_csv, write_json
from . import localize
from .training import quiet_transformers

ALGOS = {"ppo": (PPOConfig, PPOTrainer), "grpo": (GRPOConfig, GRPOTrainer)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-gpt2", "tiny-gemma3n"],
                   help="policies to compare (default tiny-gpt2 tiny-gemma3n; on a GPU e.g. gpt2-medium "
                        "google/gemma-3n-E2B-it)")
    p.add_argument("--tokenizer",
                   help="tokenizer for random-* policies (default gpt2; offline ../shared/models/tiny-gpt2)")
    p.add_argument("--labels", nargs="+", help="names for the figures (default: the model names)")
    p.add_argument("--algo", choices=sorted(ALGOS), default="ppo", help="the RL recipe (default ppo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    p.add_argument("--max_steps", type=int, default=8, help="updates per run (default 8)")
    p.add_argument("--save_every", type=int, default=4, help="checkpoint every N updates (default 4)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per update (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3, for tiny models)")
    p.add_argument("--reward", default="vader", choices=("vader", "model", "easy"), help="reward (default vader)")
    p.add_argument("--reward_model", default="lvwerra/distilbert-imdb", help="classifier for --reward model")
    p.add_argument("--dataset", default="builtin", help="prompts: builtin, easy, imdb, or a local file")
    p.add_argument("--max_new_tokens", type=int, default=16, help="completion length (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", metavar="{" + ",".join(PRECISIONS) + "}",
                   help="how every run keeps and computes its weights (default auto: mixed on a CUDA GPU with bf16 "
                        "- fp32 masters, bf16 autocast, bf16 checkpoints - and fp32 elsewhere); bf16 measures bf16 "
                        "stagnation, not fine-tuning")
    p.add_argument("--view_dtype", metavar="{" + ",".join(VIEW_DTYPES) + "}",
                   help="dtype at which every run's changes are judged and checkpoints stored, and the analysis "
                        "compares (default: bfloat16 under mixed and bf16, float32 under fp32)")
    p.add_argument("--runs_dir", default="checkpoints/comparison", help="where the runs go")
    p.add_argument("--output_dir", default="plots/comparative", help="figures and tables")
    return p


def _run_config(args: argparse.Namespace, policy: str, label: str, seed: int):
    """One run's settings, checked (every run's are, before the first one trains)."""
    folder = Path(args.runs_dir) / f"{label}-seed{seed}"
    config_cls, _ = ALGOS[args.algo]
    extra = {"mini_batch_size": min(4, args.batch_size), "ppo_epochs": 2, "init_kl_coef": 0.02,
             "target_kl": None} if args.algo == "ppo" else {}
    config = config_cls(policy=policy, tokenizer=args.tokenizer, reward=args.reward, reward_model=args.reward_model,
                        dataset=args.dataset, batch_size=args.batch_size, max_steps=args.max_steps, save_every=args.save_every,
                        eval_every=args.max_steps, lr=args.lr, max_new_tokens=args.max_new_tokens,
                        device=args.device, seed=seed, output_dir=str(folder), no_tqdm=True,
                        precision=args.precision, view_dtype=args.view_dtype, resume=folder.exists(), **extra)
    config.validate()
    return config


def _train(args: argparse.Namespace, config) -> Path:
    folder = Path(config.output_dir)
    if (folder / "final").is_dir():
        print(f"{folder}: finished before, reused")
        return folder
    ALGOS[args.algo][1](config).train()
    return folder


def _parameter_count(folder: Path) -> int:
    source = open_checkpoint(str(folder / "base"))
    return sum(source.numel(name) for name in source.names())


def run_speed(folder: Path, model: str, seed: int) -> dict:
    """Steps/s (median step, the first excluded as warm-up), peak GPU memory and reward of one run."""
    records = [r for r in read_metrics(folder / "metrics.jsonl") if "time/step" in r]
    if not records:
        raise SubnetscopeError(f"{folder}/metrics.jsonl has no training steps: delete the folder and run again")
    times = [r["time/step"] for r in (records[1:] or records)]
    median = statistics.median(times)
    peaks = [r["memory/peak_gpu_gb"] for r in records if r.get("memory/peak_gpu_gb") is not None]
    return {
        "model": model, "seed": seed, "parameters": _parameter_count(folder),
        "steps": records[-1]["step"], "median_step_s": median, "steps_per_s": 1 / median if median > 0 else None,
        "tokens_per_s": statistics.median(r["throughput/tokens_per_s"] for r in records),
        "peak_gpu_gb": max(peaks) if peaks else None,
        "reward_first": records[0]["reward/mean"], "reward_last": records[-1]["reward/mean"],
        "changed_exact_final": records[-1].get("changed/exact"),
        "changed_master_exact_final": records[-1].get("changed_master/exact"),
    }


def run(args: argparse.Namespace) -> dict:
    labels = args.labels or [m.replace("/", "_") for m in args.models]
    if len(labels) != len(args.models) or len(args.models) < 2:
        raise SubnetscopeError("give at least two --models, and as many --labels as models")
    if len(set(labels)) != len(labels):
        raise SubnetscopeError("--models / --labels name one model twice: each run folder needs its own label")
    if len(set(args.seeds)) != len(args.seeds):
        raise SubnetscopeError("--seeds must be distinct")
    check_output_dir(args.runs_dir, "--runs_dir")
    out = check_output_dir(args.output_dir)
    configs = {label: [_run_config(args, model, label, seed) for seed in args.seeds]
               for model, label in zip(args.models, labels)}
    runs = {label: [_train(args, config) for config in group] for label, group in configs.items()}
    speed = [run_speed(folder, label, seed) for label, folders in runs.items()
             for folder, seed in zip(folders, args.seeds)]
    write_csv(out / "runs.csv", speed)
    for row in speed:
        peak = f"{row['peak_gpu_gb']:.1f} GB" if row["peak_gpu_gb"] is not None else "n/a (CPU)"
        print(f"{row['model']} seed {row['seed']}: {row['parameters'] / 1e6:.0f}M parameters, {row['steps']} steps, "
              f"{row['steps_per_s']:.3f} steps/s, peak GPU memory {peak}, "
              f"reward {row['reward_first']:.3f} -> {row['reward_last']:.3f}")
    view = ["--view_dtype", args.view_dtype] if args.view_dtype else []
    localize.main(["--ckpt_dirs", *[str(r[0]) for r in runs.values()], "--labels", *labels,
                   "--output_dir", str(out), "--no_tqdm", "--device", args.device, *view])
    rows = []
    for label, folders in runs.items():
        base = open_checkpoint(str(folders[0] / "base"))
        finals = {f: open_checkpoint(str(find_step_checkpoints(str(f))[-1].path)) for f in folders}
        for a, b in itertools.combinations(folders, 2):
            result = analyze_overlap(base, finals[a], finals[b], ChangeRules(), progress=False,
                                     view_dtype=args.view_dtype)
            for rule, o in result.global_.items():
                rows.append({"model": label, "run_a": a.name, "run_b": b.name, "rule": rule, **o})
    summary = {"runs": {k: [str(f) for f in v] for k, v in runs.items()}, "speed": speed, "seed_overlap": rows}
    if rows:
        write_csv(out / "seed_overlap.csv", rows)
        for row in rows:
            if row["rule"] == "relative":
                print(f"{row['model']} {row['run_a']} vs {row['run_b']}: "
                      f"o1={row['o1']} (random {row['o1_random']:.4f}), "
                      f"jaccard={row['jaccard']} (random {row['jaccard_random']})")
    write_json(out / "comparison.json", summary)
    return summary


@cli_main
def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    run(build_parser().parse_args(argv))
    return 0
