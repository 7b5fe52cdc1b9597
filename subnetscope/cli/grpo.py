"""main_grpo.py: GRPO fine-tuning that records, while it trains, which weights change."""
from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

import torch
import transformers

from ..errors import SubnetscopeError, cli_main
from ..grpo import GRPOConfig, GRPOTrainer
from ..models import TINY_MODELS

DESCRIPTION = """\
Fine-tune a causal LM with GRPO (our own loop; TRL's loss_type="grpo") and track, after every
optimizer step, which weights differ from θ0 and from the previous step, under three rules (bits
differ; |Δ| > atol; |Δ| > eta·max|w|). Writes a run folder that analyze_sparse_subnetwork.py and
localization_analysis.py read: base/ (θ0), step_N/ checkpoints, metrics.jsonl, final/.

Presets (explicit flags win over them):
  --smoke  CPU, tiny Gemma-3n (random weights), built-in prompts, VADER, 1 step, checkpoint, summary
  --short  10 steps, checkpoints every 5; Gemma models get Adafactor and gradient checkpointing
  --easy   placeholder prompts and a toy reward (even token ids), no reward model
  --demo   the README's first command: short runs of tiny GPT-2 and tiny Gemma-3n, then the analysis
Policies: a Hub id, a local folder, or tiny-gpt2 / tiny-gemma3n (random weights, offline, word-level tokenizer).
Many GPUs: accelerate launch --num_processes N main_grpo.py ...; many CPU processes: torchrun --nproc_per_node N
"""

PRESETS = {
    "smoke": dict(device="cpu", policy="tiny-gemma3n", dataset="builtin", reward="vader", max_steps=1,
                  batch_size=2, group_size=2, max_new_tokens=8, save_every=1, eval_every=1,
                  output_dir="checkpoints/smoke"),
    "short": dict(max_steps=10, save_every=5, eval_every=5),
    "easy": dict(reward="easy", dataset="easy"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    d = GRPOConfig()
    model = p.add_argument_group("model and data")
    model.add_argument("--policy", help=f"policy to fine-tune: Hub id, folder, or {' / '.join(TINY_MODELS)} (default {d.policy})")
    model.add_argument("--reward", choices=("vader", "model", "easy"),
                       help=f"reward: VADER lexicon, a classifier (--reward_model), or the toy reward (default {d.reward})")
    model.add_argument("--reward_model", help=f"sequence classifier for --reward model; score = POSITIVE logit (default {d.reward_model})")
    model.add_argument("--dataset", help="prompts: builtin, easy, imdb (through datasets), or a .json/.jsonl/.csv/.txt[.gz] "
                                         f"file such as ../shared/data/imdb/train.jsonl.gz (default {d.dataset})")
    model.add_argument("--max_prompt_tokens", type=int, help=f"prompts are cut to this many tokens (default {d.max_prompt_tokens})")
    model.add_argument("--max_new_tokens", type=int, help=f"completion length (default {d.max_new_tokens})")
    model.add_argument("--temperature", type=float, help=f"sampling temperature (default {d.temperature})")
    algo = p.add_argument_group("GRPO")
    algo.add_argument("--batch_size", type=int, help=f"prompts per step, over all processes (default {d.batch_size})")
    algo.add_argument("--group_size", type=int, help=f"completions per prompt, at least 2 (default {d.group_size})")
    algo.add_argument("--max_steps", type=int, help=f"optimizer steps (default {d.max_steps})")
    algo.add_argument("--inner_epochs", type=int, help=f"optimizer steps per rollout batch (default {d.inner_epochs})")
    algo.add_argument("--beta", type=float, help=f"KL penalty weight, k3 estimator; 0 = no reference model (default {d.beta})")
    algo.add_argument("--epsilon", type=float, help=f"ratio clipping range (default {d.epsilon})")
    algo.add_argument("--no_kl_correction", dest="kl_correction", action="store_false",
                      help="plain k3 KL; by default it is weighted by the importance ratio, as TRL's use_bias_correction_kl")
    algo.add_argument("--adv_clip", type=float, help=f"advantages are clipped to ±this (default {d.adv_clip})")
    opt = p.add_argument_group("optimizer and precision")
    opt.add_argument("--optimizer", choices=("adamw", "adafactor", "sgd"), help=f"(default {d.optimizer})")
    opt.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    opt.add_argument("--weight_decay", type=float, help=f"(default {d.weight_decay})")
    opt.add_argument("--max_grad_norm", type=float, help=f"gradient clipping; 0 = off (default {d.max_grad_norm})")
    opt.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                     help="weights' dtype; auto = bfloat16 on a GPU and for Gemma models, else float32")
    opt.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    place = p.add_argument_group("devices")
    place.add_argument("--device", help="training device: auto (accelerate's choice), cpu, cuda")
    place.add_argument("--ref_device", help="reference model's device (auto = the training device); cpu saves GPU memory")
    place.add_argument("--reward_device", help="reward model's device (auto = the training device)")
    track = p.add_argument_group("tracking")
    track.add_argument("--atol", type=float, help=f"absolute rule |Δ| > atol (default {d.atol})")
    track.add_argument("--eta", type=float, help=f"relative rule |Δ| > eta·max(|w|,|w'|) (default {d.eta})")
    track.add_argument("--topk", type=int, help=f"k of the top-k block concentration (default {d.topk})")
    io = p.add_argument_group("checkpoints and logging")
    io.add_argument("--output_dir", help=f"run folder (default {d.output_dir})")
    io.add_argument("--save_every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    io.add_argument("--full_checkpoints", action="store_true", help="write full safetensors instead of compact ones")
    io.add_argument("--eval_every", type=int, help=f"held-out reward and KL every N steps (default {d.eval_every})")
    io.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last checkpoint")
    io.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (works with WANDB_MODE=offline)")
    io.add_argument("--no_tqdm", action="store_true", help="no progress bar (for logs)")
    io.add_argument("--seed", type=int, help=f"seed of initialisation, prompt order and sampling (default {d.seed})")
    pre = p.add_argument_group("presets")
    for name in ("smoke", "short", "easy", "demo"):
        pre.add_argument(f"--{name}", action="store_true", help=DESCRIPTION.split(f"--{name}")[1].split("\n")[0].strip())
    return p


def config_from_args(args: argparse.Namespace) -> GRPOConfig:
    values: dict = {}
    for preset in ("smoke", "short", "easy"):
        if getattr(args, preset, False):
            values.update(PRESETS[preset])
    explicit = {f.name: getattr(args, f.name) for f in fields(GRPOConfig) if hasattr(args, f.name)}
    values.update(explicit)
    if getattr(args, "short", False) and "gemma" in values.get("policy", GRPOConfig.policy).lower():
        if "optimizer" not in explicit:
            values["optimizer"] = "adafactor"
        if "gradient_checkpointing" not in explicit:
            values["gradient_checkpointing"] = True
    return GRPOConfig(**values)


def summary_line(trainer: GRPOTrainer, metrics: dict) -> str:
    total = sum(p.numel() for p in trainer.params.values())
    return (f"step {trainer.config.max_steps}: changed exact {metrics['changed/exact']:.2%}, atol "
            f"{metrics['changed/atol']:.2%}, relative {metrics['changed/relative']:.2%} of {total:,} weights; "
            f"reward {metrics['reward/mean']:.3f}; run in {trainer.run_dir}")


def run(config: GRPOConfig) -> tuple[GRPOTrainer, dict]:
    try:
        trainer = GRPOTrainer(config)
        metrics = trainer.train()
    except torch.cuda.OutOfMemoryError:
        raise SubnetscopeError(
            "CUDA ran out of memory: try --optimizer adafactor, --gradient_checkpointing, --ref_device cpu, "
            "--reward_device cpu, or shorter --max_prompt_tokens / --max_new_tokens"
        ) from None
    if trainer.accelerator.is_main_process:
        print(summary_line(trainer, metrics))
    return trainer, metrics


def run_demo(args: argparse.Namespace) -> None:
    """Short GRPO runs of tiny GPT-2 and tiny Gemma-3n, then both analyses, figures in plots/demo/."""
    from . import analyze, localize

    root = Path(getattr(args, "output_dir", "checkpoints/demo"))
    runs = {}
    for arch in ("gpt2", "gemma3n"):
        cfg = config_from_args(args)
        cfg.policy, cfg.device, cfg.output_dir = f"tiny-{arch}", "cpu", str(root / arch)
        if not hasattr(args, "max_steps"):
            cfg.max_steps, cfg.save_every, cfg.eval_every = 6, 2, 3
        if not hasattr(args, "lr"):
            cfg.lr = 1e-3
        cfg.resume = (root / arch / "run_config.json").exists()
        run(cfg)
        runs[arch] = cfg.output_dir
        analyze.main(["--ckpt_dir", cfg.output_dir, "--output_dir", f"plots/demo/{arch}", "--no_tqdm"])
    localize.main(["--ckpt_dirs", runs["gpt2"], runs["gemma3n"], "--labels", "tiny-gpt2", "tiny-gemma3n",
                   "--output_dir", "plots/demo/comparative", "--no_tqdm"])


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if getattr(args, "demo", False):
        run_demo(args)
        return 0
    run(config_from_args(args))
    return 0
