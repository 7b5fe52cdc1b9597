"""The real-model study's table and figures, built from the small files of every group found in the
results folder (each group = one policy on one task, written by real_study.run_group, possibly in
another session): table.md states each of the paper's claims as holding or not, with our numbers
beside the paper's; the figures are PNGs with their data in the CSVs beside them."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .checkpoint import atomic_write_file
from .metrics import localization
from .stats import bootstrap_ci, concentration_statistics, mean_and_sd, more_concentrated_test

RL = ("grpo", "ppo", "dpo")
LOCALIZED = ("grpo", "dpo")  # the RL algorithms whose depth profiles are compared across models (DPO ran on all)
MARKED_RATIO = 1.5  # "far denser": at least this many times the weights changed
PAPER = {
    "rl_identical": "68.5–96.0% of weights bit-identical (GRPO 68.5, PPO 80.8, DPO 81.4–95.2)",
    "sft_identical": "SFT 6–15% identical",
    "rank": "99.2–99.8% of full rank",
    "jaccard": "Jaccard 0.55–0.60 for RL vs 0.37–0.47 for SFT; o1 60.5% vs 36.7% by chance",
    "subnetwork": "94.0% / 90.5% of weights identical to the full run (lr 1e-5)",
}


def read_csv(path: Path) -> list[dict]:
    """A CSV written by report.write_csv, numbers back as floats (empty cells as None)."""
    if not path.is_file():
        return []

    def value(text: str):
        if text == "":
            return None
        try:
            return float(text)
        except ValueError:
            return text

    with path.open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def groups(results_dir: Path) -> list[Path]:
    return sorted(p.parent for p in results_dir.glob("*/group.json"))


def _mean(values) -> float | None:
    return mean_and_sd([v for v in values if v is not None])[0]


def _cell(rows: list[dict], key: str, scale: float = 100.0, digits: int = 2) -> str:
    """Mean ± sd over the rows; n/a unless every row has the value (a mean of some seeds under the cell's count
    of seeds would misread)."""
    if not rows or any(r.get(key) is None for r in rows):
        return "n/a"
    m, s = mean_and_sd([r[key] for r in rows])
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}" if s is not None else f"{m * scale:.{digits}f}"


def blocks_share(layers: list[dict]) -> float | None:
    """The share of the model's weights in its transformer blocks, from one run's rows of layers.csv (the rest:
    token embeddings, final norm, any vision or audio tower, the block `outside`)."""
    first = [r for r in layers if r["run"] == layers[0]["run"]] if layers else []
    total = sum(r["numel"] for r in first)
    return sum(r["numel"] for r in first if r["block"] != "outside") / total if total else None


def identical_in_blocks(layers: list[dict]) -> dict[str, float]:
    """Each run's share of bit-identical weights in the transformer blocks. Why: the token embeddings change by
    their own pattern (on Gemma-3-270M, whose 262k-token embeddings hold 63% of the weights, RL changed 3-4% of
    them and 22-42% of the blocks), so there the whole-model share mostly measures the embeddings."""
    changed: dict[str, list[float]] = {}
    for r in layers:
        if r["block"] != "outside":
            acc = changed.setdefault(r["run"], [0.0, 0.0])
            acc[0] += r["changed_exact"] * r["numel"]
            acc[1] += r["numel"]
    return {run: 1 - c / n for run, (c, n) in changed.items() if n}


def main_table(rows: list[dict]) -> list[str]:
    """One line per algorithm, lr and precision (mean ± sd over its seeds)."""
    lines = ["| algorithm | lr | precision | seeds | identical (exact) % | identical in the blocks % | "
             "changed atol % | changed relative % | update rank % | held-out before | held-out after |",
             "| --- " * 11 + "|"]
    keys = sorted({(r["algo"], r["lr"], r["precision"]) for r in rows}, key=lambda k: (k[2] == "bf16", k[0], k[1]))
    for algo, lr, precision in keys:
        rs = [r for r in rows if (r["algo"], r["lr"], r["precision"]) == (algo, lr, precision)]
        identical = [{"v": 1 - r["changed_exact"]} for r in rs]
        lines.append(f"| {algo} | {lr:g} | {precision} | {len(rs)} | {_cell(identical, 'v')} | "
                     f"{_cell(rs, 'identical_in_blocks')} | "
                     f"{_cell(rs, 'changed_atol')} | {_cell(rs, 'changed_relative')} | "
                     f"{_cell(rs, 'rank_percent_mean', 1.0, 1)} | {rs[0]['heldout_before']:.3f} | "
                     f"{_cell(rs, 'heldout_after', 1.0, 3)} |")
    return lines


def _changed(rows: list[dict], algos, lr: float | None, rule: str = "exact") -> float | None:
    return _mean(r[f"changed_{rule}"] for r in rows if r["algo"] in algos and r["precision"] != "bf16"
                 and (lr is None or r["lr"] == lr))


def _usual(rows: list[dict], algo: str) -> float | None:
    """The lr an algorithm ran at besides the shared one (its usual lr), or the shared one if it is usual."""
    lrs = sorted({r["lr"] for r in rows if r["algo"] == algo and r["precision"] != "bf16"})
    return lrs[-1] if lrs else None


def _rl_usual(rows: list[dict]) -> list[dict]:
    """The RL runs at their usual lr and the main precision (the pure-bf16 contrast left out)."""
    return [r for r in rows if r["algo"] in RL and r["precision"] != "bf16" and r["lr"] == _usual(rows, r["algo"])]


def _denser(a: float | None, b: float | None) -> tuple[str, str]:
    """Verdict that a changed far more weights than b."""
    if a is None or b is None:
        return "not measured", ""
    ratio = a / b if b else float("inf")
    return ("holds" if ratio >= MARKED_RATIO else "does not hold"), f"ratio {ratio:.2f}"


def claims(rows: list[dict], overlaps: list[dict], group: dict) -> list[str]:
    """Each of the paper's claims, as holding or not on this group, our numbers beside the paper's."""
    out = []
    rl_rows = _rl_usual(rows)
    rl_usual = _mean(r["changed_exact"] for r in rl_rows)
    if rl_usual is not None:
        identical = 1 - rl_usual
        verdict = "holds" if 0.685 <= identical <= 0.96 else ("sparser than the paper" if identical > 0.96
                                                              else "does not hold (denser)")
        blocks = _mean(r.get("identical_in_blocks") for r in rl_rows)
        out.append(f"RL leaves most weights bit-identical: {verdict}: RL {identical:.1%} identical"
                   + (f", {blocks:.1%} in the transformer blocks" if blocks is not None else "")
                   + f" (paper: {PAPER['rl_identical']}).")
    sft_lr, shared = _usual(rows, "sft"), group["config"]["shared_lr"]
    sft_usual = _changed(rows, ("sft",), sft_lr)
    if sft_usual is not None and rl_usual is not None:
        verdict, ratio = _denser(sft_usual, rl_usual)
        out.append(f"SFT far denser than RL, each at its usual lr: {verdict} ({ratio}: SFT {1 - sft_usual:.1%} "
                   f"identical at lr {sft_lr:g}; paper: {PAPER['sft_identical']}).")
    rl_shared, sft_shared = _changed(rows, RL, shared), _changed(rows, ("sft",), shared)
    if rl_shared is not None and sft_shared is not None:
        verdict, ratio = _denser(sft_shared, rl_shared)
        out.append(f"SFT denser than RL at one shared lr ({shared:g}): {verdict} ({ratio}: changed exact SFT "
                   f"{sft_shared:.2%} vs RL {rl_shared:.2%}).")
    rft_shared = _changed(rows, ("rft",), shared)
    if rft_shared is not None and rl_shared is not None and sft_shared is not None:
        close = rft_shared / rl_shared < MARKED_RATIO if rl_shared else False
        verdict = "holds" if close and sft_shared / max(rft_shared, 1e-12) >= MARKED_RATIO else "does not hold"
        out.append(f"In-distribution data explains the sparsity (SFT on the policy's own reward-passing samples is "
                   f"as sparse as RL, SFT on reference data denser), at lr {shared:g}: {verdict} (changed exact: "
                   f"RFT {rft_shared:.2%}, RL {rl_shared:.2%}, SFT {sft_shared:.2%}).")
    # the pure-bf16 contrast is left out: its few stagnant changes are not the update the paper measured
    ranks = [r["rank_percent_mean"] for r in rows
             if r.get("rank_percent_mean") is not None and r["precision"] != "bf16"]
    if ranks:
        m = _mean(ranks)
        verdict = "holds" if m >= 99.0 else ("holds approximately" if m >= 90.0 else "does not hold")
        out.append(f"Updates nearly full rank: {verdict} (mean {m:.1f}% of full, min over runs {min(ranks):.1f}%; "
                   f"paper: {PAPER['rank']}).")
    rel = [o for o in overlaps if o["rule"] == "exact" and o.get("jaccard") is not None]
    if rel:
        rl_pairs = [o for o in rel if o["algo"] in RL]
        above = sum(o["jaccard"] > o["jaccard_random"] for o in rl_pairs)
        if rl_pairs:
            out.append(f"RL subnetworks of different seeds overlap above chance: "
                       f"{'holds' if above == len(rl_pairs) else 'does not hold'} ({above} of {len(rl_pairs)} RL "
                       f"seed pairs; Jaccard {_mean(o['jaccard'] for o in rl_pairs):.3f} vs chance "
                       f"{_mean(o['jaccard_random'] for o in rl_pairs):.3f}; o1 "
                       f"{_mean(o['o1'] for o in rl_pairs):.1%} vs {_mean(o['o1_random'] for o in rl_pairs):.1%}; "
                       f"paper: {PAPER['jaccard']}).")
        sft_pairs = [o for o in rel if o["algo"] == "sft"]
        if rl_pairs and sft_pairs:
            rl_j, sft_j = _mean(o["jaccard"] for o in rl_pairs), _mean(o["jaccard"] for o in sft_pairs)
            out.append(f"RL's seeds overlap more than SFT's: {'holds' if rl_j > sft_j else 'does not hold'} "
                       f"(Jaccard RL {rl_j:.3f}, SFT {sft_j:.3f}; paper: {PAPER['jaccard']}).")
    sub = group.get("subnetwork")
    if sub:
        same = sub["identical_fraction"]["exact"]
        out.append(f"Fine-tuning only the subnetwork reproduces the full run: "
                   f"{'holds' if same >= 0.9 else 'does not hold'}"
                   f" ({same:.1%} of weights identical to the full GRPO run at lr {sub['lr']:g}; held-out "
                   f"{sub['heldout_subnetwork']:.3f} vs full {sub['heldout_full']:.3f}; paper: {PAPER['subnetwork']}).")
    split = group.get("precision")
    if split:
        bf16 = split.get("pure_bf16")
        out.append(f"Precision: GRPO with fp32 weights ({split.get('precision', 'mixed')}) changed "
                   f"{split['mixed_bf16_view']['exact']:.2%} of weights at the bf16 view and "
                   f"{split['mixed_fp32_master']['exact']:.2%} of its fp32 weights"
                   + (f"; pure bf16 weights changed {bf16['exact']:.2%} (bf16 stagnation, the contrast)." if bf16
                      else "."))
    return out


def layer_profile(layers: list[dict], algo: str, rule: str = "relative") -> list[float]:
    """Mean over seeds of each block's share changed (blocks in depth order) for the mixed runs of `algo`
    at its usual lr."""
    by_block: dict[int, list[float]] = {}
    lrs = sorted({r["lr"] for r in layers if r["algo"] == algo})
    for r in layers:
        if r["algo"] == algo and r["precision"] != "bf16" and r["block"] != "outside" and r["lr"] == lrs[-1]:
            by_block.setdefault(int(r["block"]), []).append(r[f"changed_{rule}"])
    return [sum(v) / len(v) for _, v in sorted(by_block.items())]


def localization_rows(per_group: dict[str, list[dict]], algo: str = "grpo", k: int = 3) -> list[dict]:
    """Gini, entropy and top-k share of each group's per-block profile of `algo`, with bootstrap intervals."""
    rows = []
    stats = concentration_statistics(k)
    for name, layers in per_group.items():
        profile = layer_profile(layers, algo)
        if len(profile) < 2:
            continue
        row = {"group": name, "algo": algo, "blocks": len(profile), **localization(profile, k)}
        for stat_name, stat in stats.items():
            row[f"{stat_name}_low"], row[f"{stat_name}_high"] = bootstrap_ci(profile, stat)
        rows.append(row)
    return rows


def write_text(path: Path, text: str) -> None:
    atomic_write_file(path, lambda tmp: tmp.write_text(text))


def write_tables(results_dir: str | Path) -> Path:
    """table.md, localization.csv and the figures over every group in `results_dir`."""
    from . import plots
    from .report import write_csv

    results = Path(results_dir)
    lines = ["# The RL-sparsity study on real pretrained models", "",
             "Changes are judged at bf16 (the published precision) between θ0 and each run's final weights; "
             "training keeps fp32 master weights with bf16 autocast (`--precision mixed`) unless marked bf16. "
             "Real models are the GGUF releases dequantized to float32 (not the original bf16 weights). "
             "Each cell: mean ± sd over seeds; n/a where a run of the cell has no value. \"Identical in the blocks\" "
             "counts only the transformer blocks' weights: the rest (token embeddings, final norm) changes by its own "
             "pattern, and where the embeddings hold most of the weights (Gemma-3-270M's 262k tokens) the "
             "whole-model share mostly measures them.", ""]
    per_group_layers = {}
    for folder in groups(results):
        group = json.loads((folder / "group.json").read_text())
        rows, overlaps = read_csv(folder / "results.csv"), read_csv(folder / "overlap.csv")
        layers = per_group_layers[folder.name] = read_csv(folder / "layers.csv")
        cfg = group["config"]
        share = blocks_share(layers)
        lines += [f"## {Path(cfg['policy']).name} on {task_title(cfg)}", "",
                  f"{cfg['max_steps']} updates per run, batch {cfg['batch_size']}, seeds {cfg['seeds']}, device "
                  f"{group['device']}; command: `{group.get('command', 'python real_study.py run ...')}`."
                  + (f" The transformer blocks hold {share:.1%} of the weights." if share is not None else ""), ""]
        in_blocks = identical_in_blocks(layers)
        rows = [{**r, "identical_in_blocks": in_blocks.get(r["run"])} for r in rows]
        lines += main_table(rows) + [""] + [f"- {c}" for c in claims(rows, overlaps, group)]
        if group.get("missing_runs"):
            lines.append(f"- Runs missing (not run, or not finished; the note says why): "
                         f"{', '.join(group['missing_runs'])}.")
        if group.get("note"):
            lines.append(f"- Note: {group['note']}")
        lines.append("")
        plots.real_study_group_figures(read_csv(folder / "curves.csv"), layers, folder)
    measured = {folder.name for folder in groups(results)}
    for name, why in missing_groups(results).items():
        if name in measured:  # recorded as missing in an earlier session, measured since
            continue
        lines += [f"## {name}: not measured", "", why, ""]
    loc = [row for algo in LOCALIZED for row in localization_rows(per_group_layers, algo)]
    if loc:
        write_csv(results / "localization.csv", loc)
        lines += ["## Localization across models (per-block share changed, relative rule)", "",
                  "| algorithm | group | blocks | Gini [95% CI] | entropy [95% CI] | top-3 share [95% CI] |",
                  "| --- " * 6 + "|"]
        for r in loc:
            lines.append(f"| {r['algo']} | {r['group']} | {r['blocks']} | {_ci(r, 'gini')} | {_ci(r, 'entropy')} | "
                         f"{_ci(r, 'top3')} |")
        lines.append("")
        for algo, a, b in model_pairs(loc):
            test = more_concentrated_test(layer_profile(per_group_layers[a], algo),
                                          layer_profile(per_group_layers[b], algo))
            lines.append(f"- {algo}: permutation test that {a}'s profile is more concentrated than {b}'s: Gini "
                         f"difference {test['statistic']:.4f}, p = {test['p_value']:.3g}.")
        plots.real_study_depth_profiles({f"{r['group']} ({r['algo']})": layer_profile(
            per_group_layers[r["group"]], r["algo"]) for r in loc}, results / "localization_by_depth.png")
    write_text(results / "table.md", "\n".join(lines) + "\n")
    return results / "table.md"


def task_title(cfg: dict) -> str:
    """The task as a group's heading names it; arithmetic with its difficulty (groups of two can sit side by side)."""
    if cfg["task"] != "arithmetic":
        return cfg["task"]
    operands = cfg.get("max_operands", 3)  # groups written before the setting existed used 2-3 operands
    span = f", each 2 to {cfg['max_value']}" if "max_value" in cfg else ""
    return f"arithmetic ({'2' if operands == 2 else f'2-{operands}'} operands{span})"


def model_pairs(loc: list[dict]) -> list[tuple[str, str, str]]:
    """(algorithm, group a, group b) for two models on the same task, each pair once."""
    pairs = []
    for i, a in enumerate(loc):
        for b in loc[i + 1:]:
            (policy_a, task_a), (policy_b, task_b) = a["group"].split("__"), b["group"].split("__")
            if a["algo"] == b["algo"] and task_a == task_b and policy_a != policy_b:
                pairs.append((a["algo"], a["group"], b["group"]))
    return pairs


def _ci(row: dict, key: str) -> str:
    value, low, high = row.get(key), row.get(f"{key}_low"), row.get(f"{key}_high")
    if value is None:
        return "n/a"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{value:.3f}"


def missing_groups(results: Path) -> dict[str, str]:
    """Groups recorded as not run (missing.json beside the groups: name -> why)."""
    path = results / "missing.json"
    return json.loads(path.read_text()) if path.is_file() else {}

