"""check_mask.py: check that a fine-tuned (merged) checkpoint is exactly zero wherever its mask is.

For every masked tensor: entries non-zero where the mask is False (violations: must be 0), the
mask's sparsity and the weights' actual zero fraction; the same per layer and overall. Writes the
report as JSON (--output) and exits 1 when any masked-out weight is non-zero.
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..checkpoint import open_checkpoint
from ..errors import ArgumentParser, cli_main
from ..masks import check_masks_fit, load_masks
from ..naming import block_index
from ..report import write_json
from .common import check_output_file


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model folder or weights file (e.g. a run's final/)")
    p.add_argument("--mask_path", required=True, help="the mask file the model was trained under")
    p.add_argument("--output", default="sparsity_report.json", help="JSON report (default sparsity_report.json)")
    return p


def sparsity_report(source, masks: dict[str, torch.Tensor]) -> dict:
    """Per tensor, per layer and overall: violations, mask sparsity and actual zero fraction."""
    tensors, layers = [], {}
    for name, mask in masks.items():
        w = source.get(name)
        zero = w == 0
        row = {"tensor": name, "numel": mask.numel(), "masked_out": int((~mask).sum()),
               "violations": int((~zero & ~mask).sum()), "zeros": int(zero.sum())}
        row["mask_sparsity"] = row["masked_out"] / row["numel"]
        row["actual_sparsity"] = row["zeros"] / row["numel"]
        tensors.append(row)
        block = block_index(name)
        layer = layers.setdefault("other" if block is None else f"layer_{block}",
                                  {"numel": 0, "masked_out": 0, "violations": 0, "zeros": 0})
        for key in ("numel", "masked_out", "violations", "zeros"):
            layer[key] += row[key]
    for layer in layers.values():
        layer["mask_sparsity"] = layer["masked_out"] / layer["numel"]
        layer["actual_sparsity"] = layer["zeros"] / layer["numel"]
    total = sum(r["numel"] for r in tensors)
    overall = {key: sum(r[key] for r in tensors) for key in ("masked_out", "violations", "zeros")}
    overall.update(numel=total, mask_sparsity=overall["masked_out"] / total, actual_sparsity=overall["zeros"] / total,
                   passed=overall["violations"] == 0)
    return {"overall": overall, "layers": layers, "tensors": tensors}


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = check_output_file(args.output, "--output")
    mask_set = load_masks(args.mask_path)
    source = open_checkpoint(args.checkpoint)
    shapes = {n: torch.empty(source.shape(n), device="meta") for n in source.names()}
    check_masks_fit(mask_set, shapes, f"--mask_path {args.mask_path}", same_model=False)
    report = sparsity_report(source, mask_set.masks)
    report["checkpoint"], report["mask_path"] = args.checkpoint, args.mask_path
    write_json(output, report)
    o = report["overall"]
    for name, layer in report["layers"].items():
        print(f"{name}: mask sparsity {layer['mask_sparsity']:.4f}, actual {layer['actual_sparsity']:.4f}, "
              f"violations {layer['violations']}")
    verdict = "PASS" if o["passed"] else "FAIL"
    print(f"{verdict}: {o['violations']} non-zero weights where the mask is 0; mask sparsity {o['mask_sparsity']:.4f}, "
          f"actual {o['actual_sparsity']:.4f} over {o['numel']:,} weights; report in {args.output}")
    return 0 if o["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
