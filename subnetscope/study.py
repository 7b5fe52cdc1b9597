"""The RL-sparsity study on a pretrained testbed: GRPO, PPO, SFT and DPO from one policy, several seeds.

Every run starts from the testbed policy with bf16 weights, the same learning rate and number of
updates, prompts from the testbed's held-out reviews and its classifier as the reward (SFT trains
on real positive reviews, DPO on reward-ranked pairs of the policy's samples). Measured per run:
update sparsity under the three rules, per-block localization, update rank (% of full) and the
greedy evaluation reward before and after; across seeds: subnetwork overlap o1/o2/Jaccard against
chance; then GRPO seed 0 twice more: confined to the subnetwork its full run changed
(subnetwork-only fine-tuning), and with float32 weights (how much of the bf16 sparsity is rounding).
Runs go through the run matrix, so a killed study resumes where it stopped.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import plots
from .changes import RULES, ChangeRules
from .checkpoint import find_step_checkpoints, open_checkpoint
from .engine import analyze_overlap
from .errors import SubnetscopeError
from .grpo import GRPOConfig, GRPOTrainer
from .masks import MaskSet, model_fingerprint, save_masks
from .matrix import _run_name, eval_reward, run_runs
from .report import write_csv, write_json
from .runstate import ever_changed_masks
from .stats import mean_and_sd

ALGOS = {"grpo": "rl-grpo", "ppo": "rl-ppo", "sft": "sft", "dpo": "dpo"}
MARKED_RATIO = 1.5  # the paper's "SFT far denser": at least this many times the weights RL changes
CLEAR_RATIO = 1.1  # below this the two are called the same


@dataclass
class StudyConfig:
    testbed: str = "checkpoints/testbed"
    algos: list[str] = field(default_factory=lambda: list(ALGOS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    max_steps: int = 40
    lr: float = 1e-5
    batch_size: int = 16
    max_prompt_tokens: int = 16
    max_new_tokens: int = 24
    device: str = "auto"
    output_dir: str = "checkpoints/study"
    subnetwork: bool = True
    precision: bool = True

    def validate(self) -> None:
        unknown = [a for a in self.algos if a not in ALGOS]
        if unknown:
            raise SubnetscopeError(f"--algos {' '.join(unknown)}: choose from {', '.join(ALGOS)}")
        for d in ("policy", "reward"):
            if not (Path(self.testbed) / d / "config.json").is_file():
                raise SubnetscopeError(f"{self.testbed}/{d} is missing: build the testbed first "
                                       f"(python testbed.py build --output_dir {self.testbed})")
        if self.max_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise SubnetscopeError("--max_steps and --batch_size must be at least 1 and --lr positive")


def base_settings(cfg: StudyConfig) -> dict:
    tb = Path(cfg.testbed)
    return {"policy": str(tb / "policy"), "reward": "model", "reward_model": str(tb / "reward"),
            "dataset": str(tb / "heldout.jsonl"), "dtype": "bfloat16", "lr": cfg.lr, "max_steps": cfg.max_steps,
            "save_every": cfg.max_steps, "batch_size": cfg.batch_size, "max_prompt_tokens": cfg.max_prompt_tokens,
            "max_new_tokens": cfg.max_new_tokens, "device": cfg.device}


def study_matrix(cfg: StudyConfig) -> dict:
    rl = {"eval_every": cfg.max_steps, "no_tqdm": True}
    ppo = {**rl, "mini_batch_size": math.gcd(cfg.batch_size, 8)}  # PPO's minibatches must divide the batch
    return {"base": base_settings(cfg), "grid": {"task": [ALGOS[a] for a in cfg.algos], "seed": cfg.seeds},
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
            "reward_after": measured["eval_reward"]}


def overlap_rows(algo: str, folders: dict[int, Path], device: str) -> list[dict]:
    rows = []
    for (s1, f1), (s2, f2) in itertools.combinations(sorted(folders.items()), 2):
        result = analyze_overlap(open_checkpoint(str(f1 / "base")), open_checkpoint(str(_final_checkpoint(f1))),
                                 open_checkpoint(str(_final_checkpoint(f2))), ChangeRules(), device=device, progress=False)
        for rule in RULES:
            rows.append({"algo": algo, "seed_1": s1, "seed_2": s2, "rule": rule, **result.global_[rule]})
    return rows


def subnetwork_run(cfg: StudyConfig, full_run: Path, out: Path) -> dict:
    """GRPO again, confined to the weights the full run ever changed; its comparison with the full run."""
    step, masks, config = ever_changed_masks(full_run)
    mask_path = save_masks(out / "mask_ever_changed.safetensors", MaskSet(
        masks, {"method": "ever_changed", "source_run": str(full_run.resolve()), "step": step},
        model_fingerprint(config["parameters"])))
    folder = out / "subnetwork_grpo"
    settings = {**base_settings(cfg), "seed": cfg.seeds[0], "eval_every": cfg.max_steps, "no_tqdm": True}
    if not (folder / "subnetwork_comparison.json").is_file():
        GRPOTrainer(GRPOConfig(**settings, update_mask=str(mask_path), output_dir=str(folder),
                               resume=folder.exists())).train()
    return json.loads((folder / "subnetwork_comparison.json").read_text())


@torch.no_grad()
def rounding_share(folder: Path) -> dict:
    """For a float32 run: weights changed in float32, and how many of those changes vanish once θ0 and
    θ_T are both rounded to bf16 (the share of bf16 'sparsity' that is rounding)."""
    base, final = open_checkpoint(str(folder / "base")), open_checkpoint(str(_final_checkpoint(folder)))
    total = changed32 = survive16 = 0
    for name in base.names():
        a, b = base.get(name).float(), final.get(name).float()
        c32 = a != b
        c16 = a.bfloat16() != b.bfloat16()
        total += a.numel()
        changed32 += int(c32.sum())
        survive16 += int((c32 & c16).sum())
    return {"weights": total, "changed_fp32": changed32 / total, "changed_after_bf16_rounding": survive16 / total,
            "vanish_in_bf16": (changed32 - survive16) / total,
            "share_of_fp32_updates_lost_to_rounding": (changed32 - survive16) / changed32 if changed32 else None}


def precision_run(cfg: StudyConfig, out: Path) -> dict:
    folder = out / "precision_grpo_fp32"
    settings = {**base_settings(cfg), "dtype": "float32", "seed": cfg.seeds[0], "eval_every": cfg.max_steps,
                "no_tqdm": True}
    if not (folder / "final").is_dir():
        GRPOTrainer(GRPOConfig(**settings, output_dir=str(folder), resume=folder.exists())).train()
    return rounding_share(folder)


def _mean(values: list) -> float | None:
    return mean_and_sd(values)[0]


def claims(rows: list[dict], overlaps: list[dict]) -> list[str]:
    """The paper's qualitative claims, each stated as holding or not for these runs."""
    lines = []
    by_algo = {a: [r for r in rows if r["algo"] == a] for a in dict.fromkeys(r["algo"] for r in rows)}
    rl = [r["changed_relative"] for a in ("grpo", "ppo", "dpo") for r in by_algo.get(a, [])]  # the paper counts DPO as RL
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
    lines = ["| algorithm | seeds | changed exact | changed atol | changed relative | Gini (blocks) | update rank % | "
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
        lines += ["", f"Precision split (GRPO, float32 weights): {precision['changed_fp32']:.2%} of weights changed in "
                  f"float32; {precision['changed_after_bf16_rounding']:.2%} still differ after rounding θ0 and θ_T to "
                  f"bf16, so {precision['vanish_in_bf16']:.2%} of all weights "
                  f"({precision['share_of_fp32_updates_lost_to_rounding']:.1%} of the float32 updates) vanish in bf16."]
    lines += ["", *[f"- {c}" for c in claims(rows, overlaps)]]
    return "\n".join(lines) + "\n"


def run_study(cfg: StudyConfig, log=print) -> Path:
    cfg.validate()
    out = Path(cfg.output_dir)
    run_runs(study_matrix(cfg), out, log, detail=True)
    device = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    settings = {"reward": "model", "reward_model": str(Path(cfg.testbed) / "reward"), "max_new_tokens": cfg.max_new_tokens}
    reward_before = eval_reward(Path(cfg.testbed) / "policy", settings)
    rows, folders = [], {}
    for algo in cfg.algos:
        for seed in cfg.seeds:
            folder = out / "runs" / _run_name(ALGOS[algo], {"seed": seed})
            if not (folder / "done.json").is_file():
                raise SubnetscopeError(f"{folder.name} failed (see {folder}.error.txt); fix it and run the study again")
            rows.append(run_row(algo, seed, json.loads((folder / "done.json").read_text()), reward_before))
            folders.setdefault(algo, {})[seed] = folder
    overlaps = [row for algo, fs in folders.items() for row in overlap_rows(algo, fs, device)]
    subnet = precision = None
    if cfg.subnetwork and "grpo" in folders:
        subnet = {**subnetwork_run(cfg, folders["grpo"][cfg.seeds[0]], out), "seed": cfg.seeds[0]}
        write_json(out / "subnetwork.json", subnet)
    if cfg.precision and "grpo" in folders:
        precision = precision_run(cfg, out)
        write_json(out / "precision.json", precision)
    write_csv(out / "results.csv", rows)
    write_csv(out / "overlap.csv", overlaps)
    write_json(out / "study.json", {"config": asdict(cfg), "runs": rows, "overlap": overlaps, "subnetwork": subnet,
                                    "precision": precision, "claims": claims(rows, overlaps)})
    (out / "table.md").write_text(markdown_table(rows, overlaps, subnet, precision))
    plots.study_figures(rows, overlaps, out)
    return out
