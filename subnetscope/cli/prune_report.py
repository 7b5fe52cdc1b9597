"""prune_report.py: tables and figures from a folder of main_prune.py and main_sparse_ft.py runs.

Every sub-folder of --results_dir holding config.json and metrics.jsonl is a run. --wandb_run adds
main_prune.py runs logged to Weights & Biases (--wandb PROJECT): an offline run folder
(RUN/wandb/offline-run-*, read from its run-<id>.wandb file, or a folder above several) or
ENTITY/PROJECT/RUN_ID on the service (refused in one line when it cannot be reached). Writes, each
figure with a CSV of its numbers beside it:
  summary.csv                 per run: model, task, method, seed, target and final sparsity, losses,
                              samples/s, wall time (and mean revival for pruning runs; peak GPU memory,
                              peak CPU RSS, task metric and score for sparse fine-tuning runs)
  grouped_summary.csv         per model / task / method / sparsity: runs, mean and std over seeds
  sparsity_vs_performance.csv the groups with the loss change against the same model, task and
                              method at the lowest sparsity
  sparsity_vs_loss.png, sparsity_vs_throughput.png, method_heatmap.png (validation loss per method
                              and sparsity)
and for pruning runs:
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
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..logger import read_metrics
from ..naming import block_index
from ..outputs import check_output_dir
from ..report import write_csv, write_json
from ..stats import mean_and_sd
from ..wandb_runs import wandb_runs

LAYER_KEY = re.compile(r"^(sparsity|dead_neurons)/layer_(\d+)$")


def folder_runs(results_dir: str) -> list[dict]:
    """The runs (config.json + metrics.jsonl) in a folder and its sub-folders."""
    root = Path(results_dir)
    if not root.is_dir():
        raise SubnetscopeError(f"{results_dir} is not a folder: pass the folder that holds the runs")
    runs = []
    for folder in sorted(p for p in [root, *root.iterdir()] if p.is_dir()):
        if (folder / "metrics.jsonl").is_file() and (folder / "config.json").is_file():
            config = json.loads((folder / "config.json").read_text())
            records = read_metrics(folder / "metrics.jsonl")
            kind = "prune" if records and "pruning/sparsity" in records[0] else config.get("kind")
            if records and kind in ("prune", "sparse_ft"):
                runs.append({"name": folder.name, "kind": kind, "config": config, "records": records, "folder": folder})
    if not runs:
        raise SubnetscopeError(f"no main_prune.py or main_sparse_ft.py runs (config.json + metrics.jsonl) in "
                               f"{results_dir}")
    return runs


def logged_runs(spec: str) -> list[dict]:
    """The main_prune.py runs a --wandb_run names (W&B configs lack what sparse runs are grouped by)."""
    runs = []
    for run in wandb_runs(spec):
        records = run["records"]
        if not records or "pruning/sparsity" not in records[0]:
            raise SubnetscopeError(f"--wandb_run {spec}: W&B run {run['name']} has no main_prune.py records "
                                   "(pruning/sparsity): read main_sparse_ft.py runs from their folder (--results_dir)")
        runs.append({"name": run["name"], "kind": "prune", "config": run["config"], "records": records,
                     "folder": run["folder"]})
    return runs


def load_runs(results_dir: str | None, wandb_specs: list[str] | None = None) -> list[dict]:
    """The runs of a results folder and of W&B runs, checked and read before anything is written."""
    if not results_dir and not wandb_specs:
        raise SubnetscopeError("nothing to analyze: pass --results_dir FOLDER and/or --wandb_run RUN")
    runs = folder_runs(results_dir) if results_dir else []
    for spec in wandb_specs or []:
        runs += logged_runs(spec)
    names = [r["name"] for r in runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SubnetscopeError(f"runs named {', '.join(twice)} were given twice (a folder and its W&B run?): "
                               "pass each run once")
    return sorted(runs, key=lambda r: (r["kind"], _target(r), r["name"]))


def _target(run: dict) -> float:
    return run["config"]["target_sparsity"] if run["kind"] == "prune" else run["config"]["sparsity"]


def _last(records: list[dict], key: str):
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)


def _prune_method(cfg: dict) -> str:
    """-hard: mask held from the first pruning; plain: held from the last (the default since hold_final);
    -free: never held (--no-hold_final, and every run from before hold_final)."""
    if cfg["hard_mask"]:
        return "gradual-magnitude-hard"
    return "gradual-magnitude" if cfg.get("hold_final", False) else "gradual-magnitude-free"


def _prune_row(run: dict) -> dict:
    cfg, recs = run["config"], run["records"]
    intervals = [r["weight_revival/interval_rate"] for r in recs if r.get("weight_revival/interval_rate") is not None]
    elapsed = recs[-1]["time/elapsed"]
    return {
        "model": f"gpt2-{cfg['n_layer']}x{cfg['n_embd']}", "task": Path(cfg["data"]).stem,
        "method": _prune_method(cfg), "hard_mask": cfg["hard_mask"],
        "final_sparsity": recs[-1]["sparsity/overall"], "final_val_loss": _last(recs, "val/loss"),
        "final_train_loss": recs[-1]["train/loss"],
        "samples_per_s": recs[-1]["step"] * cfg["batch_size"] / elapsed if elapsed else None,
        "mean_interval_revival": sum(intervals) / len(intervals) if intervals else None, "wall_seconds": elapsed,
    }


SPARSE_FT_SUMMARY_KEYS = ("peak_gpu_memory_gb", "peak_cpu_rss_gb", "task_metric", "task_score")


def _sparse_ft_row(run: dict) -> dict:
    cfg, recs = run["config"], run["records"]
    summary_path = run["folder"] / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}  # folder runs only
    rates = [r["throughput/samples_per_s"] for r in recs if r.get("throughput/samples_per_s") is not None]
    return {
        "model": cfg["model_name"], "task": cfg["task_name"], "method": f"{cfg['finetune']}:{cfg['mask_method']}",
        "final_sparsity": summary.get("final_sparsity"),
        "final_val_loss": summary.get("val_loss", _last(recs, "val/loss")),
        "final_train_loss": _last(recs, "train/loss"),
        "samples_per_s": sum(rates) / len(rates) if rates else None,
        "wall_seconds": summary.get("wall_seconds", _last(recs, "time/elapsed")),
        **{key: summary.get(key) for key in SPARSE_FT_SUMMARY_KEYS},
    }


def summary_rows(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        detail = _prune_row(run) if run["kind"] == "prune" else _sparse_ft_row(run)
        rows.append({"run": run["name"], "kind": run["kind"], "seed": run["config"].get("seed"),
                     "target_sparsity": _target(run), "steps": run["records"][-1]["step"], **detail})
    return rows


GROUP_KEYS = ("model", "task", "method", "target_sparsity")


def grouped_rows(summary: list[dict]) -> list[dict]:
    """Mean and sample std over seeds (and any repeats) of each model / task / method / sparsity."""
    groups: dict[tuple, list[dict]] = {}
    for row in summary:
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    out = []
    for key, rows in groups.items():
        entry = dict(zip(GROUP_KEYS, key), runs=len(rows))
        for metric in ("final_val_loss", "samples_per_s", "final_sparsity"):
            entry[f"{metric}_mean"], entry[f"{metric}_std"] = mean_and_sd([r[metric] for r in rows])
        out.append(entry)
    return sorted(out, key=lambda r: tuple(str(r[k]) if k != "target_sparsity" else f"{r[k]:08.4f}"
                                           for k in GROUP_KEYS))


def performance_rows(grouped: list[dict]) -> list[dict]:
    """Each group's loss against the same model, task and method at its lowest sparsity."""
    base: dict[tuple, dict] = {}
    for row in grouped:
        key = (row["model"], row["task"], row["method"])
        if key not in base or row["target_sparsity"] < base[key]["target_sparsity"]:
            base[key] = row
    out = []
    for row in grouped:
        ref = base[(row["model"], row["task"], row["method"])]
        loss, ref_loss = row["final_val_loss_mean"], ref["final_val_loss_mean"]
        out.append({**{k: row[k] for k in GROUP_KEYS}, "val_loss": loss, "samples_per_s": row["samples_per_s_mean"],
                    "reference_sparsity": ref["target_sparsity"],
                    "val_loss_change": None if loss is None or ref_loss is None else loss - ref_loss})
    return out


def per_layer_rows(runs: list[dict]) -> list[dict]:
    """Final dead neurons, sparsity and mean effective rank per layer, per run."""
    rows = []
    for run in runs:
        if run["kind"] != "prune":
            continue
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
            for run in runs if run["kind"] == "prune" for r in run["records"]]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results_dir", help="folder of main_prune.py / main_sparse_ft.py run folders (or one run)")
    p.add_argument("--wandb_run", nargs="+", metavar="RUN",
                   help="main_prune.py runs logged with --wandb: an offline run folder (RUN/wandb/offline-run-*), its "
                        "run-<id>.wandb file or a folder above them, or ENTITY/PROJECT/RUN_ID on the W&B service")
    p.add_argument("--output_dir", default="plots/results", help="tables and figures (default plots/results)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write the figures (default on)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = check_output_dir(args.output_dir)
    runs = load_runs(args.results_dir, args.wandb_run)
    summary = summary_rows(runs)
    grouped = grouped_rows(summary)
    performance = performance_rows(grouped)
    write_csv(out / "summary.csv", summary)
    write_csv(out / "grouped_summary.csv", grouped)
    write_csv(out / "sparsity_vs_performance.csv", performance)
    write_json(out / "summary.json", {"runs": summary, "groups": grouped})
    if args.plot:
        plots.results_figures(performance, out)
    pruning = [r for r in summary if r["kind"] == "prune"]
    if pruning:
        layers, revival = per_layer_rows(runs), revival_rows(runs)
        write_csv(out / "loss_vs_sparsity.csv", pruning)
        write_csv(out / "dead_neurons_per_layer.csv", layers)
        write_csv(out / "effective_rank_per_layer.csv", layers)
        write_csv(out / "revival_over_time.csv", revival)
        if args.plot:
            plots.pruning_figures(pruning, layers, revival, out)
    for r in summary:
        loss = f"{r['final_val_loss']:.4f}" if r["final_val_loss"] is not None else "n/a"
        rate = f"{r['samples_per_s']:.1f}" if r["samples_per_s"] is not None else "n/a"
        extra = (f", mean revival between prunings {r['mean_interval_revival']:.3f}"
                 if r.get("mean_interval_revival") is not None else "")
        print(f"{r['run']}: {r['method']}, target {r['target_sparsity']:.2f}, final sparsity "
              f"{r['final_sparsity'] if r['final_sparsity'] is None else format(r['final_sparsity'], '.4f')}, "
              f"val loss {loss}, {rate} samples/s{extra}")
    print(f"results in {out}/")
    return 0
