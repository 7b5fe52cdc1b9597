"""sparsity_hypotheses.py: H2 (sparsity vs reward) and H3 (advantage sharpness vs sparsity) over existing runs."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import plots
from ..changes import RULES
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..hypotheses import (
    ADVANTAGE_KEYS,
    advantage_vs_sparsity,
    check_runs,
    paired,
    read_metrics,
    sparsity_vs_reward,
)
from ..outputs import check_output_dir
from ..report import write_csv, write_json

DESCRIPTION = """\
The research plan's hypotheses H2 and H3, from the metrics.jsonl of existing runs (main_grpo.py, main_ppo.py):

  h2  sparsity vs reward: per run, Spearman and Pearson correlation over steps of changed/<rule> (vs θ0) with
      the reward, raw and of the step-to-step differences (the trend both share with time removed); across
      runs, the final changed fraction against the final reward (mean of the last --window steps) and the
      gain over the first --window. --reward_key eval/greedy/reward correlates at the evaluated checkpoints.
  h3  advantage sharpness vs sparsity: per run, each advantage/* metric GRPO logs (sharpness = share of Σ|A|
      in the top 10% of samples, kurtosis, zero_fraction, abs_mean) against step_change/<rule> (the share
      of weights that step changed) and changed/<rule>; across runs, the per-run means.

Consecutive steps are not independent samples: the p-values describe, they do not test. Writes
<h2|h3>_summary.json, CSV tables and a scatter figure to --output_dir.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hypothesis", choices=("h2", "h3"),
                   help="h2: sparsity vs reward; h3: advantage sharpness vs sparsity")
    p.add_argument("--runs", nargs="+", required=True, help="run folders holding metrics.jsonl")
    p.add_argument("--labels", nargs="+", help="a name per run (default: the folder names)")
    p.add_argument("--rule", choices=RULES, default="relative", help="which rule's changed fraction (default relative)")
    p.add_argument("--reward_key", default="reward/mean",
                   help="h2: the reward metric (default reward/mean; eval/greedy/reward at evaluated checkpoints)")
    p.add_argument("--window", type=int, default=10,
                   help="h2: steps averaged for the final and first reward (default 10)")
    p.add_argument("--output_dir", default="plots/hypotheses", help="results folder (default plots/hypotheses)")
    return p


def _h2(runs: dict[str, list[dict]], args: argparse.Namespace, out: Path) -> dict:
    result = sparsity_vs_reward(runs, args.rule, args.reward_key, args.window)
    write_csv(out / "h2_per_run.csv", result["per_run"])
    write_json(out / "h2_summary.json", result)
    points = {label: (s.x, s.y) for label, s in ((k, paired(v, result["x"], result["y"])) for k, v in runs.items())}
    plots.hypothesis_scatter(points, result["x"] + " (vs θ0)", result["y"], "H2: sparsity vs reward",
                             out / "h2_sparsity_vs_reward.png")
    print(f"{'run':>20} {'steps':>6} {'final changed':>14} {'final reward':>13} {'ρ (steps)':>10} {'ρ (diffs)':>10}")
    for r in result["per_run"]:
        print(f"{r['run']:>20} {r['steps']:>6} {r['final_changed']:>14.4%} {r['final_reward']:>13.4f} "
              f"{_fmt(r['within_spearman']):>10} {_fmt(r['diff_spearman']):>10}")
    across = result["across_runs"]["final_changed_vs_final_reward"]
    print(f"across {across['n']} runs: final changed vs final reward ρ = {_fmt(across['spearman'])} "
          f"(p {_fmt(across['spearman_p'])})")
    return result


def _h3(runs: dict[str, list[dict]], args: argparse.Namespace, out: Path) -> dict:
    result = advantage_vs_sparsity(runs, args.rule)
    write_csv(out / "h3_per_run.csv", result["per_run"])
    write_csv(out / "h3_across_runs.csv", result["across_runs"])
    write_json(out / "h3_summary.json", result)
    target = result["targets"][0]
    points = {label: (s.x, s.y) for label, s in ((k, paired(v, ADVANTAGE_KEYS[0], target)) for k, v in runs.items())}
    plots.hypothesis_scatter(points, ADVANTAGE_KEYS[0] + " (share of Σ|A| in the top 10%)",
                             target + " (weights changed by the step)", "H3: advantage sharpness vs sparsity",
                             out / "h3_advantage_vs_sparsity.png")
    print(f"{'run':>20} {'advantage':>26} {'target':>22} {'n':>5} {'ρ':>8} {'p':>8}")
    for r in result["per_run"]:
        print(f"{r['run']:>20} {r['advantage']:>26} {r['target']:>22} {r['n']:>5} {_fmt(r['spearman']):>8} "
              f"{_fmt(r['spearman_p']):>8}")
    return result


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run(args: argparse.Namespace) -> dict:
    if args.window < 1:
        raise SubnetscopeError(f"--window {args.window}: needs at least 1 step")
    labels = check_runs(args.runs, args.labels)
    out = check_output_dir(args.output_dir)
    runs = {label: read_metrics(run_dir) for label, run_dir in zip(labels, args.runs)}
    result = (_h2 if args.hypothesis == "h2" else _h3)(runs, args, out)
    print(f"results in {out}/")
    return result


@cli_main
def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
