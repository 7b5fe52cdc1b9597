"""Flags and checks shared by the analysis commands."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..changes import RULES, ChangeRules
from ..devices import resolve_device
from ..engine import DEFAULT_SHELLS, view_of
from ..errors import SubnetscopeError
from ..outputs import check_output_dir


def add_rule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what counts as changed (all three rules are always reported)")
    group.add_argument("--atol", type=float, default=1e-5,
                       help="absolute rule: a weight changed if |Δ| > atol (default 1e-5, the RL-sparsity "
                            "paper's bf16 tolerance; the original design used 1e-6)")
    group.add_argument("--eta", type=float, default=1e-3,
                       help="bf16-aware relative rule: changed if |Δ| > eta·max(|w|,|w'|) (default 1e-3)")
    group.add_argument("--rule", choices=RULES, default="relative",
                       help="rule used for the figures and the terminal localization line (default relative)")
    group.add_argument("--view_dtype", metavar="{bfloat16,float16,float32}",
                       help="round both sides of every tensor pair to this dtype (round to nearest even, as a "
                            "checkpoint saved in it would be) before comparing: two float32 runs judged as the "
                            "bf16 checkpoints they would publish (default: each checkpoint in its own dtype)")


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="where the arithmetic runs: auto (cuda when present), cpu, cuda, cuda:N")
    parser.add_argument("--topk", type=int, default=3, help="k of the top-k block concentration (default 3)")
    parser.add_argument("--no_tqdm", action="store_true", help="no progress bars (for logs)")


def rules_from_args(args: argparse.Namespace) -> ChangeRules:
    """The change rules (ChangeRules refuses NaN and negative thresholds) after checking --topk."""
    if args.topk < 1:
        raise SubnetscopeError("--topk must be at least 1")
    return ChangeRules(atol=args.atol, eta=args.eta)


def shells_from_args(values: list[int] | None) -> tuple[int, ...]:
    shells = tuple(values) if values else DEFAULT_SHELLS
    if any(b <= 0 for b in shells) or list(shells) != sorted(set(shells)):
        raise SubnetscopeError("--shells takes increasing positive neuron counts, e.g. --shells 8192 16384")
    return shells


@dataclass(frozen=True)
class RunSettings:
    rules: ChangeRules
    device: str
    shells: tuple[int, ...]
    out: Path
    progress: bool
    view_dtype: str | None  # checked by engine.view_of; None = each checkpoint's own dtype


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    """Check the shared flags and that --output_dir can be written, creating nothing: the folder is
    made by the first file written into it, once the work is done."""
    rules, device, shells = rules_from_args(args), resolve_device(args.device), shells_from_args(args.shells)
    view_of(args.view_dtype)
    return RunSettings(rules, device, shells, check_output_dir(args.output_dir), not args.no_tqdm, args.view_dtype)


def check_output_file(path: str, flag: str) -> Path:
    """Refuse an output file that is a folder or whose folder cannot be made or written, before any work."""
    out = Path(path)
    if out.is_dir():
        raise SubnetscopeError(f"{flag} {path} is a folder: pass a file name, e.g. {out / 'report.json'}")
    check_output_dir(out.parent, flag)
    return out
