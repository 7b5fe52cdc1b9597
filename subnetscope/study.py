"""The RL-sparsity study on a pretrained testbed: GRPO, PPO, SFT and DPO from one policy, several seeds.

Every run starts from the testbed policy at one --precision (auto: mixed on a CUDA GPU - fp32 master
weights, bf16 autocast, changes judged and checkpoints saved as bf16 roundings, as real recipes publish
them - and fp32 elsewhere), with the same learning rate and number of updates, prompts from the
testbed's held-out reviews and its classifier as the reward (SFT trains on real positive reviews, DPO
on reward-ranked pairs of the policy's samples). Measured per run: update sparsity under the three
rules, per-block localization, update rank (% of full) and the greedy evaluation reward before and
after; across seeds: subnetwork overlap o1/o2/Jaccard against chance; then GRPO seed 0 again:
confined to the subnetwork its full run changed (subnetwork-only fine-tuning), and the precision
split: under mixed precision, the weights changed at the bf16 view beside the fp32 master weights
that changed (the updates a bf16 checkpoint cannot show), and a pure-bf16 GRPO run, whose lost
sub-half-step updates make its sparsity bf16 stagnation rather than fine-tuning (the contrast).
Runs go through the run matrix, so a killed study resumes where it stopped.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from . import plots
from .changes import RULES, ChangeRules
from .checkpoint import find_step_checkpoints, open_checkpoint, read_ever_changed
from .config import STUDY_ALGOS, StudyConfig
from .engine import analyze_overlap
from .errors import SubnetscopeError
from .grpo import GRPOConfig, GRPOTrainer
from .logger import read_metrics
from .masks import MaskSet, model_fingerprint, save_masks
from .matrix import eval_reward, run_name, run_runs, run_view
from .report import write_csv, write_json
from .runstate import RUN_CONFIG, read_run_config
from .stats import mean_and_sd

MARKED_RATIO = 1.5  # the paper's "SFT far denser": at least this many times the weights RL changes
CLEAR_RATIO = 1.1  # below this the two are called the same


def base_settings(cfg: StudyConfig) -> dict:
    tb = Path(cfg.testbed)
    return {"policy": str(tb / "policy"), "reward": "model", "reward_model": str(tb / "reward"),
            "dataset": str(tb / "heldout.jsonl"), "precision": cfg.precision, "view_dtype": cfg.view_dtype,
            "lr": cfg.lr, "max_steps": cfg.max_steps, "save_every": cfg.max_steps, "batch_size": cfg.batch_size,
            "max_prompt_tokens": cfg.max_prompt_tokens, "max_new_tokens": cfg.max_new_tokens, "device": cfg.device}


def study_matrix(cfg: StudyConfig) -> dict:
    rl = {"eval_every": cfg.max_steps, "no_tqdm": True}
    ppo = {**rl, "mini_batch_size": math.gcd(cfg.batch_size, 8)}  # PPO's minibatches must divide the batch
    return {"base": base_settings(cfg), "grid": {"task": [STUDY_ALGOS[a] for a in cfg.algos], "seed": cfg.seeds},
            "per_task": {"rl-grpo": rl, "rl-ppo": ppo, "sft": {"sft_data": "positive_reviews"}}}


def _final_checkpoint(folder: Path) -> Path:
    return find_step_checkpoints(str(folder))[-1].path


def run_row(algo: str, seed: int, measured: dict, reward_before: float) -> dict:
    """One run's line of results.csv, from what the run matrix measured (its done.json)."""
    return {"algo": algo, "seed": seed, **{f"changed_{r}": measured[f"changed_{r}"] for r in RULES},
            **{f"sparsity_{r}": 1 - measured[f"changed_{r}"] for r in RULES},
            "gini": measured["gini_relative"], "entropy": measured.get("entropy_relative"),
            "top3": measured.get("top3_relative"), "rank_percent_mean": measured.get("rank_percent_mean"),
            "rank_percent_min": measured.get("rank_percent_min"), "reward_before": reward_before,
            "reward_after": measured["eval_reward"], "view_dtype": measured.get("view_dtype_used")}


def overlap_rows(algo: str, folders: dict[int, Path], device: str, view_dtype: str | None = None) -> list[dict]:
    """Overlap of every seed pair's subnetworks, judged at the view the runs recorded."""
    rows = []
    for (s1, f1), (s2, f2) in itertools.combinations(sorted(folders.items()), 2):
        result = analyze_overlap(open_checkpoint(str(f1 / "base")), open_checkpoint(str(_final_checkpoint(f1))),
                                 open_checkpoint(str(_final_checkpoint(f2))), ChangeRules(), device=device,
                                 progress=False, view_dtype=run_view(f1, {"view_dtype": view_dtype}))
        for rule in RULES:
            rows.append({"algo": algo, "seed_1": s1, "seed_2": s2, "rule": rule, **result.global_[rule]})
    return rows


def subnetwork_run(cfg: StudyConfig, full_run: Path, out: Path) -> dict:
    """GRPO again, confined to the weights the full run ever changed; its comparison with the full run."""
    step, masks = read_ever_changed(full_run)
    config = read_run_config(full_run)
    mask_path = save_masks(out / "mask_ever_changed.safetensors", MaskSet(
        masks, {"method": "ever_changed", "source_run": str(full_run.resolve()), "step": step},
        model_fingerprint(config["parameters"])))
    folder = out / "subnetwork_grpo"
    settings = {**base_settings(cfg), "seed": cfg.seeds[0], "eval_every": cfg.max_steps, "no_tqdm": True}
    if not (folder / "subnetwork_comparison.json").is_file():
        GRPOTrainer(GRPOConfig(**settings, update_mask=str(mask_path), output_dir=str(folder),
                               resume=folder.exists())).train()
    return json.loads((folder / "subnetwork_comparison.json").read_text())


SPLIT_VIEW = "bfloat16"


def final_changed(folder: Path, prefix: str) -> dict[str, float]:
    """The run's last tracked fraction changed per rule: `changed` at its view, `changed_master` of its
    fp32 master weights (mixed precision only)."""
    records = [r for r in read_metrics(folder / "metrics.jsonl") if f"{prefix}/exact" in r]
    if not records:
        raise SubnetscopeError(f"{folder}/metrics.jsonl has no {prefix}/ metrics: delete {folder} and run the study "
                               "again")
    return {rule: records[-1][f"{prefix}/{rule}"] for rule in RULES}


def _judged_mixed_at_bf16(folder: Path) -> bool:
    """Whether a run kept fp32 masters and judged them at bf16 (then its metrics hold both views)."""
    if not (folder / RUN_CONFIG).is_file():
        return False
    settings = read_run_config(folder)["settings"]
    return settings.get("precision_used") == "mixed" and settings.get("view_dtype_used") == SPLIT_VIEW


def _grpo_at(cfg: StudyConfig, folder: Path, precision: str, log=print) -> Path:
    """GRPO seed 0 of the study at `precision`, judged at bf16; a finished one is kept."""
    settings = {**base_settings(cfg), "precision": precision, "view_dtype": SPLIT_VIEW, "seed": cfg.seeds[0],
                "eval_every": cfg.max_steps, "no_tqdm": True}
    if not (folder / "final").is_dir():
        log(f"precision split: GRPO with --precision {precision} in {folder}")
        GRPOTrainer(GRPOConfig(**settings, output_dir=str(folder), resume=folder.exists())).train()
    return folder


def precision_split(cfg: StudyConfig, main_grpo: Path, out: Path, log=print) -> dict:
    """GRPO under mixed precision (the main run when it was one): weights changed at the bf16 view beside
    the fp32 master weights that changed; and GRPO with pure bf16 weights, the stagnation contrast."""
    mixed = main_grpo if _judged_mixed_at_bf16(main_grpo) else _grpo_at(cfg, out / "precision_grpo_mixed", "mixed", log)
    bf16 = _grpo_at(cfg, out / "precision_grpo_bf16", "bf16", log)
    view, master = final_changed(mixed, "changed"), final_changed(mixed, "changed_master")
    return {"seed": cfg.seeds[0], "view_dtype": SPLIT_VIEW, "mixed_run": str(mixed), "bf16_run": str(bf16),
            "mixed_bf16_view": view, "mixed_fp32_master": master, "pure_bf16": final_changed(bf16, "changed"),
            "master_updates_hidden_at_bf16": (master["exact"] - view["exact"]) / master["exact"]
            if master["exact"] else None}


def _mean(values: list) -> float | None:
    return mean_and_sd(values)[0]


def claims(rows: list[dict], overlaps: list[dict]) -> list[str]:
    """The paper's qualitative claims, each stated as holding or not for these runs."""
    lines = []
    by_algo = {a: [r for r in rows if r["algo"] == a] for a in dict.fromkeys(r["algo"] for r in rows)}
    # the paper counts DPO as RL
    rl = [r["changed_relative"] for a in ("grpo", "ppo", "dpo") for r in by_algo.get(a, [])]
    sft = [r["changed_relative"] for r in by_algo.get("sft", [])]
    if rl and sft:
        ratio = _mean(sft) / _mean(rl) if _mean(rl) else float("inf")
        verdict = ("holds" if ratio >= MARKED_RATIO else "holds only marginally" if ratio >= CLEAR_RATIO
                   else "does not hold")
        lines.append(f"RL sparser than SFT: {verdict} (changed, relative rule: RL {_mean(rl):.2%} vs SFT "
                     f"{_mean(sft):.2%}, SFT/RL = {ratio:.2f}; 'holds' needs SFT to change at least "
                     f"{MARKED_RATIO}x as many weights, 'marginally' {CLEAR_RATIO}x)")
    relative = [o for o in overlaps if o["rule"] == "relative" and o["jaccard"] is not None]
    if relative:
        above = sum(o["jaccard"] > o["jaccard_random"] for o in relative)
        lines.append(f"Overlap above chance: {'holds' if above == len(relative) else 'does not hold'} "
                     f"({above} of {len(relative)} seed pairs have Jaccard above its random baseline)")
    ranks = [r["rank_percent_mean"] for r in rows if r["rank_percent_mean"] is not None]
    if ranks:
        lines.append(f"Near-full-rank updates: {'holds' if _mean(ranks) >= 90 else 'does not hold'} "
                     f"(mean update rank {_mean(ranks):.1f}% of full; min over runs {min(ranks):.1f}%)")
    return lines


def markdown_table(rows: list[dict], overlaps: list[dict], subnet: dict | None, precision: dict | None) -> str:
    views = sorted({str(r.get("view_dtype") or "each checkpoint's own dtype") for r in rows})
    lines = [f"Changes judged at {', '.join(views)} (the runs' view dtype).", "",
             "| algorithm | seeds | changed exact | changed atol | changed relative | Gini (blocks) | update rank % | "
             "reward before | reward after |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for algo in dict.fromkeys(r["algo"] for r in rows):
        rs = [r for r in rows if r["algo"] == algo]

        def cell(key: str, pct: bool = True) -> str:
            m, s = mean_and_sd([r[key] for r in rs])
            if m is None:
                return "n/a"
            return f"{m:.2%} ± {s:.2%}" if pct else f"{m:.3f} ± {s:.3f}"

        lines.append(f"| {algo} | {len(rs)} | {cell('changed_exact')} | {cell('changed_atol')} | "
                     f"{cell('changed_relative')} | {cell('gini', False)} | {cell('rank_percent_mean', False)} | "
                     f"{cell('reward_before', False)} | {cell('reward_after', False)} |")
    rel = [o for o in overlaps if o["rule"] == "relative"]
    if rel:
        lines += ["", "| algorithm | seed pair | o1 | o1 random | o2 | o2 random | Jaccard | Jaccard random |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {o['algo']} | {o['seed_1']}-{o['seed_2']} | {o['o1']:.3f} | {o['o1_random']:.3f} | "
                  f"{o['o2']:.3f} | {o['o2_random']:.3f} | {o['jaccard']:.3f} | {o['jaccard_random']:.3f} |"
                  for o in rel if o["o1"] is not None and o["o2"] is not None]
    if subnet:
        same = subnet["identical_fraction"]
        lines += ["", f"Subnetwork-only GRPO (seed {subnet.get('seed', 0)}): weights identical to the full run: exact "
                  f"{same['exact']:.2%}, atol {same['atol']:.2%}, relative {same['relative']:.2%}; final training "
                  f"reward {subnet['subnetwork_run']['reward']:.4f} vs full {subnet['full_run_final']['reward']:.4f}."]
    if precision:
        lines += ["", *precision_lines(precision)]
    lines += ["", *[f"- {c}" for c in claims(rows, overlaps)]]
    return "\n".join(lines) + "\n"


def precision_lines(split: dict) -> list[str]:
    """The precision split as a table and one sentence."""
    lines = [f"Precision split (GRPO seed {split['seed']}):", "",
             "| weights | changed exact | changed atol | changed relative |", "| --- | --- | --- | --- |"]
    for label, key in (("mixed precision, bf16 view (the published checkpoint)", "mixed_bf16_view"),
                       ("mixed precision, fp32 master weights", "mixed_fp32_master"),
                       ("pure bf16 weights (bf16 stagnation, the contrast)", "pure_bf16")):
        lines.append(f"| {label} | " + " | ".join(f"{split[key][r]:.2%}" for r in RULES) + " |")
    hidden = split["master_updates_hidden_at_bf16"]
    if hidden is not None:
        lines += ["", f"{hidden:.1%} of the fp32 master weights that changed (exact) show no change once rounded to "
                      "bf16; pure bf16 weights lose every update below half a bf16 step instead of accumulating it."]
    return lines


def run_study(cfg: StudyConfig, log=print) -> Path:
    cfg.validate()
    out = Path(cfg.output_dir)
    run_runs(study_matrix(cfg), out, log, detail=True)
    device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    settings = {"reward": "model", "reward_model": str(Path(cfg.testbed) / "reward"),
                "max_new_tokens": cfg.max_new_tokens}
    reward_before = eval_reward(Path(cfg.testbed) / "policy", settings)
    rows, folders = [], {}
    for algo in cfg.algos:
        for seed in cfg.seeds:
            folder = out / "runs" / run_name(STUDY_ALGOS[algo], {"seed": seed})
            if not (folder / "done.json").is_file():
                raise SubnetscopeError(f"{folder.name} failed (see {folder}.error.txt); fix it and run the study again")
            rows.append(run_row(algo, seed, json.loads((folder / "done.json").read_text()), reward_before))
            folders.setdefault(algo, {})[seed] = folder
    overlaps = [row for algo, fs in folders.items() for row in overlap_rows(algo, fs, device, cfg.view_dtype)]
    subnet = precision = None
    if cfg.subnetwork and "grpo" in folders:
        subnet = {**subnetwork_run(cfg, folders["grpo"][cfg.seeds[0]], out), "seed": cfg.seeds[0]}
        write_json(out / "subnetwork.json", subnet)
    if cfg.precision_split and "grpo" in folders:
        precision = precision_split(cfg, folders["grpo"][cfg.seeds[0]], out, log)
        write_json(out / "precision.json", precision)
    write_csv(out / "results.csv", rows)
    write_csv(out / "overlap.csv", overlaps)
    write_json(out / "study.json", {"config": asdict(cfg), "runs": rows, "overlap": overlaps, "subnetwork": subnet,
                                    "precision": precision, "claims": claims(rows, overlaps)})
    (out / "table.md").write_text(markdown_table(rows, overlaps, subnet, precision))
    plots.study_figures(rows, overlaps, out)
    return out
