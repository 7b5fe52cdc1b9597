"""Results on disk (summary.json and CSVs beside every plot) and the table on the terminal."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from .changes import RULES
from .checkpoint import atomic_write_file
from .engine import OverlapResult, PairResult, SeriesResult, iter_block_table
from .metrics import RANK_DEFINITIONS, RANK_TOLERANCE_DOC


def _clean(value):
    """JSON has no NaN or inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data) -> None:
    atomic_write_file(path, lambda tmp: tmp.write_text(json.dumps(_clean(data), indent=2)))


def write_csv(path: Path, rows: Iterable[dict]) -> None:
    rows = list(rows)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(_clean(r) for r in rows)

    atomic_write_file(path, write)


def tensor_rows(pair: PairResult) -> list[dict]:
    rows = []
    for t in pair.tensors:
        row = {
            "name": t.name, "block": "" if t.block is None else t.block, "module": t.module,
            "shape": "x".join(map(str, t.shape)), "dtype": t.dtype, "numel": t.numel,
        }
        for r in RULES:
            row[f"{r}_changed"] = t.changed[r]
            row[f"{r}_fraction"] = t.fraction(r)
        row.update({
            "abs_delta_max": t.abs_max, "abs_delta_mean": t.abs_mean, "abs_delta_std": t.abs_std,
            "abs_delta_sum": t.abs_sum, "relative_norm": t.relative_norm,
            "nonfinite_base": t.nonfinite_base, "nonfinite_tuned": t.nonfinite_tuned,
            "rank": t.rank, "full_rank": t.full_rank,
            "rank_percent": _percent(t.rank, t.full_rank),
            "rank_energy99": t.rank_energy99, "rank_energy99_percent": _percent(t.rank_energy99, t.full_rank),
            "rank_plan": t.rank_plan, "rank_plan_percent": _percent(t.rank_plan, t.full_rank),
            "tower": t.tower, "note": t.note,
        })
        rows.append(row)
    return rows


def module_rows(pair: PairResult) -> list[dict]:
    groups = pair.group("module")
    return [
        {"module": m, **g, **{f"{r}_fraction": g[r] / g["numel"] if g["numel"] else 0.0 for r in RULES}}
        for m, g in sorted(groups.items())
    ]


def _percent(part: int | None, whole: int | None) -> float | None:
    return 100 * part / whole if part is not None and whole else None


RANK_FIELDS = {"numerical": "rank", "energy99": "rank_energy99", "plan": "rank_plan"}


def rank_summary(pair: PairResult) -> dict | None:
    """Mean, min and max update rank in % of full rank over the 2-D updates: the numerical rank at the top
    level (as before), and each definition of RANK_DEFINITIONS under `definitions`."""
    ranked = [t for t in pair.tensors if t.rank is not None and t.full_rank]
    if not ranked:
        return None
    definitions = {}
    for label, attr in RANK_FIELDS.items():
        pct = [100 * getattr(t, attr) / t.full_rank for t in ranked if getattr(t, attr) is not None]
        definitions[label] = {"definition": RANK_DEFINITIONS[label], "mean_percent": sum(pct) / len(pct),
                              "min_percent": min(pct), "max_percent": max(pct)} if pct else None
    numerical = definitions["numerical"]
    return {
        "matrices": len(ranked), "mean_percent": numerical["mean_percent"],
        "min_percent": numerical["min_percent"], "max_percent": numerical["max_percent"],
        "tolerance": RANK_TOLERANCE_DOC, "definitions": definitions,
    }


def pair_summary(pair: PairResult, k: int) -> dict:
    return {
        "base": pair.base, "tuned": pair.tuned, "rules": asdict(pair.rules),
        "numel": pair.numel,
        "changed": {r: pair.changed(r) for r in RULES},
        "fraction_changed": {r: pair.fraction(r) for r in RULES},
        "fraction_unchanged": {r: 1 - pair.fraction(r) for r in RULES},
        "by_tower": pair.towers(),
        "nonfinite": {
            "base": sum(t.nonfinite_base for t in pair.tensors),
            "tuned": sum(t.nonfinite_tuned for t in pair.tensors),
        },
        "localization": pair.localization(k),
        "blocks": len(pair.blocks()),
        "update_rank": rank_summary(pair),
        "shells": pair.shells,
        "only_in_base": pair.only_in_base, "only_in_tuned": pair.only_in_tuned,
        "notes": pair.notes,
    }


def write_pair_outputs(pair: PairResult, out: Path, k: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = pair_summary(pair, k)
    write_csv(out / "per_tensor.csv", tensor_rows(pair))
    write_csv(out / "per_block.csv", iter_block_table(pair))
    write_csv(out / "per_module.csv", module_rows(pair))
    if pair.shells:
        write_csv(out / "shells.csv", pair.shells)
    return summary


def series_rows(series: SeriesResult) -> list[dict]:
    rows = []
    for i, step in enumerate(series.steps):
        row = {"step": step}
        for r in RULES:
            row[f"{r}_density"] = series.density[r][i]
            row[f"{r}_coverage"] = series.coverage[r][i]
            row[f"{r}_consecutive"] = series.consecutive[r][i]
        rows.append(row)
    return rows


def write_series_outputs(series: SeriesResult, out: Path, rule: str, top: int = 20) -> dict:
    write_csv(out / "series.csv", series_rows(series))
    write_csv(out / "hot_histogram.csv", (
        {"times_changed": i, **{r: series.hot_histogram[r][i] for r in RULES}}
        for i in range(len(series.steps) + 1)
    ))
    key = f"mean_times_changed_{rule}"
    ranked = sorted(series.hot_tensors, key=lambda row: row[key], reverse=True)
    write_csv(out / "hot_tensors.csv", ranked)
    return {
        "steps": series.steps, "density": series.density, "coverage": series.coverage,
        "consecutive": series.consecutive, "hot_histogram": series.hot_histogram,
        "hot_tensors_top": ranked[:top],
    }


def write_overlap_outputs(result: OverlapResult, out: Path) -> dict:
    write_csv(out / "overlap_per_tensor.csv", result.per_tensor)
    return result.global_


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def format_pair_table(pair: PairResult, rule: str, k: int) -> str:
    """A readable terminal table: global fractions, then per block and per module."""
    lines = [f"{pair.numel:,} weights compared ({len(pair.tensors)} tensors)"]
    lines.append("changed fraction   " + "   ".join(f"{r}: {pair.fraction(r):.4%}" for r in RULES))
    towers = pair.towers()
    if len(towers) > 1:  # a multimodal checkpoint: each tower on its own line, blocks and modules are text only
        for name, t in towers.items():
            lines.append(f"  {name + ' tower':<16} " + "   ".join(f"{r}: {t['fraction_changed'][r]:.4%}" for r in RULES)
                         + f"   ({t['numel']:,} weights)")
    loc = pair.localization(k)[rule]["count"]
    lines.append(f"localization ({rule}, counts across {len(pair.blocks())} blocks): "
                 + "  ".join(f"{key}={_fmt(v)}" for key, v in loc.items()))
    lines.append("")
    header = f"{'block':>8} {'weights':>12} " + " ".join(f"{r:>10}" for r in RULES)
    lines.append(header)
    for row in iter_block_table(pair):
        lines.append(f"{row['block']!s:>8} {row['numel']:>12,} "
                     + " ".join(f"{row[f'{r}_fraction']:>10.4%}" for r in RULES))
    lines.append("")
    lines.append(f"{'module':>20} {'weights':>12} " + " ".join(f"{r:>10}" for r in RULES))
    for row in module_rows(pair):
        lines.append(f"{row['module']:>20} {row['numel']:>12,} "
                     + " ".join(f"{row[f'{r}_fraction']:>10.4%}" for r in RULES))
    return "\n".join(lines)
