"""analyze_results.py: tables and figures from a folder of main_prune.py runs, from metrics.jsonl alone.

Every sub-folder of --results_dir holding config.json and metrics.jsonl is a run. Writes, each
figure with a CSV of its numbers beside it:
  summary.csv                 per run: target sparsity, final sparsity, val loss, mean revival, wall time
  loss_vs_sparsity.png        final validation loss against the target sparsity
  revival_over_time.png       revival rate over training, one line per run
  dead_neurons_per_layer.png  all-zero rows + columns per layer at the end of each run
  effective_rank_per_layer.png mean effective rank of each layer's matrices at the end of each run
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from .. import plots
from ..errors import SubnetscopeError, cli_main
from ..logger import read_metrics
from ..naming import block_index
from ..report import write_csv, write_json

LAYER_KEY = re.compile(r"^(sparsity|dead_neurons)/layer_(\d+)$")


def load_runs(results_dir: str) -> list[dict]:
    root = Path(results_dir)
    if not root.is_dir():
        raise SubnetscopeError(f"{results_dir} is not a folder: pass the folder that holds the runs")
    runs = []
    for folder in sorted(p for p in [root, *root.iterdir()] if p.is_dir()):
        if (folder / "metrics.jsonl").is_file() and (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            records = read_metrics(folder / "metrics.jsonl")
            if records and "pruning/sparsity" in records[0]:
                runs.append({"name": folder.name, "config": config, "records": records})
    if not runs:
        raise SubnetscopeError(f"no main_prune.py runs (config.json + metrics.jsonl) in {results_dir}")
    return sorted(runs, key=lambda r: (r["config"]["target_sparsity"], r["name"]))


def _last(records: list[dict], key: str):
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        recs = run["records"]
        intervals = [r["weight_revival/interval_rate"] for r in recs if r.get("weight_revival/interval_rate") is not None]
        rows.append({
            "run": run["name"], "target_sparsity": run["config"]["target_sparsity"],
            "hard_mask": run["config"]["hard_mask"], "steps": recs[-1]["step"],
            "final_sparsity": recs[-1]["sparsity/overall"], "final_val_loss": _last(recs, "val/loss"),
            "final_train_loss": recs[-1]["train/loss"],
            "mean_interval_revival": sum(intervals) / len(intervals) if intervals else None,
            "wall_seconds": recs[-1]["time/elapsed"],
        })
    return rows


def per_layer_rows(runs: list[dict]) -> list[dict]:
    """Final dead neurons, sparsity and mean effective rank per layer, per run."""
    rows = []
    for run in runs:
        final = run["records"][-1]
        layers: dict[int, dict] = {}
        for key, value in final.items():
            m = LAYER_KEY.match(key)
            if m:
                layers.setdefault(int(m.group(2)), {})[m.group(1)] = value
            elif key.startswith("effective_rank/") and value is not None:
                block = block_index(key.split("/", 1)[1])
                if block is not None:
                    layers.setdefault(block, {}).setdefault("ranks", []).append(value)
        for layer, vals in sorted(layers.items()):
            ranks = vals.get("ranks", [])
            rows.append({"run": run["name"], "layer": layer, "sparsity": vals.get("sparsity"),
                         "dead_neurons": vals.get("dead_neurons"),
                         "mean_effective_rank": sum(ranks) / len(ranks) if ranks else None})
    return rows


def revival_rows(runs: list[dict]) -> list[dict]:
    return [{"run": run["name"], "step": r["step"], "revival_rate": r.get("weight_revival/revival_rate"),
             "interval_rate": r.get("weight_revival/interval_rate"), "sparsity": r["sparsity/overall"]}
            for run in runs for r in run["records"]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results_dir", required=True, help="folder of main_prune.py run folders (or one run folder)")
    p.add_argument("--output_dir", default="plots/pruning", help="tables and figures (default plots/pruning)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the figures (default on)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs = load_runs(args.results_dir)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary, layers, revival = summary_rows(runs), per_layer_rows(runs), revival_rows(runs)
    write_csv(out / "summary.csv", summary)
    write_csv(out / "loss_vs_sparsity.csv", summary)
    write_csv(out / "dead_neurons_per_layer.csv", layers)
    write_csv(out / "effective_rank_per_layer.csv", layers)
    write_csv(out / "revival_over_time.csv", revival)
    write_json(out / "summary.json", {"runs": summary})
    if args.plot:
        plots.pruning_figures(summary, layers, revival, out)
    for r in summary:
        loss = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "n/a"
        revive = f"{r['mean_interval_revival']:.3f}" if r["mean_interval_revival"] is not None else "n/a"
        print(f"{r['run']}: target {r['target_sparsity']:.2f}, final sparsity {r['final_sparsity']:.4f}, "
              f"val loss {loss}, mean revival between prunings {revive}, {r['wall_seconds']:.0f} s")
    print(f"results in {out}/")
    return 0
