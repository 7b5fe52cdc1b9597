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
import dataclasses
import itertools
import statistics
from pathlib import Path

from ..changes import ChangeRules
from ..checkpoint import find_step_checkpoints, open_checkpoint
from ..engine import analyze_overlap
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..grpo import GRPOConfig, GRPOTrainer
from ..logger import read_metrics
from ..outputs import check_output_dir
from ..ppo import PPOConfig, PPOTrainer
from ..report import write_csv, write_json
from ..rl import RLConfig
from . import grpo as grpo_cli
from . import localize
from . import ppo as ppo_cli
from .training import config_from_args, quiet_transformers

ALGOS = {"ppo": (PPOConfig, PPOTrainer), "grpo": (GRPOConfig, GRPOTrainer)}
SCRIPTS = {"ppo": ("main_ppo.py", ppo_cli), "grpo": ("main_grpo.py", grpo_cli)}
PER_RUN = ("policy", "seed", "output_dir", "resume", "no_tqdm")  # set here for each model and seed
REFUSED = {"policy": "name the policies with --models", "seed": "give the seeds with --seeds",
           "resume": "finished runs are reused and half-done ones resume without it",
           "demo": "--demo is main_grpo.py's own command"}
EPILOG = """Every other flag is the training script's (main_ppo.py for --algo ppo, main_grpo.py for --algo grpo;
see their --help), with its defaults: one set of settings for both commands, e.g. PPO's lr 1.41e-5,
adaptive KL from 0.2 toward 6, 4 PPO epochs, 32 prompts per update, 600 updates, and its presets
(--short: 10 updates; --easy: toy prompts and reward). The settings every run used, and which were
given, are printed and written to settings.csv and comparison.json. A quick CPU check on the tiny
models: --easy --max_steps 4 --save_every 2 --batch_size 8 --mini_batch_size 4 --ppo_epochs 1
--max_new_tokens 8 --lr 1e-3 --device cpu.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, epilog=EPILOG, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-gpt2", "tiny-gemma3n"],
                   help="policies to compare (default tiny-gpt2 tiny-gemma3n; on a GPU e.g. gpt2-medium "
                        "google/gemma-3n-E2B-it)")
    p.add_argument("--labels", nargs="+", help="names for the figures (default: the model names)")
    p.add_argument("--algo", choices=sorted(ALGOS), default="ppo", help="the RL recipe (default ppo)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (default 0 1)")
    p.add_argument("--runs_dir", default="checkpoints/comparison", help="where the runs go")
    p.add_argument("--output_dir", default="plots/comparative", help="figures and tables")
    return p


def _refuse(message: str) -> None:
    raise SubnetscopeError(message)


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, RLConfig, set[str]]:
    """This command's flags, and every run's settings from the training script's parser, defaults and
    presets; returns them with the names of the settings given on the command line."""
    args, rest = build_parser().parse_known_args(argv)
    script, module = SCRIPTS[args.algo]
    algo_parser = module.build_parser()
    algo_parser.prog = f"compare_architectures.py --algo {args.algo} ({script}'s flags)"
    algo_parser.error = _refuse  # one line, as every error here
    algo_args = algo_parser.parse_args(rest)
    for name, instead in REFUSED.items():
        if hasattr(algo_args, name):
            raise SubnetscopeError(f"--{name} does not apply to compare_architectures.py: {instead}")
    config_cls = ALGOS[args.algo][0]
    template = config_from_args(config_cls, algo_args, module.PRESET_EXTRA)
    given = {f.name for f in dataclasses.fields(config_cls) if hasattr(algo_args, f.name)}
    return args, template, given


def settings_rows(algo: str, template: RLConfig, given: set[str]) -> list[dict]:
    """Every setting the runs share, with where it came from: a flag, a preset, or the script's default."""
    script = SCRIPTS[algo][0]
    defaults = type(template)()
    rows = []
    for f in dataclasses.fields(template):
        if f.name in PER_RUN:
            continue
        value = getattr(template, f.name)
        source = "flag" if f.name in given else f"{script} default" if value == getattr(defaults, f.name) else "preset"
        rows.append({"setting": f.name, "value": value, "source": source})
    return rows


def _run_config(template: RLConfig, policy: str, folder: Path, seed: int) -> RLConfig:
    """One run's settings, checked (every run's are, before the first one trains)."""
    config = dataclasses.replace(template, policy=policy, seed=seed, output_dir=str(folder), resume=folder.exists(),
                                 no_tqdm=True)
    config.validate()
    return config


def _train(algo: str, config: RLConfig) -> Path:
    folder = Path(config.output_dir)
    if (folder / "final").is_dir():
        print(f"{folder}: finished before, reused")
        return folder
    ALGOS[algo][1](config).train()
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


def run(args: argparse.Namespace, template: RLConfig, given: set[str]) -> dict:
    labels = args.labels or [m.replace("/", "_") for m in args.models]
    if len(labels) != len(args.models) or len(args.models) < 2:
        raise SubnetscopeError("give at least two --models, and as many --labels as models")
    if len(set(labels)) != len(labels):
        raise SubnetscopeError("--models / --labels name one model twice: each run folder needs its own label")
    if len(set(args.seeds)) != len(args.seeds):
        raise SubnetscopeError("--seeds must be distinct")
    check_output_dir(args.runs_dir, "--runs_dir")
    out = check_output_dir(args.output_dir)
    configs = {label: [_run_config(template, model, Path(args.runs_dir) / f"{label}-seed{seed}", seed)
                       for seed in args.seeds]
               for model, label in zip(args.models, labels)}
    settings = settings_rows(args.algo, template, given)
    print(f"{args.algo.upper()} settings of every run ({SCRIPTS[args.algo][0]}'s defaults unless given: "
          f"{', '.join(sorted(given)) or 'none given'}): "
          + " ".join(f"{r['setting']}={r['value']}" for r in settings))
    write_csv(out / "settings.csv", settings)
    runs = {label: [_train(args.algo, config) for config in group] for label, group in configs.items()}
    speed = [run_speed(folder, label, seed) for label, folders in runs.items()
             for folder, seed in zip(folders, args.seeds)]
    write_csv(out / "runs.csv", speed)
    for row in speed:
        peak = f"{row['peak_gpu_gb']:.1f} GB" if row["peak_gpu_gb"] is not None else "n/a (CPU)"
        print(f"{row['model']} seed {row['seed']}: {row['parameters'] / 1e6:.0f}M parameters, {row['steps']} steps, "
              f"{row['steps_per_s']:.3f} steps/s, peak GPU memory {peak}, "
              f"reward {row['reward_first']:.3f} -> {row['reward_last']:.3f}")
    view = ["--view_dtype", template.view_dtype] if template.view_dtype else []
    localize.main(["--ckpt_dirs", *[str(r[0]) for r in runs.values()], "--labels", *labels,
                   "--output_dir", str(out), "--no_tqdm", "--device", template.device, *view])
    rows = []
    for label, folders in runs.items():
        base = open_checkpoint(str(folders[0] / "base"))
        finals = {f: open_checkpoint(str(find_step_checkpoints(str(f))[-1].path)) for f in folders}
        for a, b in itertools.combinations(folders, 2):
            result = analyze_overlap(base, finals[a], finals[b], ChangeRules(), progress=False,
                                     view_dtype=template.view_dtype)
            for rule, o in result.global_.items():
                rows.append({"model": label, "run_a": a.name, "run_b": b.name, "rule": rule, **o})
    summary = {"algo": args.algo, "settings": {r["setting"]: r["value"] for r in settings},
               "settings_given": sorted(given), "settings_from": SCRIPTS[args.algo][0],
               "runs": {k: [str(f) for f in v] for k, v in runs.items()}, "speed": speed, "seed_overlap": rows}
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
    run(*parse(argv))
    return 0
