"""real_study.py: the RL-sparsity study on real pretrained models (SmolLM2-135M-Instruct, Gemma-3-270M).

  python real_study.py run --policy smollm2-135m-instruct --task arithmetic --jobs 12   # one group, on a GPU
  python real_study.py report                                                         # table.md over all groups

run trains, for one policy on one task, GRPO, PPO, DPO, SFT (reference data) and RFT (SFT on the
policy's own reward-passing samples), each at its usual lr and at --shared_lr, every seed, plus GRPO
with pure bf16 weights (the stagnation contrast) and GRPO confined to its own subnetwork, as parallel
processes that resume where a killed call stopped; it writes small files to
--results_dir/<policy>__<task>/ (results.csv, overlap.csv, layers.csv, modules.csv, curves.csv,
group.json) and rebuilds table.md and the figures. report rebuilds them alone (groups measured in
different sessions make one table). The runs themselves stay in --output_dir (large: not for git).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields

from ..errors import SubnetscopeError, cli_main

HELP = {
    "policy": "a real model (smollm2-135m-instruct, gemma3-270m), a local model folder, or tiny-gpt2 for tests",
    "task": "arithmetic (exact match of the final number) or imdb (VADER sentiment of continued review openings)",
    "algos": "algorithms: grpo ppo dpo sft rft (rft = SFT on the policy's own reward-passing samples)",
    "seeds": "seeds of every run",
    "shared_lr": "the lr every algorithm also runs at, beside its usual one (RL 1e-6, SFT and RFT 1e-5)",
    "max_steps": "updates per run", "save_every": "checkpoint every N updates (only the newest is kept)",
    "batch_size": "prompts per update", "group_size": "GRPO completions per prompt; DPO and RFT samples per prompt",
    "max_new_tokens": "completion length",
    "max_value": "arithmetic: operands are integers in [2, max_value] (2-3 operands, + and *)",
    "train_prompts": "training prompts generated (arithmetic) or read (imdb)",
    "heldout_prompts": "held-out prompts for the score before and after (arithmetic: accuracy)",
    "imdb": "labelled IMDB reviews (the imdb task), e.g. ../shared/data/imdb/train.jsonl.gz",
    "chat_template": "prompts in the tokenizer's chat template: yes or no (default: when it has one)",
    "rft_min_reward": "RFT keeps a prompt's best sample when it scores at least this (default: 1 = correct for "
                      "arithmetic, 0.5 for imdb's VADER score)",
    "jobs": "runs at once, each its own process (0: one after another in this process); on several GPUs the "
            "processes are spread evenly over CUDA_VISIBLE_DEVICES (every GPU when unset)",
    "device": "auto, cpu or cuda", "precision": "the main runs' precision: mixed (fp32 masters, bf16 view) or fp32",
    "contrast": "also GRPO seed 0 with pure bf16 weights (yes/no)",
    "subnetwork": "also GRPO seed 0 confined to the weights its full run changed (yes/no)",
    "train": "no: start no run, write the group's results from the runs finished so far (a study cut short); "
             "overlap pairs whose checkpoints are gone keep their rows from the overlap.csv already there",
    "note": "a sentence the table prints under the group (e.g. why runs are missing)",
    "output_dir": "where the runs go (large)", "results_dir": "where the small result files and table.md go",
}


def _yes_no(text: str) -> bool:
    if text.lower() not in ("yes", "no", "true", "false"):
        raise argparse.ArgumentTypeError("use yes or no")
    return text.lower() in ("yes", "true")


def build_parser() -> argparse.ArgumentParser:
    from ..real_study import RealStudyConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and measure one group (policy x task), then rebuild the table")
    d = RealStudyConfig()
    for f in fields(RealStudyConfig):
        default = getattr(d, f.name)
        kwargs: dict = {"help": f"{HELP[f.name]} (default {default})"}
        if isinstance(default, list):
            kwargs.update(nargs="+", type=int if f.name == "seeds" else str)
        elif f.name == "rft_min_reward":
            kwargs["type"] = float
        elif isinstance(default, bool) or f.name == "chat_template":
            kwargs.update(type=_yes_no, metavar="{yes,no}")
        else:
            kwargs["type"] = type(default)
        run.add_argument(f"--{f.name}", default=default, **kwargs)
    rep = sub.add_parser("report", help="rebuild table.md, localization.csv and the figures from the result files")
    rep.add_argument("--results_dir", default=d.results_dir, help=f"{HELP['results_dir']} (default {d.results_dir})")
    rep.add_argument("--missing", nargs=2, action="append", metavar=("GROUP", "WHY"), default=[],
                     help="record a group that was not measured and why (kept in missing.json)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..real_study import RealStudyConfig, run_group
    from ..real_study_report import write_tables
    from .training import quiet_transformers

    quiet_transformers()
    if args.command == "report":
        if args.missing:
            record_missing(args.results_dir, dict(args.missing))
        print(f"table: {write_tables(args.results_dir)}")
        return 0
    cfg = RealStudyConfig(**{f.name: getattr(args, f.name) for f in fields(RealStudyConfig)})
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
