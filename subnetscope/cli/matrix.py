"""run_matrix.py: a sweep of fine-tuning runs from a matrix file, resumable, then aggregated."""
from __future__ import annotations

import argparse

from ..errors import cli_main
from ..matrix import TASKS, expand, load_matrix, run_matrix
from .training import quiet_transformers

DESCRIPTION = f"""\
Run every combination of a matrix file (YAML or JSON) one after another: tasks {sorted(TASKS)},
with any of their settings as grid axes (policy, lr, optimizer, seed, ...). Every key and value is
checked before anything runs. Started again, the sweep skips finished runs and resumes a half-done
one. Writes OUTPUT/runs/<run>/ (each a normal run folder), summary.csv (one row per run: settings,
status, error, final fraction changed under each rule, per-block Gini, evaluation reward),
grouped_summary.csv (mean and std over seeds) and sparsity_vs_settings.png.
Examples: configs/matrix_cpu.yaml (tiny models, a few minutes on a CPU), configs/matrix_gpu.yaml.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    out = run_matrix(args.matrix, args.output_dir)
    print(f"summary in {out}/summary.csv, {out}/grouped_summary.csv, {out}/sparsity_vs_settings.png")
    return 0
