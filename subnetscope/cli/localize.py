"""localization_analysis.py: are model A's updates more concentrated across blocks than model B's?"""
from __future__ import annotations

import argparse
import itertools
import re
from pathlib import Path

from .. import plots
from ..checkpoint import bases_for_runs, find_step_checkpoints, open_checkpoint
from ..engine import analyze_pair, analyze_series
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..naming import TEXT_TOWER
from ..report import write_csv, write_json, write_pair_outputs
from ..stats import bootstrap_ci, concentration_statistics, more_concentrated_test
from .common import add_rule_args, add_run_args, settings_from_args

DESCRIPTION = """\
Side-by-side localization of several fine-tuning runs (e.g. GPT-2 vs Gemma-3n with one RL recipe):
per-block profiles, Gini / normalized entropy / top-k concentration with bootstrap 95% intervals
(blocks resampled), and a one-sided permutation test (scipy.stats.permutation_test) of whether
each model's per-block profile is more concentrated than the other's. Each run is its final
checkpoint against its base; with two or more checkpoints the figures also show the trajectory.
Runs of TRL's trainers with SubnetTrackerCallback (checkpoint-N/) are read like main_grpo.py's
(step_N/); a LoRA run's adapter checkpoints are merged onto its base one matrix at a time.
localization_stats.csv's fraction_changed counts every weight; fraction_changed_text only the text
model's (a multimodal checkpoint's vision and audio towers left out, as in the per-block profiles).
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dirs", nargs="+", required=True, help="one run folder per model")
    p.add_argument("--bases", nargs="+",
                   help="θ0 of each run, in the same order (folder or Hub id); default: each RUN/base")
    p.add_argument("--labels", nargs="+",
                   help="names for the figures and each run's table folder (default: the run folders' names, "
                        "with as many parent folders as it takes to tell them apart)")
    p.add_argument("--max_step", type=int, help="ignore checkpoints after this step")
    p.add_argument("--step_interval", type=int, help="keep only steps that are multiples of this")
    add_rule_args(p)
    add_run_args(p)
    p.add_argument("--shells", type=int, nargs="+", metavar="N",
                   help="MatFormer shell boundaries in FFN neurons (default 8192 16384)")
    p.add_argument("--n_boot", type=int, default=2000,
                   help="bootstrap and permutation resamples, at least 1 (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    p.add_argument("--output_dir", default="plots/comparative", help="results folder (default plots/comparative)")
    return p


def distinct_suffixes(dirs: list[str]) -> list[str]:
    """Each folder's shortest trailing path (its name, then parent/name, ...) that no other folder shares."""
    parts = [Path(d).resolve().parts for d in dirs]
    labels = []
    for i, mine in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != i]
        if mine in others:
            raise SubnetscopeError(f"--ckpt_dirs lists {dirs[i]} twice: give each run once")
        k = next(k for k in range(1, len(mine) + 1) if all(p[-k:] != mine[-k:] for p in others))
        labels.append("/".join(mine[-k:]).lstrip("/") or "root")
    return labels


def folder_name(label: str) -> str:
    """A label made safe as one folder name (no separators, no `..`)."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label).strip(".") or "run"


def run_labels(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Labels for the figures and tables and the per-run folder names, all distinct: two runs never
    write into one folder."""
    if args.labels and len(set(args.labels)) != len(args.labels):
        dup = next(label for label in args.labels if args.labels.count(label) > 1)
        raise SubnetscopeError(f"--labels names {dup!r} twice: give each run its own label")
    labels = args.labels or distinct_suffixes(args.ckpt_dirs)
    folders = [folder_name(label) for label in labels]
    for (i, a), (j, b) in itertools.combinations(enumerate(folders), 2):
        if a.lower() == b.lower():
            raise SubnetscopeError(f"labels {labels[i]!r} and {labels[j]!r} would share the folder {a}: "
                                   "pass --labels that differ in letters or digits")
    return labels, folders


def _check_lengths(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    n = len(args.ckpt_dirs)
    if n < 2:
        raise SubnetscopeError("--ckpt_dirs needs at least two runs to compare")
    if args.bases and len(args.bases) != n:
        raise SubnetscopeError(f"--bases has {len(args.bases)} entries for {n} --ckpt_dirs: give one per run")
    if args.labels and len(args.labels) != n:
        raise SubnetscopeError(f"--labels has {len(args.labels)} entries for {n} --ckpt_dirs: give one per run")
    if args.n_boot < 1:
        raise SubnetscopeError(f"--n_boot {args.n_boot}: needs at least 1 resample (default 2000)")
    labels, folders = run_labels(args)
    return labels, folders, bases_for_runs(args.ckpt_dirs, args.bases)


def run(args: argparse.Namespace) -> dict:
    labels, folders, bases = _check_lengths(args)
    cfg = settings_from_args(args)
    rules, device, shells, out, progress = cfg.rules, cfg.device, cfg.shells, cfg.out, cfg.progress
    view = cfg.view_dtype
    statistics = concentration_statistics(args.topk)
    profiles, per_model, series_curves = [], [], []
    for label, folder, base_spec, run_dir in zip(labels, folders, bases, args.ckpt_dirs):
        checkpoints = find_step_checkpoints(run_dir, args.max_step, args.step_interval)
        base = open_checkpoint(base_spec)
        opened = [(c.step, open_checkpoint(str(c.path), base=base)) for c in checkpoints]
        pair = analyze_pair(base, opened[-1][1], rules, device, False, shells, progress, view_dtype=view)
        write_pair_outputs(pair, out / folder, args.topk)
        per_block = pair.group("block")
        blocks = pair.blocks()
        profile = [per_block[b][args.rule] / per_block[b]["numel"] for b in blocks]
        profiles.append(profile)
        row = {"model": label, "folder": folder, "run": run_dir, "final_step": checkpoints[-1].step,
               "blocks": len(blocks), "fraction_changed": pair.fraction(args.rule),
               "fraction_changed_text": pair.towers()[TEXT_TOWER]["fraction_changed"][args.rule]}
        for name, stat in statistics.items():
            low, high = bootstrap_ci(profile, stat, args.n_boot, args.seed)
            row.update({name: stat(profile), f"{name}_ci_low": low, f"{name}_ci_high": high})
        shell_rows = [s for s in pair.shells if s["rule"] == args.rule]
        if shell_rows and plots.has_nested_ffn(pair):
            row["shell0_ratio_to_uniform"] = shell_rows[0]["ratio_to_uniform"]
        per_model.append(row)
        if len(opened) >= 2:
            series = analyze_series(base, opened, rules, device, progress, view)
            series_curves.append((label, series))
    tests = []
    for (i, a), (j, b) in itertools.permutations(enumerate(labels), 2):
        result = more_concentrated_test(profiles[i], profiles[j], args.n_boot, args.seed)
        tests.append({"hypothesis": f"{a} more concentrated than {b}", "model_a": a, "model_b": b,
                      "gini_difference": result["statistic"], "p_value": result["p_value"]})
    write_csv(out / "localization_stats.csv", per_model)
    write_csv(out / "concentration_tests.csv", tests)
    write_csv(out / "block_profiles.csv", (
        {"model": label, "block_position": i, "relative_depth": i / max(1, len(prof) - 1), "fraction_changed": v}
        for label, prof in zip(labels, profiles) for i, v in enumerate(prof)
    ))
    _comparative_figures(labels, profiles, per_model, series_curves, args, out)
    summary = {"rule": args.rule, "rules": {"atol": rules.atol, "eta": rules.eta}, "view_dtype": view,
               "models": per_model,
               "tests": tests, "test": "one-sided permutation test of the Gini difference of mean-normalized "
                                           "per-block profiles (blocks exchangeable)"}
    write_json(out / "summary.json", summary)
    _print_table(per_model, tests, args.topk)
    print(f"\nresults in {out}/")
    return summary


def _comparative_figures(labels, profiles, per_model, series_curves, args, out: Path) -> None:
    plots.comparative_block_profiles(labels, profiles, out / "block_profiles.png",
                                     f"fraction of block changed ({args.rule})")
    for name in ("gini", "entropy", f"top{args.topk}"):
        rows = [r for r in per_model if r[name] is not None]
        if rows:
            plots.comparative_metric_bars(
                [r["model"] for r in rows], [r[name] for r in rows],
                [r[f"{name}_ci_low"] if r[f"{name}_ci_low"] is not None else r[name] for r in rows],
                [r[f"{name}_ci_high"] if r[f"{name}_ci_high"] is not None else r[name] for r in rows],
                name, out / f"{name}.png")
    if series_curves:
        plots.comparative_series([l for l, _ in series_curves], [s.steps for _, s in series_curves],
                                 [s.density[args.rule] for _, s in series_curves],
                                 f"fraction changed vs θ0 ({args.rule})",
                                 "how the changed fraction grows over training", out / "density_curves.png")


def _print_table(per_model: list[dict], tests: list[dict], k: int) -> None:
    def fmt(x):
        return "n/a" if x is None else f"{x:.4f}"

    print(f"{'model':>20} {'changed':>9} " + " ".join(f"{n:>24}" for n in ("gini", "entropy", f"top{k}")))
    for r in per_model:
        cells = [f"{fmt(r[n])} [{fmt(r[n + '_ci_low'])},{fmt(r[n + '_ci_high'])}]"
                 for n in ("gini", "entropy", f"top{k}")]
        print(f"{r['model']:>20} {r['fraction_changed']:>9.4%} " + " ".join(f"{c:>24}" for c in cells))
    for t in tests:
        print(f"{t['hypothesis']}: Gini difference {fmt(t['gini_difference'])}, p = {fmt(t['p_value'])}")


@cli_main
def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
