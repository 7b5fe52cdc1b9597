"""main_ppo.py: PPO with a value head that records, while it trains, which weights change."""
from __future__ import annotations

import argparse

from ..config import PPOConfig
from ..errors import cli_main
from .training import config_from_args, new_parser, quiet_transformers, run

DESCRIPTION = """\
Fine-tune a causal LM with PPO (our own loop: TRL removed its PPOTrainer in 1.13): value head on
the final normalized hidden state, per-token KL penalty to the frozen reference (fixed, or adaptive
toward --target_kl), GAE, clipped policy and value losses, minibatch epochs. The tracker records
after every update which weights differ from θ0 under three rules. Defaults follow the original
experiment config (gpt2-medium, 32 prompts per update, 600 updates, checkpoints every 20,
localization logged, top-3 blocks; atol 1e-5 as everywhere here); flags override them, e.g.
--policy google/gemma-3n-E2B-it. Offline: --policy tiny-gpt2 / tiny-gemma3n, or --smoke.
The run folder is read by analyze_sparse_subnetwork.py and localization_analysis.py.
"""
PRESET_EXTRA = {"smoke": {"mini_batch_size": 2, "ppo_epochs": 1, "output_dir": "checkpoints/smoke-ppo"},
                "easy": {"mini_batch_size": 4}}


def build_parser() -> argparse.ArgumentParser:
    return new_parser(DESCRIPTION, PPOConfig, PRESET_EXTRA)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(PPOConfig, args, PRESET_EXTRA)  # checked before anything loads
    quiet_transformers()
    from ..ppo import PPOTrainer

    run(PPOTrainer, config)
    return 0
