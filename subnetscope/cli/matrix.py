"""run_matrix.py: a sweep of fine-tuning runs from a matrix file, resumable, then aggregated."""
from __future__ import annotations

import argparse
import sys

from ..errors import ArgumentParser, cli_main
from ..matrix import TASKS, expand, load_matrix, run_matrix
from .training import quiet_transformers

DESCRIPTION = f"""\
Run every combination of a matrix file (YAML or JSON) one after another: tasks {sorted(TASKS)},
with any of their settings as grid axes (policy, lr, optimizer, seed, ...). `grid` is the full cross;
`vary` is one factor at a time: base holds the centre point and each `vary` key is varied alone over
its listed values, every other factor at the centre (crossed with the grid, e.g. task and seed).
Every key and value is checked before anything runs. Started again, the sweep skips finished runs
and resumes a half-done one. Writes OUTPUT/runs/<run>/ (each a normal run folder), summary.csv (one
row per run: settings, the factor it varies, status, error, final fraction changed under each rule,
per-block Gini, evaluation reward), grouped_summary.csv (mean and std over seeds) and
sparsity_vs_settings.png. Exits 1 when any run failed, naming them (each one's traceback is in
OUTPUT/runs/<run>.error.txt).
Examples: configs/matrix_cpu.yaml (tiny models, a few minutes on a CPU), configs/matrix_gpu.yaml;
one factor at a time: configs/matrix_cpu_one_factor.yaml, configs/matrix_gpu_one_factor.yaml.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--matrix", required=True, help="the matrix file (.yaml, .yml or .json)")
    p.add_argument("--output_dir", help="overrides the file's output_dir")
    p.add_argument("--dry_run", action="store_true", help="check the file and list its runs, run nothing")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    if args.dry_run:
        for run in expand(load_matrix(args.matrix)):
            print(run["name"])
        return 0
    result = run_matrix(args.matrix, args.output_dir)
    out = result.out
    print(f"summary in {out}/summary.csv, {out}/grouped_summary.csv, {out}/sparsity_vs_settings.png")
    if result.failed:
        more = len(result.failed) - 10
        shown = ", ".join(result.failed[:10]) + (f" and {more} more" if more > 0 else "")
        print(f"error: {len(result.failed)} of {result.runs} runs failed: {shown} "
              f"(tracebacks in {out}/runs/<run>.error.txt; started again, the sweep retries them)", file=sys.stderr)
        return 1
    return 0
