"""Figures for papers: each function writes one PNG whose numbers are also in a CSV beside it."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .changes import RULES
from .checkpoint import atomic_write_file
from .engine import PairResult, SeriesResult

RULE_LABELS = {"exact": "exact (bits differ)", "atol": "|Δ| > atol", "relative": "|Δ| > η·max|w|"}
RULE_COLORS = {"exact": "#1f77b4", "atol": "#ff7f0e", "relative": "#2ca02c"}
# modules only Gemma-3n has; it is the MatFormer model whose FFNs nest (E2B's neurons inside E4B's)
MATFORMER_MODULES = ("altup", "laurel", "per_layer_embedding")


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **kwargs) -> tuple[Figure, Any]:
    """A figure on its own Agg canvas, outside pyplot: importing or calling this module never changes the
    backend a user chose (an interactive one, a notebook's), opens no window, and works headless."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig: Figure, path: Path) -> Path:
    """Lay out and write through a temporary file (never a half-written PNG); no pyplot registry to free."""
    path = Path(path)
    fig.tight_layout()
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=150, format=path.suffix.lstrip(".") or "png"))
    return path


def _integer_ticks(*axes: Axis) -> None:
    """Whole-number ticks on an axis of counts (steps, checkpoints, matrices): no 2.5 steps."""
    for axis in axes:
        axis.set_major_locator(MaxNLocator(integer=True))


def _legend_above(ax, title: str) -> None:
    """Title, then the legend in one row between it and the axes: it can cover no bar, however tall."""
    ax.set_title(title, pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(ax.get_legend_handles_labels()[0]),
              fontsize=8, frameon=False)


def has_nested_ffn(pair: PairResult) -> bool:
    """Whether the model is a MatFormer (Gemma-3n), the only kind whose FFN neurons form nested shells;
    other models' shell table only splits neurons by index, so it gets no MatFormer figure."""
    return any(t.module in MATFORMER_MODULES for t in pair.tensors)


def block_module_heatmap(pair: PairResult, rule: str, path: Path) -> Path:
    blocks = pair.blocks()
    modules = sorted({t.module for t in pair.tensors if t.block is not None})
    grid = np.full((len(blocks), len(modules)), np.nan)
    totals: dict[tuple[int, str], list[int]] = {}
    for t in pair.tensors:
        if t.block is None:
            continue
        cell = totals.setdefault((t.block, t.module), [0, 0])
        cell[0] += t.changed[rule]
        cell[1] += t.numel
    for (b, m), (c, n) in totals.items():
        grid[blocks.index(b), modules.index(m)] = c / n if n else np.nan
    fig, ax = _subplots(figsize=(max(6, 0.9 * len(modules) + 2), max(3, 0.28 * len(blocks) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_xlabel("module type")
    ax.set_ylabel("block")
    ax.set_title(f"fraction of weights changed ({RULE_LABELS[rule]})")
    fig.colorbar(im, ax=ax, label="fraction changed")
    return _save(fig, path)


def per_block_bars(pair: PairResult, path: Path) -> Path:
    return _save(per_block_figure(pair), path)


def per_block_figure(pair: PairResult) -> Figure:
    """Bars per block and rule; the legend sits above the axes, where no bar can be."""
    per_block = pair.group("block")
    blocks = pair.blocks()
    x = np.arange(len(blocks))
    width = 0.27
    fig, ax = _subplots(figsize=(max(6, 0.35 * len(blocks) + 3), 4))
    for i, rule in enumerate(RULES):
        values = [per_block[b][rule] / per_block[b]["numel"] for b in blocks]
        ax.bar(x + (i - 1) * width, values, width, label=RULE_LABELS[rule], color=RULE_COLORS[rule])
    ax.set_xticks(x, [str(b) for b in blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("fraction of block's weights changed")
    _legend_above(ax, "changed weights per block")
    return fig


def rank_histogram(pair: PairResult, path: Path) -> Path | None:
    pct = [100 * t.rank / t.full_rank for t in pair.tensors if t.rank is not None and t.full_rank]
    if not pct:
        return None
    fig, ax = _subplots(figsize=(6, 4))
    ax.hist(pct, bins=np.linspace(0, 100, 21), color="#4c72b0", edgecolor="white")
    ax.set_xlabel("numerical rank of Δ (% of full rank)")
    ax.set_ylabel("matrices")
    _integer_ticks(ax.yaxis)
    ax.set_title(f"update rank, {len(pct)} matrices (mean {np.mean(pct):.1f}%)")
    return _save(fig, path)


def shell_chart(pair: PairResult, rule: str, path: Path) -> Path | None:
    rows = [r for r in pair.shells if r["rule"] == rule]
    if not rows:
        return None
    fig, ax = _subplots(figsize=(6, 4))
    labels = [f"shell {r['shell']}\n(to {r['boundary']})" for r in rows]
    ax.bar(labels, [r["density"] for r in rows], color="#55a868", label="observed density")
    ax.axhline(rows[0]["expected_uniform"], color="black", linestyle="--", label="uniform expectation")
    ax.set_ylabel("fraction of shell's FFN weights changed")
    _legend_above(ax, f"MatFormer shells ({RULE_LABELS[rule]})")
    return _save(fig, path)


def density_coverage_curves(series: SeriesResult, path: Path) -> Path:
    return _save(density_coverage_figure(series), path)


def density_coverage_figure(series: SeriesResult) -> Figure:
    fig, axes = _subplots(1, 3, figsize=(15, 4))
    for rule in RULES:
        kw = {"label": RULE_LABELS[rule], "color": RULE_COLORS[rule], "marker": "o", "markersize": 3}
        axes[0].plot(series.steps, series.density[rule], **kw)
        coverage = [np.nan if v is None else v for v in series.coverage[rule]]
        axes[1].plot(series.steps, coverage, **kw)
        axes[2].plot(series.steps, series.consecutive[rule], **kw)
    titles = ("density: fraction changed vs θ0", "coverage: share of final subnetwork reached",
              "change since previous checkpoint")
    for ax, title in zip(axes, titles):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        _integer_ticks(ax.xaxis)
    axes[0].set_ylabel("fraction")
    axes[0].legend()
    return fig


def hot_histogram(series: SeriesResult, rule: str, path: Path) -> Path:
    return _save(hot_histogram_figure(series, rule), path)


def hot_histogram_figure(series: SeriesResult, rule: str) -> Figure:
    counts = np.asarray(series.hot_histogram[rule], dtype=np.float64)
    fig, ax = _subplots(figsize=(6, 4))
    ax.bar(np.arange(counts.size), counts / counts.sum(), color=RULE_COLORS[rule])
    ax.set_yscale("log")
    ax.set_xlabel("checkpoints at which the weight changed")
    ax.set_ylabel("fraction of weights")
    ax.set_title(f"how often each weight changed ({RULE_LABELS[rule]})")
    _integer_ticks(ax.xaxis)
    return fig


def comparative_block_profiles(labels: Sequence[str], profiles: Sequence[Sequence[float]], path: Path,
                               ylabel: str) -> Path:
    """Per-block profiles of several models on a relative depth axis (models differ in depth)."""
    fig, ax = _subplots(figsize=(7, 4))
    for label, prof in zip(labels, profiles):
        depth = np.linspace(0, 1, len(prof)) if len(prof) > 1 else np.zeros(1)
        ax.plot(depth, prof, marker="o", markersize=3, label=label)
    ax.set_xlabel("relative depth (block / last block)")
    ax.set_ylabel(ylabel)
    ax.set_title("where the updates sit")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def comparative_metric_bars(labels: Sequence[str], values: Sequence[float], lows: Sequence[float],
                            highs: Sequence[float], metric: str, path: Path) -> Path:
    fig, ax = _subplots(figsize=(5, 4))
    vals = np.asarray(values, dtype=np.float64)
    err = np.vstack([vals - np.asarray(lows, dtype=np.float64), np.asarray(highs, dtype=np.float64) - vals])
    ax.bar(labels, vals, yerr=err, capsize=6, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(labels)])
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} across blocks (bootstrap 95% CI)")
    return _save(fig, path)


def comparative_series(labels: Sequence[str], steps: Sequence[Sequence[int]], values: Sequence[Sequence[float]],
                       ylabel: str, title: str, path: Path) -> Path:
    return _save(comparative_series_figure(labels, steps, values, ylabel, title), path)


def comparative_series_figure(labels: Sequence[str], steps: Sequence[Sequence[int]],
                              values: Sequence[Sequence[float]], ylabel: str, title: str) -> Figure:
    """One line per model over training steps."""
    fig, ax = _subplots(figsize=(7, 4))
    for label, s, v in zip(labels, steps, values):
        ax.plot(s, [np.nan if x is None else x for x in v], marker="o", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _integer_ticks(ax.xaxis)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _axes(title: str, xlabel: str, ylabel: str):
    fig, ax = _subplots(figsize=(7, 4.2))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save_with_legend(fig, ax, path: Path, beside: bool = False) -> Path:
    """Write the figure with its legend inside the axes, or `beside` them where the lines fill the plot."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if beside else {}))
    return _save(fig, path)


def pruning_figures(summary: list[dict], layers: list[dict], revival: list[dict], out: Path) -> list[Path]:
    """prune_report.py's four figures from its summary, per-layer and revival rows."""
    made = []
    fig, ax = _axes("Validation loss vs target sparsity", "target sparsity", "final val loss")
    for hard in (False, True):
        pts = sorted((r["target_sparsity"], r["final_val_loss"]) for r in summary
                     if r["hard_mask"] == hard and r["final_val_loss"] is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label="hard mask" if hard else "zeroed (revival allowed)")
    made.append(_save_with_legend(fig, ax, out / "loss_vs_sparsity.png"))
    fig, ax = _axes("Revival of pruned weights", "step", "fraction of last-pruned weights non-zero")
    _integer_ticks(ax.xaxis)
    for run in dict.fromkeys(r["run"] for r in revival):
        pts = [(r["step"], r["revival_rate"]) for r in revival if r["run"] == run and r["revival_rate"] is not None]
        if pts:
            ax.plot(*zip(*pts), label=run)
    ax.set_ylim(-0.02, 1.02)
    made.append(_save_with_legend(fig, ax, out / "revival_over_time.png"))
    for key, name, title in (("dead_neurons", "dead_neurons_per_layer.png", "All-zero rows + columns per layer"),
                             ("mean_effective_rank", "effective_rank_per_layer.png", "Mean effective rank per layer")):
        fig, ax = _axes(title, "layer", key.replace("_", " "))
        _integer_ticks(ax.xaxis, *([ax.yaxis] if key == "dead_neurons" else []))
        runs = list(dict.fromkeys(r["run"] for r in layers))
        width = 0.8 / max(1, len(runs))
        for i, run in enumerate(runs):
            pts = [(r["layer"], r[key]) for r in layers if r["run"] == run and r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.bar([x + i * width for x in xs], ys, width=width, label=run)
        made.append(_save_with_legend(fig, ax, out / name))
    return made


def sweep_density(rows: list[dict], path: Path) -> Path:
    """Fraction of weights changed (relative rule) against learning rate, optimizer and task."""
    ok = [r for r in rows if r.get("status") == "ok"]
    tasks = sorted({r["task"] for r in ok})

    def mean_of(task: str, key: str, value) -> float:
        ys = [r["changed_relative"] for r in ok if r["task"] == task and r.get(key) == value]
        return statistics.mean(ys) if ys else float("nan")

    fig, axes = _subplots(1, 3, figsize=(15, 4))
    lrs = sorted({r["lr"] for r in ok if isinstance(r.get("lr"), (int, float))})
    for task in tasks:
        axes[0].plot(lrs, [mean_of(task, "lr", lr) for lr in lrs], marker="o", label=task)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("learning rate")
    axes[0].legend()
    optimizers = sorted({str(r.get("optimizer")) for r in ok})
    width = 0.8 / max(1, len(tasks))
    for i, task in enumerate(tasks):
        heights = [mean_of(task, "optimizer", v) for v in optimizers]
        axes[1].bar(np.arange(len(optimizers)) + (i - (len(tasks) - 1) / 2) * width, heights, width, label=task)
    axes[1].set_xticks(range(len(optimizers)), optimizers)
    axes[1].set_xlabel("optimizer")
    axes[2].bar(tasks, [mean_of(t, "task", t) for t in tasks], color=[f"C{i}" for i in range(len(tasks))])
    axes[2].set_xlabel("task")
    for ax in axes:
        ax.set_ylabel("fraction changed (relative rule)")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("update density across the sweep (mean over seeds and the other settings)")
    return _save(fig, path)


def gradient_spectrum(spectra: list[dict], path: Path) -> Path:
    """Normalized singular values of the k per-batch gradients, one line per task."""
    fig, ax = _subplots(figsize=(6, 4))
    for task in sorted({s["task"] for s in spectra}):
        values = [s["sigma_normalized"] for s in spectra if s["task"] == task]
        ax.semilogy(range(1, len(values) + 1), [max(v, 1e-12) for v in values], marker="o", markersize=3, label=task)
    ax.set_xlabel("singular value index")
    _integer_ticks(ax.xaxis)
    ax.set_ylabel("σ_i / σ_1 (whole model)")
    ax.set_title("spectrum of k per-batch gradients")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def mask_validation(reports: list[dict], rows: list[dict], path: Path) -> Path:
    """compute_masks.py: overall sparsity achieved against the target, and how it spreads over tensors."""
    fig, axes = _subplots(1, 2, figsize=(12, 4.2))
    targets = [r["target_sparsity"] for r in reports]
    axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="actual = target")
    axes[0].plot(targets, [r["overall_sparsity"] for r in reports], marker="o", label="actual")
    axes[0].set_xlabel("target sparsity")
    axes[0].set_ylabel("overall sparsity of the mask")
    axes[0].set_title("target vs actual")
    axes[0].legend(fontsize=8)
    bins = np.linspace(0, 1, 41)
    viridis = matplotlib.colormaps["viridis"]
    for i, r in enumerate(reports):
        values = [row["sparsity"] for row in rows if row["file"] == r["file"]]
        axes[1].hist(values, bins=bins, histtype="step", color=viridis(i / max(1, len(reports) - 1)),
                     label=f"{r['target_sparsity']:.2f}")
    axes[1].set_xlabel("sparsity of one tensor")
    axes[1].set_ylabel("tensors")
    _integer_ticks(axes[1].yaxis)
    axes[1].set_title("per-tensor sparsity, one line per target")
    if len(reports) <= 12:
        axes[1].legend(fontsize=7, title="target")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _save(fig, path)


def results_figures(rows: list[dict], out: Path) -> list[Path]:
    """prune_report.py: validation loss and samples/s against sparsity per method, and a
    method x sparsity heatmap of validation loss (rows = sparsity_vs_performance.csv)."""
    made = []
    series = sorted({(r["model"], r["task"], r["method"]) for r in rows})
    for key, name, label in (("val_loss", "sparsity_vs_loss.png", "validation loss"),
                             ("samples_per_s", "sparsity_vs_throughput.png", "training samples / s")):
        fig, ax = _axes(f"{label} vs sparsity", "sparsity", label)
        for model, task, method in series:
            pts = sorted((r["target_sparsity"], r[key]) for r in rows
                         if (r["model"], r["task"], r["method"]) == (model, task, method) and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{method} ({model}, {task})")
        made.append(_save_with_legend(fig, ax, out / name))
    methods = sorted({r["method"] for r in rows})
    levels = sorted({r["target_sparsity"] for r in rows})
    cells: dict[tuple[int, int], list[float]] = {}
    for r in rows:
        if r["val_loss"] is not None:
            cells.setdefault((methods.index(r["method"]), levels.index(r["target_sparsity"])), []).append(r["val_loss"])
    grid = np.full((len(methods), len(levels)), np.nan)
    for (i, j), values in cells.items():
        grid[i, j] = statistics.fmean(values)
    fig, ax = _subplots(figsize=(max(5, 0.9 * len(levels) + 3), max(2.5, 0.5 * len(methods) + 1.5)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis_r")
    ax.set_xticks(range(len(levels)), [f"{s:.2f}" for s in levels])
    ax.set_yticks(range(len(methods)), methods)
    for i in range(len(methods)):
        for j in range(len(levels)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlabel("sparsity")
    ax.set_title("validation loss by method and sparsity (mean over models, tasks and seeds in the cell)")
    fig.colorbar(image, ax=ax, label="validation loss")
    made.append(_save(fig, out / "method_heatmap.png"))
    return made


def throughput_vs_batch(rows: list[dict], path: Path) -> Path:
    """Training samples/s against batch size, one panel per method and one line per sparsity."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = _subplots(1, len(methods), figsize=(6 * len(methods), 4.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        for sparsity in sorted({r["sparsity"] for r in rows}):
            pts = [(r["batch_size"], r["samples_per_s"]) for r in rows
                   if r["method"] == method and r["sparsity"] == sparsity and r["samples_per_s"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"sparsity {sparsity:.2f}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (samples)")
        ax.set_ylabel("training samples / s")
        ax.set_title(method)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def study_figures(rows: list[dict], overlaps: list[dict], out: Path) -> list[Path]:
    """The study's figures: the share of weights each algorithm changed, per rule (results.csv), and
    the seed-to-seed Jaccard overlap against its chance level (overlap.csv). The first plots the
    changed share, not sparsity, so that differences of a point or two stay visible."""
    made = []
    algos = list(dict.fromkeys(r["algo"] for r in rows))
    fig, ax = _subplots(figsize=(7, 4.2))
    width = 0.8 / len(RULES)
    top = 0.0
    for i, rule in enumerate(RULES):
        values = [[100 * r[f"changed_{rule}"] for r in rows if r["algo"] == a] for a in algos]
        means = [statistics.fmean(v) for v in values]
        bars = ax.bar(np.arange(len(algos)) + (i - 1) * width, means, width,
                      yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values], capsize=3,
                      color=RULE_COLORS[rule], label=RULE_LABELS[rule])
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        top = max(top, *means)
    ax.set_xticks(range(len(algos)), algos)
    ax.set_ylabel("weights changed (%)  =  100 - update sparsity")
    ax.set_title("weights changed by algorithm (mean ± sd over seeds)")
    ax.set_ylim(0, top * 1.3 if top > 0 else 1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    made.append(_save(fig, out / "sparsity_by_algorithm.png"))
    relative = [o for o in overlaps if o["rule"] == "relative" and o["jaccard"] is not None]
    if relative:
        fig, ax = _subplots(figsize=(7, 4.2))
        labels = [f"{o['algo']} {o['seed_1']}-{o['seed_2']}" for o in relative]
        x = np.arange(len(relative))
        ax.bar(x - 0.2, [o["jaccard"] for o in relative], 0.4, label="Jaccard of the two seeds' subnetworks")
        ax.bar(x + 0.2, [o["jaccard_random"] for o in relative], 0.4, label="chance (independent, same densities)")
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylabel("Jaccard (relative rule)")
        ax.set_title("subnetwork overlap across seeds")
        ax.set_ylim(0, 1.2)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, ncol=2, loc="upper center")
        made.append(_save(fig, out / "overlap_vs_chance.png"))
    return made


# ---- experiment 1B (spatial patterns), 1C (rank vs model size), H2 and H3 ------------------------------------

def frequency_histogram(histogram: Sequence[int], path: Path) -> Path:
    """Weights by the share of transitions at which they changed; hot (right of the line) = more than half."""
    counts = np.asarray(histogram, dtype=np.float64)
    transitions = counts.size - 1
    fig, ax = _subplots(figsize=(6, 4))
    ax.bar(np.arange(counts.size) / transitions, counts / max(counts.sum(), 1), width=0.8 / transitions,
           color="#4c72b0")
    boundary = (transitions // 2 + 0.5) / transitions  # between the last count of at most half and the first above
    ax.axvline(boundary, color="black", linestyle="--", linewidth=1, label="hot (right): changed at more than half")
    ax.set_yscale("log")
    ax.set_xlabel(f"change frequency (share of {transitions} transitions)")
    ax.set_ylabel("fraction of weights")
    _legend_above(ax, "how often each weight changed between checkpoints")
    return _save(fig, path)


def frequency_maps(pictures: dict, matrices: list[dict], count: int, path: Path) -> Path | None:
    """Block-averaged change-frequency maps of the `count` matrices with the most hot weights (then the highest
    mean frequency), on one 0-1 colour scale."""
    ranked = sorted((m for m in matrices if m["name"] in pictures),
                    key=lambda m: (-m["hot_weights"], -m["mean_frequency"], m["name"]))[:count]
    if not ranked:
        return None
    cols = min(3, len(ranked))
    rows = -(-len(ranked) // cols)
    fig, axes = _subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, m in zip(axes.flat, ranked):
        picture = pictures[m["name"]].numpy()
        im = ax.imshow(picture, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{m['name']}\n{m['shape']}, {m['hot_weights']:,} hot", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(ranked):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, label="change frequency (block average)", shrink=0.8)
    fig.suptitle("where inside each matrix the changes fall")
    path = Path(path)
    atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=150, format="png"))
    return path


def head_share_heatmap(heads: list[dict], path: Path) -> Path | None:
    """Each attention head's share of its matrix's changes over its share of the weights (1 = uniform), log2."""
    rows = [h for h in heads if h["ratio_to_uniform"] is not None]
    if not rows:
        return None
    matrices = list(dict.fromkeys(h["name"] for h in rows))
    n_heads = max(h["head"] for h in rows) + 1
    grid = np.full((len(matrices), n_heads), np.nan)
    for h in rows:
        grid[matrices.index(h["name"]), h["head"]] = np.log2(max(h["ratio_to_uniform"], 1e-3))
    labels = [f"L{h['block']} {h['module']}" for h in (next(r for r in rows if r["name"] == m) for m in matrices)]
    fig, ax = _subplots(figsize=(max(6, 0.5 * n_heads + 4), max(3, 0.22 * len(matrices) + 1.5)))
    bound = max(1.0, float(np.nanmax(np.abs(grid))))
    im = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=-bound, vmax=bound, interpolation="nearest")
    ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)])
    ax.set_yticks(range(len(matrices)), labels, fontsize=6)
    ax.set_xlabel("head")
    ax.set_title("are some heads hot?", fontsize=10)
    fig.colorbar(im, ax=ax, label="log2(share of changes / share of weights)")
    return _save(fig, path)


def prediction_curves(rows: list[dict], path: Path) -> Path | None:
    """Precision and recall of each predictor of the next transition's changes, over transitions, with chance."""
    per_step = [r for r in rows if r["transition"] != "all"]
    if not per_step:
        return None
    fig, axes = _subplots(1, 2, figsize=(11, 4.2))
    colors = dict(zip(("previous", "ever", "hot_so_far", "grad_ema"), ("#4c72b0", "#dd8452", "#55a868", "#c44e52")))
    for predictor in dict.fromkeys(r["predictor"] for r in per_step):
        mine = [r for r in per_step if r["predictor"] == predictor]
        steps = [r["step"] for r in mine]
        for ax, key in zip(axes, ("precision", "recall")):
            ax.plot(steps, [np.nan if r[key] is None else r[key] for r in mine], marker="o", markersize=3,
                    color=colors.get(predictor), label=predictor)
            ax.plot(steps, [np.nan if r[f"chance_{key}"] is None else r[f"chance_{key}"] for r in mine],
                    linestyle=":", color=colors.get(predictor), label=f"{predictor}, chance")
    for ax, key in zip(axes, ("precision", "recall")):
        ax.set_xlabel("step (end of the predicted transition)")
        ax.set_ylabel(key)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        _integer_ticks(ax.xaxis)
    axes[0].set_title("precision: predicted weights that changed")
    axes[1].set_title("recall: changed weights that were predicted")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)


def rank_vs_size(rows: list[dict], path: Path) -> Path:
    """Mean update rank (% of full) against parameters, one line per rank definition, each point a model."""
    fig, ax = _axes("update rank vs model size", "parameters (text model)", "mean rank of Δ (% of full rank)")
    ordered = sorted(rows, key=lambda r: r["parameters"])
    x = [r["parameters"] for r in ordered]
    for definition, color in (("numerical", "#4c72b0"), ("energy99", "#dd8452"), ("plan", "#55a868")):
        ax.plot(x, [np.nan if r[f"{definition}_mean_percent"] is None else r[f"{definition}_mean_percent"]
                    for r in ordered], marker="o", color=color, label=definition)
    for r in ordered:
        ax.annotate(r["model"], (r["parameters"], r["numerical_mean_percent"] or 0), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_ylim(0, 105)
    return _save_with_legend(fig, ax, path)


def hypothesis_scatter(points: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
                       title: str, path: Path) -> Path:
    """One colour per run: each point a logged step (H2: changed fraction vs reward; H3: advantage vs sparsity)."""
    fig, ax = _axes(title, xlabel, ylabel)
    for label, (xs, ys) in points.items():
        ax.scatter(xs, ys, s=10, alpha=0.7, label=label)
    return _save_with_legend(fig, ax, path)


def _mean_by(rows: list[dict], key: tuple[str, ...], x: str, y: str) -> dict[tuple, tuple[list, list]]:
    """Rows grouped by `key`, y averaged over the rows sharing an x (seeds), sorted by x."""
    acc: dict[tuple, dict] = {}
    for r in rows:
        if r.get(y) is None or r.get(x) is None:
            continue
        acc.setdefault(tuple(r[k] for k in key), {}).setdefault(r[x], []).append(r[y])
    return {k: (sorted(v), [statistics.fmean(v[s]) for s in sorted(v)]) for k, v in acc.items()}


# one colour per algorithm in every figure of the real-model study, so GRPO reads the same in each
ALGO_COLOURS = {"grpo": "C0", "ppo": "C1", "dpo": "C2", "sft": "C3", "rft": "C4"}


def real_study_group_figures(curves: list[dict], layers: list[dict], out: Path) -> list[Path]:
    """One group of the real-model study: the density curves (share changed at the bf16 view against the
    update step, mean over seeds) and the per-block share changed against relative depth."""
    made = []
    fig, ax = _axes("Weights changed during training (bf16 view, mean over seeds)", "update step",
                    "changed, exact rule (%)")
    series = _mean_by(curves, ("algo", "lr", "precision"), "step", "exact")
    largest = {algo: max(lr for a, lr, _ in series if a == algo) for algo, _, _ in series}
    for (algo, lr, precision), (xs, ys) in sorted(series.items()):
        style = ":" if precision == "bf16" else ("-" if lr == largest[algo] else "--")  # dashed: the smaller lr
        ax.plot(xs, [100 * v for v in ys], label=f"{algo} lr {lr:g}" + (" (bf16)" if precision == "bf16" else ""),
                linestyle=style, color=ALGO_COLOURS.get(algo))
    _integer_ticks(ax.xaxis)
    fig.set_size_inches(9, 4.2)  # the legend beside the axes: the curves fill the plot's corners
    made.append(_save_with_legend(fig, ax, out / "density_curves.png", beside=True))
    fig, ax = _axes("Share changed per block (relative rule, usual lr, mean over seeds)", "relative depth",
                    "changed (%)")
    mixed = [r for r in layers if r.get("precision") != "bf16" and r.get("relative_depth") is not None]
    usual = {a: max(r["lr"] for r in mixed if r["algo"] == a) for a in {r["algo"] for r in mixed}}
    for (algo, lr), (xs, ys) in sorted(_mean_by(mixed, ("algo", "lr"), "relative_depth",
                                                "changed_relative").items()):
        if lr == usual[algo]:
            ax.plot(xs, [100 * v for v in ys], marker="o", markersize=3, label=f"{algo} lr {lr:g}",
                    color=ALGO_COLOURS.get(algo))
    fig.set_size_inches(9, 4.2)
    made.append(_save_with_legend(fig, ax, out / "layers_by_depth.png", beside=True))
    return made


def real_study_depth_profiles(profiles: dict[str, list[float]], path: Path) -> Path:
    """Each group's per-block share changed (one line per group and RL algorithm) on a common relative-depth
    axis, each profile divided by its mean so models that change different amounts compare by shape."""
    fig, ax = _axes("Where RL's changes sit, by relative depth", "relative depth (0 = first block)",
                    "share changed / its profile's mean")
    fig.set_size_inches(10, 4.6)
    models = sorted({name.split("__")[0] for name in profiles})  # a group is named model__task
    for name, profile in sorted(profiles.items()):
        if len(profile) < 2 or not sum(profile):
            continue
        mean = statistics.fmean(profile)
        xs = [i / (len(profile) - 1) for i in range(len(profile))]
        style = ("-", "--", ":", "-.")[models.index(name.split("__")[0]) % 4]  # one line style per model
        ax.plot(xs, [v / mean for v in profile], marker="o", markersize=3, linestyle=style, label=name)
    return _save_with_legend(fig, ax, path, beside=True)
