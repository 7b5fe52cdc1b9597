"""run_sparse_sweep.py: the sparse fine-tuning experiment over a grid, resumable: masks → fine-tuning → analysis."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import ArgumentParser, cli_main
from ..sparse_sweep import __doc__ as SWEEP_DOC
from ..sparse_sweep import expand_sweep, load_sweep, run_sweep
from .training import quiet_transformers

EPILOG = """Examples: configs/sparse_sweep_cpu.yaml (tiny GPT-2 on IMDB text, a few minutes on a CPU),
configs/sparse_sweep_boolq.yaml (GPT-2 on BoolQ through `datasets`; offline, point train's task and
eval_data at local json/jsonl files with BoolQ's columns passage, question, answer).
Exits 1 when any run failed, naming them (each one's output is in OUTPUT/runs/<run>.log).
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=SWEEP_DOC, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the sweep file (.yaml)")
    p.add_argument("--output_dir", help="overrides the file's output_dir")
    p.add_argument("--dry_run", action="store_true", help="check the file and list its runs, run nothing")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    if args.dry_run:
        sweep = load_sweep(args.config)
        target = args.output_dir or (sweep.get("output_dir") if isinstance(sweep, dict) else None) or "."
        _, runs = expand_sweep(sweep, Path(target))
        for run in runs:
            print(run.name)
        return 0
    result = run_sweep(args.config, args.output_dir)
    out = result.out / "analysis"
    print(f"summary in {out}/sweep_summary.csv, {out}/sweep_grouped.csv and prune_report.py's tables there")
    if result.failed:
        more = len(result.failed) - 10
        shown = ", ".join(result.failed[:10]) + (f" and {more} more" if more > 0 else "")
        print(f"error: {len(result.failed)} of {result.runs} runs failed: {shown} (output in {result.out}/runs/"
              "<run>.log; started again, the sweep retries them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
