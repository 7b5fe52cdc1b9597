"""main_sft.py: the SFT and DPO baselines (TRL's trainers) with the update tracker attached."""
from __future__ import annotations

import argparse

from ..config import BaselineConfig
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from ..rewards import reward_from_flags
from . import dataclass_args
from .dataclass_args import add_dataclass_flags
from .training import finished_line, quiet_transformers

DESCRIPTION = """\
Train the same policy on the same prompts as main_grpo.py / main_ppo.py, with TRL's SFTTrainer
(--task sft: on the best of --candidates samples of the initial policy under the reward) or
DPOTrainer (--task dpo: best vs worst of those samples), while the update tracker records which
weights change. The run folder (base/, checkpoint-N/, subnet_metrics.jsonl, final/) is read by
analyze_sparse_subnetwork.py --ckpt_dir and localization_analysis.py like an RL run. Settings come
from the dataclass defaults, then --config YAML, then the flags given.
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    add_dataclass_flags(p, BaselineConfig)
    return p


def config_from_args(args: argparse.Namespace) -> BaselineConfig:
    """Dataclass defaults < YAML --config < flags (a lone --reward_model selects --reward model)."""
    return dataclass_args.config_from_args(BaselineConfig, args, derive=lambda values, given: reward_from_flags(given))


@cli_main
def main(argv: list[str] | None = None) -> int:
    config = config_from_args(build_parser().parse_args(argv))  # checked before anything loads
    import torch

    from ..baselines import METRICS_FILE, baseline_start, train_baseline

    quiet_transformers()
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
