"""real_study.py: the RL-sparsity study on real pretrained models (SmolLM2-135M-Instruct, Gemma-3-270M).

  python real_study.py run --policy smollm2-135m-instruct --task arithmetic --jobs 12   # one group, on a GPU
  python real_study.py run --config study.yaml                                        # settings from a file
  python real_study.py report                                                         # table.md over all groups

run trains, for one policy on one task, GRPO, PPO, DPO, SFT (reference data) and RFT (SFT on the
policy's own reward-passing samples), each at its usual lr and at --shared_lr, every seed, plus GRPO
with pure bf16 weights (the stagnation contrast) and GRPO confined to its own subnetwork, as parallel
processes that resume where a killed call stopped; it writes small files to
--results_dir/<policy>__<task>/ (an arithmetic difficulty other than the default also named, e.g.
…__arithmetic-2ops-max20: results.csv, overlap.csv, layers.csv, modules.csv, curves.csv, group.json) and
rebuilds table.md and the figures. report rebuilds them alone (groups measured in different sessions make
one table). The runs themselves stay in --output_dir (large: not for git).
"""
from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import ArgumentParser, SubnetscopeError, cli_main

def build_parser() -> argparse.ArgumentParser:
    from ..real_study import RealStudyConfig
    from .dataclass_args import add_dataclass_flags, field_meta

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and measure one group (policy x task), then rebuild the table")
    add_dataclass_flags(run, RealStudyConfig)
    rep = sub.add_parser("report", help="rebuild table.md, localization.csv and the figures from the result files")
    default = RealStudyConfig().results_dir
    rep.add_argument("--results_dir", default=default,
                     help=f"{field_meta(RealStudyConfig, 'results_dir')['help']} (default {default})")
    rep.add_argument("--missing", nargs=2, action="append", metavar=("GROUP", "WHY"), default=[],
                     help="record a group that was not measured and why (kept in missing.json)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..real_study import RealStudyConfig, run_group
    from ..real_study_report import write_tables
    from .dataclass_args import config_from_args
    from .training import quiet_transformers

    quiet_transformers()
    if args.command == "report":
        if args.missing:
            record_missing(args.results_dir, dict(args.missing))
        print(f"table: {write_tables(args.results_dir)}")
        return 0
    cfg = config_from_args(RealStudyConfig, args)
    command = "python real_study.py " + " ".join(shlex.quote(a) for a in without_note(
        argv if argv is not None else sys.argv[1:]))
    folder = run_group(cfg, command=command)
    print(f"results in {folder}; table: {write_tables(cfg.results_dir)}")
    return 0


def without_note(argv: list[str]) -> list[str]:
    """The command line without --note's sentence, which the table prints on its own line."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return out


def record_missing(results_dir: str, entries: dict[str, str]) -> None:
    import json
    from pathlib import Path

    from ..real_study_report import missing_groups, write_text

    if not all(why.strip() for why in entries.values()):
        raise SubnetscopeError("--missing GROUP WHY: say why the group was not measured")
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    write_text(Path(results_dir) / "missing.json", json.dumps({**missing_groups(Path(results_dir)), **entries},
                                                               indent=1) + "\n")
