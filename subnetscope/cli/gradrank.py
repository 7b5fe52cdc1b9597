"""gradient_rank.py: the spectrum of k per-batch gradients, RL (GRPO) against SFT, per matrix and global."""
from __future__ import annotations

import argparse

import torch

from .. import plots
from ..baselines import scored_samples, sft_records
from ..data import BUILTIN_PROMPTS, EASY_PROMPTS
from ..env import Env, build_env
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..gradrank import ENERGY, Spectrum, gradient_spectra
from ..grpo import GRPOConfig, first_pass_loss
from ..metrics import PLAN_RANK_RATIO
from ..outputs import check_output_dir
from ..precision import PRECISIONS
from ..report import write_csv, write_json
from ..rewards import REWARDS
from ..rl import per_token_logps
from .training import quiet_transformers

DESCRIPTION = f"""\
Measure how many directions k per-batch policy gradients span (experiment 1C): for the same
policy, k GRPO batches (fresh rollouts) and k SFT batches (best-of-candidates continuations),
then the singular values of each parameter matrix's k × numel gradient stack and of the whole
model's, from k × k Gram matrices on --device. Reports the numerical rank (σ > σ_max·k·eps), the
effective rank at {ENERGY:.0%} energy and the research plan's rank (σ > {PLAN_RANK_RATIO}·σ₁), as % of k:
gradient_rank.csv (per matrix), spectra.csv (global σ), summary.json and spectrum.png.
Memory: k copies of the 2-D parameters in float32.
The k SFT batches hold k × batch_size distinct prompts, none twice (repeated data would cap the
SFT rank by the data, not the task): the 40 built-in prompts allow k × batch_size <= 40; for the
default k 100 × batch 8 pass --dataset imdb or a file, e.g. ../shared/data/imdb/train.jsonl.gz.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", default="tiny-gpt2", help="Hub id, folder, or tiny-gpt2 / tiny-gemma3n")
    p.add_argument("--reward", default="vader", choices=REWARDS, help="reward of both tasks")
    p.add_argument("--reward_model", default="lvwerra/distilbert-imdb", help="classifier for --reward model")
    p.add_argument("--dataset", default="builtin",
                   help="prompts: builtin (40), easy (32), imdb, or a local file; SFT needs k x batch_size distinct "
                        "ones (default builtin)")
    p.add_argument("--k", type=int, default=100, help="gradients (batches) per task (default 100)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--group_size", type=int, default=4, help="GRPO completions per prompt (default 4)")
    p.add_argument("--max_new_tokens", type=int, default=32, help="completion length (default 32)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda: where gradients and Gram matrices live")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="as main_grpo.py: mixed = fp32 weights (and gradients), bf16 autocast forward passes; auto = "
                        "mixed on a CUDA GPU with bf16, else fp32 (default auto)")
    p.add_argument("--seed", type=int, default=0, help="(default 0)")
    p.add_argument("--output_dir", default="plots/gradient_rank", help="results folder")
    return p


def sft_loss_fn(env: Env, pairs: dict[str, list[str]], batch_size: int):
    """NLL of the reference continuations, batch i = pairs i·batch_size … (k × batch_size distinct pairs:
    no batch repeats another's), under the env's precision, as the RL loss is."""
    model, tokenizer, device = env.policy, env.tokenizer, env.device
    n = len(pairs["prompt"])

    def loss(i: int) -> torch.Tensor:
        idx = [(i * batch_size + j) % n for j in range(batch_size)]
        tokenizer.padding_side = "left"
        prompt = tokenizer([pairs["prompt"][j] for j in idx], return_tensors="pt", padding=True,
                           add_special_tokens=False)
        tokenizer.padding_side = "right"
        completion = tokenizer([pairs["completion"][j] for j in idx], return_tensors="pt", padding=True,
                               add_special_tokens=False)
        ids = torch.cat([prompt["input_ids"], completion["input_ids"]], 1).to(device)
        mask = torch.cat([prompt["attention_mask"], completion["attention_mask"]], 1).to(device)
        comp_mask = completion["attention_mask"].to(device).float()
        with env.precision.autocast(device):
            logps = per_token_logps(model, ids, mask, comp_mask.shape[1], 1.0)
        return -((logps * comp_mask).sum(1) / comp_mask.sum(1).clamp(min=1)).mean()

    return loss


def distinct_sft_prompts(prompts: list[str], dataset: str, k: int, batch_size: int) -> list[str]:
    """The first k × batch_size distinct prompts, one SFT batch of batch_size each, or a one-line refusal:
    batches that reuse prompts are linear combinations of fewer examples' gradients, so their rank would
    be capped by the data (40 built-in prompts gave at most 40 / batch_size)."""
    distinct = list(dict.fromkeys(prompts))
    needed = k * batch_size
    if len(distinct) < needed:
        raise SubnetscopeError(
            f"--dataset {dataset} has {len(distinct)} distinct training prompts: the SFT rank of --k {k} batches of "
            f"--batch_size {batch_size} needs {needed}, else it is capped by the data; pass --dataset imdb or a file "
            "with enough texts (e.g. ../shared/data/imdb/train.jsonl.gz), or lower --k / --batch_size")
    return distinct[:needed]


def task_summary(total: Spectrum, per_matrix: list[Spectrum]) -> dict:
    """The global ranks of one task's gradients and the mean per-matrix ranks, in % of k."""
    def mean_percent(rank: str) -> float:
        return sum(100 * getattr(s, rank) / s.k for s in per_matrix) / max(1, len(per_matrix))

    return {"global_numerical_rank": total.numerical_rank, "global_effective_rank": total.effective_rank,
            "global_plan_rank": total.plan_rank, "mean_matrix_effective_rank_percent": mean_percent("effective_rank"),
            "mean_matrix_plan_rank_percent": mean_percent("plan_rank")}


def run(args: argparse.Namespace) -> dict:
    if args.k < 2 or args.batch_size < 1:
        raise SubnetscopeError("--k must be at least 2 and --batch_size at least 1")
    out = check_output_dir(args.output_dir)
    built_in = {"builtin": BUILTIN_PROMPTS, "easy": EASY_PROMPTS}.get(args.dataset)
    if built_in is not None:  # refused before the model loads; a file's prompts are counted once loaded
        distinct_sft_prompts(list(built_in), args.dataset, args.k, args.batch_size)
    config = GRPOConfig(policy=args.policy, reward=args.reward, reward_model=args.reward_model, dataset=args.dataset,
                        batch_size=args.batch_size, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                        device=args.device, seed=args.seed, precision=args.precision)
    env = build_env(config)  # no trainer: no run folder, no θ0 written anywhere
    sft_prompts = distinct_sft_prompts(env.prompts, args.dataset, args.k, args.batch_size)
    results = {"rl": gradient_spectra(env.policy, lambda i: first_pass_loss(env, config, i + 1),
                                      args.k, env.device)}
    with env.precision.autocast(env.device):
        samples = scored_samples(env.policy, env.tokenizer, sft_prompts, env.reward_fn, 4, args.seed,
                                 args.max_new_tokens, 1.0)
    pairs = sft_records(sft_prompts, samples)
    if len(pairs["prompt"]) < len(sft_prompts):
        raise SubnetscopeError(f"{len(sft_prompts) - len(pairs['prompt'])} of the {len(sft_prompts)} SFT prompts "
                               "got no completion with a finite reward: check --reward, or lower --k")
    results["sft"] = gradient_spectra(env.policy, sft_loss_fn(env, pairs, args.batch_size), args.k, env.device)
    rows, spectra = [], []
    summary = {"k": args.k, "energy": ENERGY, "sft_distinct_prompts": len(sft_prompts), "tasks": {}}
    for task, (total, per_matrix) in results.items():
        for s in [total, *per_matrix]:
            rows.append({"task": task, "matrix": s.name, "k": s.k, "numerical_rank": s.numerical_rank,
                         "effective_rank": s.effective_rank, "effective_rank_percent": 100 * s.effective_rank / s.k,
                         "plan_rank": s.plan_rank, "plan_rank_percent": 100 * s.plan_rank / s.k})
        spectra += [{"task": task, "index": i, "sigma": v, "sigma_normalized": v / total.singular_values[0]}
                    for i, v in enumerate(total.singular_values)]
        summary["tasks"][task] = task_summary(total, per_matrix)
    write_csv(out / "gradient_rank.csv", rows)
    write_csv(out / "spectra.csv", spectra)
    write_json(out / "summary.json", summary)
    plots.gradient_spectrum(spectra, out / "spectrum.png")
    for task, s in summary["tasks"].items():
        print(f"{task}: global numerical rank {s['global_numerical_rank']}/{args.k}, effective ({ENERGY:.0%} energy) "
              f"{s['global_effective_rank']}/{args.k}, plan's (σ > {PLAN_RANK_RATIO}·σ₁) "
              f"{s['global_plan_rank']}/{args.k}; mean per-matrix effective rank "
              f"{s['mean_matrix_effective_rank_percent']:.1f}% of k")
    print(f"results in {out}/")
    return summary


@cli_main
def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    run(build_parser().parse_args(argv))
    return 0
