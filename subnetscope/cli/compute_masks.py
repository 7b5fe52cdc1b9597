"""compute_masks.py: importance masks at a list of sparsities, each in its own bit-packed mask file.

Writes into --output_dir, for each sparsity s, mask_<method>_<importance>_<group>_s<s>.safetensors
(True = keep), plus validation.json / validation.csv (expected vs actual removed entries per
tensor and overall) and, with --plot, mask_validation.png. With --from_run RUN it writes the
"ever changed" mask of a run instead (main_grpo.py / main_ppo.py, main_sft.py, or any TRL trainer
with SubnetTrackerCallback, LoRA runs included): the subnetwork that run updated, for `--update_mask`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..config import IMPORTANCES, MASK_EXTRA_TENSORS, MASK_GROUPS, MASK_METHODS
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..outputs import check_output_dir
from .training import quiet_transformers

DEFAULT_SPARSITIES = [round(0.1 * i, 1) for i in range(10)]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--policy", help="model to score: a folder written by save_pretrained, a Hub id, or "
                                      "tiny-gpt2 / tiny-gemma3n (random, offline)")
    src.add_argument("--from_run", help="a run folder (main_grpo.py / main_ppo.py / main_sft.py, or a TRL trainer's "
                                        "output_dir with SubnetTrackerCallback): write its 'ever changed' mask")
    p.add_argument("--output_dir", default="checkpoints/masks",
                   help="where the mask files and reports go (default checkpoints/masks)")
    p.add_argument("--sparsity", type=float, nargs="+", help="fractions of weights to remove, each in [0, 1) "
                   "(default 0.0 0.1 ... 0.9; not with --method nm, whose sparsity is 1 - N/M)")
    p.add_argument("--method", choices=MASK_METHODS, default="unstructured",
                   help="unstructured; structured (whole MLP neurons and attention heads); random (the baseline); "
                        "nm (N of every M consecutive inputs kept) (default unstructured)")
    p.add_argument("--importance", choices=IMPORTANCES, default="magnitude",
                   help="|W|; |grad| or |W*grad| summed over calibration batches; or Wanda's |W|*||x|| "
                        "(default magnitude)")
    p.add_argument("--group", choices=MASK_GROUPS, default="matrix",
                   help="which weights compete for the cut (unstructured and random): each matrix, each output row "
                        "(Wanda), or all tensors at once (default matrix)")
    p.add_argument("--nm", default="2:4", help="N:M pattern of --method nm, e.g. 2:4 or 4:8 (default 2:4)")
    p.add_argument("--include", nargs="+", choices=MASK_EXTRA_TENSORS, default=[],
                   help="also mask these (by default only linear-layer weights are prunable)")
    p.add_argument("--calib_data", help="text for gradient/taylor/wanda scores: boolq, hellaswag, gsm8k, imdb "
                                        "(through datasets) or a local file such as ../shared/data/imdb/train.jsonl.gz")
    p.add_argument("--calib_batches", type=int, default=4, help="calibration batches (default 4)")
    p.add_argument("--calib_batch_size", type=int, default=4, help="sequences per calibration batch (default 4)")
    p.add_argument("--calib_seq_len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--tokenizer", help="tokenizer for models without one (default: the model's own)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of --method random and of the calibration sample (default 0)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write mask_validation.png (default on)")
    return p


def parse_nm(spec: str) -> tuple[int, int]:
    """N and M of an N:M pattern: N of every M inputs kept, so 0 < N < M (as `nm_masks` needs)."""
    try:
        n, m = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SubnetscopeError(f"--nm {spec}: write it as N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise SubnetscopeError(f"--nm {spec}: N of every M inputs are kept, so need 0 < N < M, e.g. 2:4")
    return n, m


def mask_name(method: str, importance: str, group: str, sparsity: float, nm: tuple[int, int]) -> str:
    if method == "nm":
        return f"mask_nm{nm[0]}-{nm[1]}_{importance}.safetensors"
    if method == "structured":
        return f"mask_structured_{importance}_s{sparsity:.2f}.safetensors"
    return f"mask_{method}_{'random' if method == 'random' else importance}_{group}_s{sparsity:.2f}.safetensors"


def run_model(run_dir: Path) -> tuple[dict[str, list[int]], str]:
    """The run's parameter names and shapes (what a mask's fingerprint covers) and its model: from
    run_config.json, or, for a TRL run folder without one, from its base/ (θ0)."""
    from ..checkpoint import BASE_DIR, open_checkpoint
    from ..runstate import RUN_CONFIG, read_run_config

    if (run_dir / RUN_CONFIG).is_file():
        config = read_run_config(run_dir)
        if "parameters" in config:
            return config["parameters"], config["settings"].get("policy", "")
    if not (run_dir / BASE_DIR).is_dir():
        raise SubnetscopeError(f"{run_dir} has neither {RUN_CONFIG} nor {BASE_DIR}/ (θ0): the mask's model is "
                               "unknown; pass the run folder the trainer wrote")
    base = open_checkpoint(str(run_dir / BASE_DIR))
    return {n: list(base.shape(n)) for n in base.names()}, str(run_dir / BASE_DIR)


def write_run_mask(args: argparse.Namespace, out: Path) -> int:
    """The 'ever changed' mask of the run in --from_run."""
    from ..checkpoint import read_ever_changed
    from ..masks import MaskSet, model_fingerprint, save_masks
    from ..report import write_json

    run_dir = Path(args.from_run)
    step, masks = read_ever_changed(run_dir)
    shapes, model = run_model(run_dir)
    unknown = sorted(set(masks) - set(shapes))
    if unknown:
        raise SubnetscopeError(f"{run_dir}: the tracker state names {unknown[0]}, which the run's model lacks: the "
                               "folder mixes two runs; pass a single run's folder")
    settings = {"method": "ever_changed", "source_run": str(run_dir.resolve()), "step": step, "model": model}
    mask_set = MaskSet(masks, settings, model_fingerprint(shapes))
    path = save_masks(out / f"mask_ever_changed_step{step}.safetensors", mask_set)
    kept = 1.0 - mask_set.sparsity()
    write_json(out / "validation.json", {"masks": [{"file": path.name, "step": step, "changed_fraction": kept}]})
    print(f"{path}: {kept:.2%} of {sum(m.numel() for m in masks.values()):,} weights changed by step {step}")
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = check_output_dir(args.output_dir)
    if args.from_run:
        if not Path(args.from_run).is_dir():
            raise SubnetscopeError(f"--from_run {args.from_run} is not a folder: pass the run folder a trainer wrote")
        quiet_transformers()
        return write_run_mask(args, out)
    nm = parse_nm(args.nm)
    if args.method == "nm" and args.sparsity:
        raise SubnetscopeError(f"--method nm fixes the sparsity at 1 - N/M = {1 - nm[0] / nm[1]:g}: drop --sparsity")
    levels = [1 - nm[0] / nm[1]] if args.method == "nm" else (args.sparsity or DEFAULT_SPARSITIES)
    bad = [s for s in levels if not 0.0 <= s < 1.0]
    if bad:
        raise SubnetscopeError(f"--sparsity {bad[0]}: every sparsity must be in [0, 1)")
    for flag in ("calib_batches", "calib_batch_size", "calib_seq_len"):
        if getattr(args, flag) < 1:
            raise SubnetscopeError(f"--{flag} must be at least 1")
    needs_data = args.importance != "magnitude" and args.method != "random"
    if needs_data and not args.calib_data:
        raise SubnetscopeError(f"--importance {args.importance} needs data: pass --calib_data (a data set name "
                               "or a local file such as ../shared/data/imdb/train.jsonl.gz)")
    quiet_transformers()
    write_level_masks(args, out, levels, nm, needs_data)
    return 0


def write_level_masks(args: argparse.Namespace, out: Path, levels: list[float], nm: tuple[int, int],
                      needs_data: bool) -> None:
    """The masks of the model in --policy at each sparsity of `levels`, and their validation reports;
    torch and the model load here, after main has checked the flags."""
    import torch

    from .. import plots
    from ..data import calibration_batches, load_task_texts, token_stream
    from ..devices import resolve_device
    from ..importance import (
        expected_pruned,
        importance_scores,
        nm_masks,
        prunable_tensors,
        random_scores,
        select_masks,
        unit_groups,
    )
    from ..masks import MaskSet, model_fingerprint, save_masks, validation_rows, validation_summary
    from ..models import load_causal_lm, load_tokenizer
    from ..report import write_csv, write_json

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.policy, args.tokenizer) if needs_data else None
    model = load_causal_lm(args.policy, torch.float32, vocab_size=len(tokenizer) if tokenizer else None).to(device)
    tensors = prunable_tensors(model, tuple(args.include))
    units = unit_groups(model, tensors) if args.method == "structured" else None  # refused before any scoring
    if args.method == "structured" and not units:
        raise SubnetscopeError("--method structured found no MLP or attention weights among the prunable tensors")
    batches = None
    if needs_data:
        limit = args.calib_batches * args.calib_batch_size * 8
        tokens = token_stream(load_task_texts(args.calib_data, limit=limit, seed=args.seed), tokenizer)
        vocab = model.get_input_embeddings().num_embeddings
        if int(tokens.max()) >= vocab:
            raise SubnetscopeError(f"the tokenizer makes token id {int(tokens.max())} but the model has {vocab} "
                                   "embeddings: pass the model's own --tokenizer")
        batches = calibration_batches(tokens, args.calib_batches, args.calib_batch_size, args.calib_seq_len)
    scores = random_scores(tensors, args.seed) if args.method == "random" else importance_scores(
        model, tensors, args.importance, batches)
    fingerprint = model_fingerprint({n: list(p.shape) for n, p in model.named_parameters()})
    reports, all_rows = [], []
    for level in levels:
        masks = nm_masks(scores, tensors, *nm) if args.method == "nm" else select_masks(
            scores, tensors, level, args.method, args.group, units)
        settings = {"model": args.policy, "method": args.method,
                    "importance": "random" if args.method == "random" else args.importance,
                    "group": args.group if args.method in ("unstructured", "random") else None, "sparsity": level,
                    "include": args.include, "seed": args.seed,
                    "nm": args.nm if args.method == "nm" else None, "calib_data": args.calib_data,
                    "calib_batches": args.calib_batches if batches else 0}
        path = save_masks(out / mask_name(args.method, args.importance, args.group, level, nm),
                          MaskSet(masks, settings, fingerprint))
        rows = validation_rows(masks, expected_pruned(tensors, level, args.method, args.group, units, nm))
        summary = {"file": path.name, **validation_summary(rows, level)}
        reports.append(summary)
        all_rows.extend({"file": path.name, "target_sparsity": level, **r} for r in rows)
        print(f"{path}: target {level:.2f}, actual {summary['overall_sparsity']:.4f} over {summary['weights']:,} "
              f"weights in {summary['tensors']} tensors"
              + (f"; {len(summary['mismatched_tensors'])} tensors off plan" if summary["mismatched_tensors"] else ""))
    write_json(out / "validation.json", {"settings": vars(args), "masks": reports})
    write_csv(out / "validation.csv", all_rows)
    if args.plot:
        plots.mask_validation(reports, all_rows, out / "mask_validation.png")
