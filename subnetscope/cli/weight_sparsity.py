"""weight_sparsity.py: how sparse is a saved model? Per-matrix and overall zeros of the linear weights.

Reads any checkpoint the analysis reads (a model folder, a run's checkpoint-N or final/, a Hub id),
streaming one tensor at a time. Embeddings, norms and biases are left out, as in main_prune.py.
"""
from __future__ import annotations

import argparse

from ..checkpoint import open_checkpoint
from ..errors import ArgumentParser, cli_main
from ..naming import module_type
from ..pruning import dead_rows_cols
from ..report import write_json
from .common import check_output_file

NOT_LINEAR = {"embedding", "per_layer_embedding", "norm", "lm_head", "head"}


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and module_type(name) not in NOT_LINEAR


def sparsity_summary(checkpoint: str) -> dict:
    source = open_checkpoint(checkpoint)
    rows, zeros, total = [], 0, 0
    for name in source.names():
        if not is_linear_weight(name, source.shape(name)):
            continue
        w = source.get(name)
        z = int((w == 0).sum())
        dead_r, dead_c = dead_rows_cols(w)
        rows.append({"name": name, "numel": w.numel(), "zeros": z, "sparsity": z / w.numel(),
                     "dead_rows": dead_r, "dead_cols": dead_c})
        zeros, total = zeros + z, total + w.numel()
    return {"checkpoint": checkpoint, "overall_sparsity": zeros / total if total else 0.0, "numel": total,
            "tensors": rows}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="model folder, run checkpoint (checkpoint-N, final) or Hub id")
    p.add_argument("--json", help="also write the summary to this JSON file")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    json_path = check_output_file(args.json, "--json") if args.json else None
    summary = sparsity_summary(args.checkpoint)
    width = max((len(r["name"]) for r in summary["tensors"]), default=4)
    print(f"{'tensor':<{width}}  {'sparsity':>9}  {'dead rows':>9}  {'dead cols':>9}")
    for r in summary["tensors"]:
        print(f"{r['name']:<{width}}  {r['sparsity']:>9.4f}  {r['dead_rows']:>9}  {r['dead_cols']:>9}")
    print(f"overall: {summary['overall_sparsity']:.4f} of {summary['numel']:,} linear weights are zero")
    if json_path:
        write_json(json_path, summary)
    return 0

