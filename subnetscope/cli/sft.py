"""main_sft.py: the SFT and DPO baselines (TRL's trainers) with the update tracker attached."""
from __future__ import annotations

import argparse
from dataclasses import fields

from ..config import (
    RANDOM_SHAPED,
    SFT_DATA,
    TINY_MODELS,
    TRL_OPTIMIZERS,
    BaselineConfig,
    add_precision_args,
)
from ..errors import SubnetscopeError, cli_main
from ..rewards import REWARDS, reward_from_flags
from .training import finished_line, quiet_transformers, reward_spec

DESCRIPTION = """\
Train the same policy on the same prompts as main_grpo.py / main_ppo.py, with TRL's SFTTrainer
(--task sft: on the best of --candidates samples of the initial policy under the reward) or
DPOTrainer (--task dpo: best vs worst of those samples), while the update tracker records which
weights change. The run folder (base/, checkpoint-N/, subnet_metrics.jsonl, final/) is read by
analyze_sparse_subnetwork.py --ckpt_dir and localization_analysis.py like an RL run.
"""


def build_parser() -> argparse.ArgumentParser:
    d = BaselineConfig()
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--task", choices=("sft", "dpo"), help=f"which baseline (default {d.task})")
    p.add_argument("--policy", help=f"Hub id, folder, {' / '.join(TINY_MODELS)} (random, offline), or "
                                    f"{' / '.join(RANDOM_SHAPED)} (random weights in real shapes) (default {d.policy})")
    p.add_argument("--tokenizer", help="tokenizer for policies without one (random-*; default gpt2)")
    p.add_argument("--reward", type=reward_spec, metavar="{" + ",".join(REWARDS) + ",module:function}",
                   help="ranks the samples: VADER lexicon, a classifier (--reward_model), the toy reward, exact "
                        "match of the final number, or a TRL-style reward callable f(completions, **kwargs) named "
                        f"module:function (a module or .py file) (default {d.reward})")
    p.add_argument("--reward_model", help=f"classifier for --reward model (default {d.reward_model})")
    p.add_argument("--dataset", help=f"prompts: builtin, easy, imdb, or a local file (default {d.dataset})")
    p.add_argument("--candidates", type=int, help=f"samples per prompt to rank (default {d.candidates})")
    p.add_argument("--max_prompts", type=int, help=f"prompts used to build the data set (default {d.max_prompts})")
    p.add_argument("--max_prompt_tokens", type=int, help=f"prompt length cut (default {d.max_prompt_tokens})")
    p.add_argument("--max_new_tokens", type=int, help=f"sample length (default {d.max_new_tokens})")
    p.add_argument("--temperature", type=float, help=f"sampling temperature (default {d.temperature})")
    p.add_argument("--no_chat_template", dest="chat_template", action="store_false",
                   help="give an instruct model the prompts as plain text; by default each becomes a user turn of "
                        "its tokenizer's chat template (the reward always sees the plain text, completions stay as "
                        "they are)")
    p.add_argument("--batch_size", type=int, help=f"examples per device per step (default {d.batch_size})")
    p.add_argument("--max_steps", type=int, help=f"optimizer steps (default {d.max_steps})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {d.lr})")
    p.add_argument("--optimizer", choices=tuple(TRL_OPTIMIZERS), help=f"(default {d.optimizer})")
    p.add_argument("--dpo_beta", type=float, help=f"DPO's beta (default {d.dpo_beta})")
    p.add_argument("--sft_data", choices=SFT_DATA,
                   help="SFT targets: the best of --candidates samples (samples), real positive reviews of a labelled "
                        "--dataset (positive_reviews: opening = prompt, what follows = completion), or the prompt/"
                        f"completion pairs of a local --dataset file (completions) (default {d.sft_data})")
    p.add_argument("--min_reward", type=float,
                   help="--sft_data samples: keep only prompts whose best sample scores at least this (rejection-"
                        "sampling fine-tuning); default: keep every prompt's best")
    add_precision_args(p, d.precision)
    p.add_argument("--device", help="auto, cpu or cuda (default auto)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--save_every", type=int, help=f"checkpoint-N every N steps (default {d.save_every})")
    p.add_argument("--save_total_limit", type=int,
                   help="keep only the newest N checkpoints (TRL's name; default: keep all)")
    p.add_argument("--output_dir", help=f"run folder (default {d.output_dir})")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint-N in --output_dir")
    p.add_argument("--allow_changed_settings", action="store_true",
                   help="with --resume: accept settings that differ from the run's; each change is recorded in "
                        "its run_config.json")
    p.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases")
    p.add_argument("--seed", type=int, help=f"(default {d.seed})")
    p.add_argument("--atol", type=float, help=f"tracker's absolute rule (default {d.atol})")
    p.add_argument("--eta", type=float, help=f"tracker's relative rule (default {d.eta})")
    p.add_argument("--topk", type=int, help=f"top-k block concentration (default {d.topk})")
    return p


def config_from_args(args: argparse.Namespace) -> BaselineConfig:
    """Dataclass defaults, then the flags given (a lone --reward_model selects --reward model)."""
    given = {f.name: getattr(args, f.name) for f in fields(BaselineConfig) if hasattr(args, f.name)}
    return BaselineConfig(**{**given, **reward_from_flags(given)})


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..baselines import METRICS_FILE, baseline_start, train_baseline

    quiet_transformers()
    config = config_from_args(args)
    start = baseline_start(config)
    if start.finished(config.max_steps):
        print(finished_line(start, config.max_steps, METRICS_FILE))
        return 0
    try:
        callback = train_baseline(config)
    except torch.cuda.OutOfMemoryError:
        raise SubnetscopeError("CUDA ran out of memory: try --optimizer adafactor, --gradient_checkpointing, "
                               "a smaller --batch_size or shorter --max_new_tokens") from None
    if callback.history:
        last = callback.tracker.metrics(callback.history[-1])
        print(f"{config.task} step {callback.history[-1].step}: changed exact {last['changed/exact']:.2%}, atol "
              f"{last['changed/atol']:.2%}, relative {last['changed/relative']:.2%}; run in {config.output_dir}")
    return 0
