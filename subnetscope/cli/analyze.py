"""analyze_sparse_subnetwork.py: which weights changed between checkpoints, and where they sit."""
from __future__ import annotations

import argparse
from pathlib import Path

from .. import plots
from ..checkpoint import default_base_for_run, find_step_checkpoints, open_checkpoint
from ..engine import analyze_overlap, analyze_pair, analyze_series
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..report import (
    format_pair_table,
    write_json,
    write_overlap_outputs,
    write_pair_outputs,
    write_series_outputs,
)
from .common import add_rule_args, add_run_args, settings_from_args

DESCRIPTION = """\
Compare fine-tuned checkpoints with their starting point and report which weights changed
(three rules side by side), per tensor, block and module type, how localized the changes are,
and, for a run folder, how the changed subnetwork grows over steps.

Two modes:
  series:  --ckpt_dir RUN [--base BASE]    every step checkpoint in RUN against BASE (default RUN/base)
  pair:    --base A --tuned B [--overlap_with C]
Models are folders written by save_pretrained (model.safetensors, sharded safetensors or
pytorch_model.bin), compact checkpoints written by main_grpo.py/main_ppo.py, Hub ids, or LoRA
adapter folders (PEFT's save_pretrained, a TRL LoRA run's checkpoint-N), merged onto --base (series:
by default the run's base) one matrix at a time: W0 + scale·B·A in W0's dtype, as merge_and_unload does.
--view_dtype bfloat16 judges float32 checkpoints as their bf16 roundings (summary.json records it).
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", help="the starting weights θ0 (folder or Hub id); series mode: default RUN/base")
    series = p.add_argument_group("series mode")
    series.add_argument("--ckpt_dir", help="run folder with step checkpoints (checkpoint-N, step_N, ...)")
    series.add_argument("--max_step", type=int, help="ignore checkpoints after this step")
    series.add_argument("--step_interval", type=int, help="keep only steps that are multiples of this")
    pair = p.add_argument_group("pair mode")
    pair.add_argument("--tuned", help="the fine-tuned weights (folder or Hub id), or a LoRA adapter folder to merge "
                                      "onto --base")
    pair.add_argument("--overlap_with", help="a second run tuned from --base: report the two subnetworks' overlap")
    add_rule_args(p)
    add_run_args(p)
    p.add_argument("--rank", action="store_true",
                   help="rank of every 2-D update: numerical, 99%% energy and the plan's σ > 0.01·σ₁ "
                        "(costly: one SVD per matrix; GPU when --device is)")
    p.add_argument("--shells", type=int, nargs="+", metavar="N",
                   help="MatFormer shell boundaries in FFN neurons (default 8192 16384: E2B inside E4B); "
                        "matrices of another width are scaled in proportion")
    p.add_argument("--workers", type=int,
                   help="tensors compared at once by the CPU's tensor-by-tensor pass, reading overlapping compute "
                        "(default: up to 8, fewer with few cores or large tensors, to bound the scratch memory); "
                        "on a GPU only tensors that differ in shape or dtype between the two sides go that way")
    p.add_argument("--output_dir", default="plots/analysis", help="results folder (default plots/analysis)")
    return p


def _pick_mode(args: argparse.Namespace) -> str:
    if args.ckpt_dir and args.tuned:
        raise SubnetscopeError("use either --ckpt_dir (series) or --tuned (pair), not both")
    if args.ckpt_dir:
        if args.overlap_with:
            raise SubnetscopeError("--overlap_with goes with --base/--tuned")
        return "series"
    if args.base and args.tuned:
        return "pair"
    raise SubnetscopeError("nothing to compare: give --ckpt_dir RUN, or --base A --tuned B (see --help)")


def _figures_for_pair(pair, out: Path, rule: str) -> list[Path]:
    made = [plots.block_module_heatmap(pair, rule, out / "heatmap_block_module.png"),
            plots.per_block_bars(pair, out / "per_block.png"),
            plots.rank_histogram(pair, out / "rank_histogram.png")]
    if plots.has_nested_ffn(pair):
        made.append(plots.shell_chart(pair, rule, out / "shells.png"))
    else:
        print("no shells.png: the model is not a MatFormer (Gemma-3n), so its FFNs have no nested shells")
    return [m for m in made if m is not None]


def run(args: argparse.Namespace) -> dict:
    mode = _pick_mode(args)
    if args.workers is not None and args.workers < 1:
        raise SubnetscopeError(f"--workers {args.workers}: needs at least 1")
    cfg = settings_from_args(args)
    rules, device, out, progress, view = cfg.rules, cfg.device, cfg.out, cfg.progress, cfg.view_dtype
    summary: dict = {"mode": mode, "view_dtype": view}
    if mode == "pair":
        base = open_checkpoint(args.base)
        tuned = open_checkpoint(args.tuned, base=base)
    else:
        checkpoints = find_step_checkpoints(args.ckpt_dir, args.max_step, args.step_interval)
        if len(checkpoints) < 2:
            raise SubnetscopeError(
                f"{args.ckpt_dir} has one checkpoint (step {checkpoints[0].step}) in range: a series needs two; "
                "compare it with --base/--tuned instead"
            )
        base_spec = args.base or default_base_for_run(args.ckpt_dir)
        if base_spec is None:
            raise SubnetscopeError(f"no --base given and {args.ckpt_dir}/base does not exist: pass --base BASE")
        base = open_checkpoint(base_spec)
        opened = [(c.step, open_checkpoint(str(c.path), base=base)) for c in checkpoints]
        tuned = opened[-1][1]
        series = analyze_series(base, opened, rules, device, progress, view)
        summary["series"] = write_series_outputs(series, out, args.rule)
        plots.density_coverage_curves(series, out / "density_coverage.png")
        plots.hot_histogram(series, args.rule, out / "hot_histogram.png")
    pair = analyze_pair(base, tuned, rules, device, args.rank, cfg.shells, progress, args.workers, view)
    summary["pair"] = write_pair_outputs(pair, out, args.topk)
    if args.overlap_with:
        other = open_checkpoint(args.overlap_with, base=base)
        overlap = analyze_overlap(base, tuned, other, rules, device, progress, view)
        summary["overlap"] = write_overlap_outputs(overlap, out)
    _figures_for_pair(pair, out, args.rule)
    write_json(out / "summary.json", summary)
    print(format_pair_table(pair, args.rule, args.topk))
    if args.overlap_with:
        o = summary["overlap"][args.rule]
        print(f"\noverlap ({args.rule}): o1={o['o1']} (random {o['o1_random']:.4f})  "
              f"o2={o['o2']} (random {o['o2_random']:.4f})  jaccard={o['jaccard']}")
    print(f"\nresults in {out}/ (summary.json, per_tensor.csv, per_block.csv, per_module.csv, figures)")
    return summary


@cli_main
def main(argv: list[str] | None = None) -> int:
    run(build_parser().parse_args(argv))
    return 0
