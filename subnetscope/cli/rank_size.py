"""rank_vs_size.py: experiment 1C across models, the rank of each run's update against the model's size."""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from .. import plots
from ..changes import ChangeRules
from ..checkpoint import bases_for_runs, find_step_checkpoints, open_checkpoint
from ..devices import resolve_device
from ..engine import PairResult, analyze_pair, view_of
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..metrics import RANK_DEFINITIONS
from ..naming import TEXT_TOWER
from ..outputs import check_output_dir
from ..report import RANK_FIELDS, write_csv, write_json
from .localize import distinct_suffixes

DESCRIPTION = f"""\
Experiment 1C across model sizes: for each run (its last step checkpoint against its base), the rank of every
2-D update Δ = θ_T − θ0 under three definitions, side by side:
  numerical  {RANK_DEFINITIONS['numerical']}
  energy99   {RANK_DEFINITIONS['energy99']}
  plan       {RANK_DEFINITIONS['plan']}
each in % of the full rank min(m, n), averaged over the matrices inside the text model's blocks (embeddings,
heads and a vision tower are in rank_per_matrix.csv but not in the means), against the text model's
parameters. Writes rank_vs_size.csv, rank_per_matrix.csv, rank_vs_size.png and summary.json. One SVD per
matrix: use --device cuda for large models.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dirs", nargs="+", required=True, help="one run folder per model (e.g. GPT-2 small, medium, "
                                                                 "large with one recipe)")
    p.add_argument("--bases", nargs="+", help="θ0 of each run, in the same order (default: each RUN/base)")
    p.add_argument("--labels", nargs="+", help="names in the figure and tables (default: the run folders' names)")
    p.add_argument("--max_step", type=int, help="use the last checkpoint at or before this step")
    p.add_argument("--view_dtype", metavar="{bfloat16,float16,float32}",
                   help="round θ0 and θ_T to this dtype before taking Δ (default: each checkpoint's own dtype)")
    p.add_argument("--device", default="auto", help="where the SVDs run: auto (cuda when present), cpu, cuda")
    p.add_argument("--no_tqdm", action="store_true", help="no progress bars (for logs)")
    p.add_argument("--output_dir", default="plots/rank_vs_size", help="results folder (default plots/rank_vs_size)")
    return p


def _check(args: argparse.Namespace) -> tuple[list[str], list[str], Path, str]:
    """Labels, bases, the output folder and the device, before any work."""
    n = len(args.ckpt_dirs)
    for flag in ("bases", "labels"):
        given = getattr(args, flag)
        if given and len(given) != n:
            raise SubnetscopeError(f"--{flag} has {len(given)} entries for {n} --ckpt_dirs: give one per run")
    labels = args.labels or distinct_suffixes(args.ckpt_dirs)
    if len(set(labels)) != n:
        raise SubnetscopeError("two runs share a label: pass --labels that tell them apart")
    view_of(args.view_dtype)
    out = check_output_dir(args.output_dir)
    device = resolve_device(args.device)
    return labels, bases_for_runs(args.ckpt_dirs, args.bases), out, device


def matrix_rows(label: str, pair: PairResult) -> list[dict]:
    return [{"model": label, "name": t.name, "block": t.block, "module": t.module, "tower": t.tower,
             "shape": "x".join(map(str, t.shape)), "full_rank": t.full_rank,
             **{f"rank_{d}": getattr(t, attr) for d, attr in RANK_FIELDS.items()},
             **{f"rank_{d}_percent": 100 * getattr(t, attr) / t.full_rank for d, attr in RANK_FIELDS.items()}}
            for t in pair.tensors if t.rank is not None and t.full_rank]


def model_row(label: str, run_dir: str, step: int, pair: PairResult, matrices: list[dict]) -> dict:
    """Mean, median and min rank (% of full) per definition over the matrices inside the text blocks."""
    inside = [m for m in matrices if m["block"] is not None and m["tower"] == TEXT_TOWER]
    row = {"model": label, "run": run_dir, "step": step, "parameters": pair.towers()[TEXT_TOWER]["numel"],
           "matrices": len(inside)}
    for definition in RANK_FIELDS:
        pct = [m[f"rank_{definition}_percent"] for m in inside]
        row[f"{definition}_mean_percent"] = statistics.fmean(pct) if pct else None
        row[f"{definition}_median_percent"] = statistics.median(pct) if pct else None
        row[f"{definition}_min_percent"] = min(pct) if pct else None
    return row


def run(args: argparse.Namespace) -> dict:
    labels, bases, out, device = _check(args)
    rows, per_matrix = [], []
    for label, base, run_dir in zip(labels, bases, args.ckpt_dirs):
        last = find_step_checkpoints(run_dir, args.max_step)[-1]
        pair = analyze_pair(open_checkpoint(base), open_checkpoint(str(last.path)), ChangeRules(), device, rank=True,
                            progress=not args.no_tqdm, view_dtype=args.view_dtype)
        matrices = matrix_rows(label, pair)
        if not any(m["block"] is not None for m in matrices):
            raise SubnetscopeError(f"{run_dir}: no 2-D weight inside a transformer block to take the rank of")
        per_matrix.extend(matrices)
        rows.append(model_row(label, run_dir, last.step, pair, matrices))
    write_csv(out / "rank_vs_size.csv", rows)
    write_csv(out / "rank_per_matrix.csv", per_matrix)
    plots.rank_vs_size(rows, out / "rank_vs_size.png")
    summary = {"definitions": RANK_DEFINITIONS, "view_dtype": args.view_dtype, "models": rows}
    write_json(out / "summary.json", summary)
    print(f"{'model':>20} {'parameters':>14} {'matrices':>9} " + " ".join(f"{d:>10}" for d in RANK_FIELDS))
    for r in rows:
        print(f"{r['model']:>20} {r['parameters']:>14,} {r['matrices']:>9} "
              + " ".join(f"{r[f'{d}_mean_percent']:>9.1f}%" for d in RANK_FIELDS))
    print(f"mean rank of Δ in % of full rank over the block matrices; results in {out}/")
    return summary


@cli_main
def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
