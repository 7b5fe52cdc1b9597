"""spatial_patterns.py: experiment 1B, where inside each weight matrix a run's changes fall, and whether the
next step's changes can be foreseen."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from safetensors.torch import save_file

from .. import plots
from ..changes import ChangeRules
from ..checkpoint import (
    atomic_write_file,
    default_base_for_run,
    find_step_checkpoints,
    open_checkpoint,
    resolve_model_dir,
)
from ..devices import resolve_device
from ..engine import view_of
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..outputs import check_output_dir
from ..patterns import (
    HOT,
    PatternResult,
    PatternSettings,
    analyze_patterns,
    head_dim_of,
    load_scores,
)
from ..report import write_csv, write_json
from .common import add_rule_args

DESCRIPTION = """\
Experiment 1B, spatial patterns of a run's updates. Over its step checkpoints (step_N/, checkpoint-N/), each
transition compares a checkpoint with the one before (θ0 before the first) under --rule. Per weight, its
change frequency (the share of transitions at which it changed; hot = more than half); per matrix, the map of
frequencies, its hot weights, and each attention head's share of the changes against its share of the weights
(ratio_to_uniform: 1 = no head preferred); and how well the weights changed at the last transition, changed
ever, changed at more than half so far, or holding the largest gradient EMA in the optimizer state saved with
the checkpoint (trainer_state.pt: ASPG's EMA of |grad|, else Adam's exp_avg_sq) predict the next transition's
changes: precision and recall beside chance (a random set of the same size).

Writes patterns_summary.json, matrix_patterns.csv, hot_weights.csv, head_share.csv, prediction.csv,
change_counts.safetensors (per tensor the number of transitions each weight changed at: the frequency map
at full resolution; --no_map leaves it out) and frequency_maps.png, frequency_histogram.png, head_share.png,
prediction.png.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True, help="run folder with step checkpoints (step_N, checkpoint-N, ...)")
    p.add_argument("--base", help="the starting weights θ0 (folder or Hub id); default: RUN/base")
    p.add_argument("--max_step", type=int, help="ignore checkpoints after this step")
    p.add_argument("--step_interval", type=int, help="keep only steps that are multiples of this")
    add_rule_args(p)
    p.add_argument("--head_dim", type=int,
                   help="attention head width (default: from the base's config.json: head_dim, or hidden size / heads)")
    p.add_argument("--max_hot", type=int, default=10000,
                   help="hot weights listed in hot_weights.csv, most frequent first (default 10000; all are counted)")
    p.add_argument("--maps", type=int, default=6, help="matrices pictured in frequency_maps.png (default 6)")
    p.add_argument("--no_map", action="store_true",
                   help="leave out change_counts.safetensors (1 byte per weight up to 255 transitions)")
    p.add_argument("--device", default="auto", help="where the comparisons run: auto (cuda when present), cpu, cuda")
    p.add_argument("--no_tqdm", action="store_true", help="no progress bars (for logs)")
    p.add_argument("--output_dir", default="plots/patterns", help="results folder (default plots/patterns)")
    return p


def _check(args: argparse.Namespace) -> tuple[PatternSettings, Path]:
    """Every flag, before any work or file."""
    if args.max_hot < 1:
        raise SubnetscopeError(f"--max_hot {args.max_hot}: needs at least 1")
    if args.maps < 0:
        raise SubnetscopeError(f"--maps {args.maps}: needs 0 or more")
    if args.head_dim is not None and args.head_dim < 1:
        raise SubnetscopeError(f"--head_dim {args.head_dim}: needs a positive width")
    rules = ChangeRules(args.atol, args.eta)
    view_of(args.view_dtype)
    out = check_output_dir(args.output_dir)
    settings = PatternSettings(rules, args.rule, resolve_device(args.device), args.view_dtype, args.head_dim,
                               args.max_hot, not args.no_map, not args.no_tqdm)
    return settings, out


def _head_dim(model: str, given: int | None) -> tuple[int | None, str | None]:
    """The head width and, when none is known, the note saying why head_share.csv is empty."""
    if given is not None:
        return given, None
    config = resolve_model_dir(model) / "config.json"
    if not config.is_file():
        return None, f"no config.json beside {model}: per-head shares need --head_dim"
    try:
        width = head_dim_of(json.loads(config.read_text()))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None, f"{config} is not a readable model config: per-head shares need --head_dim"
    return width, (None if width else f"{config} names no head width: per-head shares need --head_dim")


def summary_of(result: PatternResult, run: str, model: str) -> dict:
    totals = {p: t.row() for p, t in result.prediction_totals().items()}
    heads = [h for h in result.heads if h["ratio_to_uniform"] is not None]
    return {
        "run": run, "base": model, "rule": result.rule, "view_dtype": result.view_dtype, "hot_threshold": HOT,
        "steps": result.steps, "transitions": result.transitions, "weights": result.numel,
        "hot_weights": result.hot_total, "hot_fraction": result.hot_total / result.numel if result.numel else 0.0,
        "histogram": result.histogram, "head_dim": result.head_dim,
        "heads": {"count": len(heads), "ratio_at_least_2": sum(h["ratio_to_uniform"] >= 2 for h in heads),
                  "max_ratio": max((h["ratio_to_uniform"] for h in heads), default=None)},
        "prediction": totals, "grad_ema_source": result.grad_ema_source, "notes": result.notes,
    }


def write_outputs(result: PatternResult, summary: dict, out: Path, maps: int) -> list[Path]:
    write_csv(out / "matrix_patterns.csv", result.matrices)
    write_csv(out / "hot_weights.csv", result.hot)
    write_csv(out / "head_share.csv", result.heads)
    write_csv(out / "prediction.csv", result.prediction_rows())
    write_json(out / "patterns_summary.json", summary)
    if result.counts:
        metadata = {"transitions": str(result.transitions), "steps": json.dumps(result.steps), "rule": result.rule}
        atomic_write_file(out / "change_counts.safetensors",
                          lambda tmp: save_file({n: c.contiguous() for n, c in result.counts.items()}, str(tmp),
                                                metadata=metadata))
    figures = [plots.frequency_histogram(result.histogram, out / "frequency_histogram.png"),
               plots.prediction_curves(result.prediction_rows(), out / "prediction.png"),
               plots.head_share_heatmap(result.heads, out / "head_share.png")]
    if maps:
        figures.append(plots.frequency_maps(result.pictures, result.matrices, maps, out / "frequency_maps.png"))
    return [f for f in figures if f is not None]


def _print(summary: dict) -> None:
    print(f"{summary['weights']:,} weights over {summary['transitions']} transitions ({summary['rule']} rule): "
          f"{summary['hot_weights']:,} hot (changed at more than half), {summary['hot_fraction']:.4%}")
    heads = summary["heads"]
    if heads["count"]:
        print(f"attention heads: {heads['ratio_at_least_2']} of {heads['count']} hold at least twice their share "
              f"of the changes (largest ratio {heads['max_ratio']:.2f})")
    print(f"{'predictor':>12} {'precision':>10} {'chance':>8} {'recall':>8} {'chance':>8}")
    for name, row in summary["prediction"].items():
        cells = [row["precision"], row["chance_precision"], row["recall"], row["chance_recall"]]
        shown = ["n/a" if v is None else f"{v:.4f}" for v in cells]
        print(f"{name:>12} " + " ".join(f"{v:>{w}}" for v, w in zip(shown, (10, 8, 8, 8))))


def run(args: argparse.Namespace) -> dict:
    settings, out = _check(args)
    checkpoints = find_step_checkpoints(args.ckpt_dir, args.max_step, args.step_interval)
    model = args.base or default_base_for_run(args.ckpt_dir)
    if model is None:
        raise SubnetscopeError(f"no --base given and {args.ckpt_dir}/base does not exist: pass --base BASE")
    head_dim, note = _head_dim(model, settings.head_dim)
    settings = dataclasses.replace(settings, head_dim=head_dim)
    base = open_checkpoint(model)
    opened = [(c.step, open_checkpoint(str(c.path))) for c in checkpoints]
    scores, source = load_scores(Path(args.ckpt_dir), [c.path for c in checkpoints])
    result = analyze_patterns(base, opened, scores, settings)
    result.grad_ema_source = source
    if note:
        result.notes.append(note)
    if source is None:
        result.notes.append("grad_ema not predicted: no checkpoint holds a per-weight gradient EMA (trainer_state.pt "
                            "of an AdamW or ASPG run)")
    summary = summary_of(result, args.ckpt_dir, model)
    write_outputs(result, summary, out, args.maps)
    _print(summary)
    for line in result.notes:
        print(f"note: {line}")
    print(f"results in {out}/")
    return summary


@cli_main
def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
