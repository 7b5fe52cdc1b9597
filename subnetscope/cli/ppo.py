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
    d = PPOConfig()
    p = new_parser(DESCRIPTION, d)
    algo = p.add_argument_group("PPO")
    algo.add_argument("--gamma", type=float, help=f"discount (default {d.gamma})")
    algo.add_argument("--lam", type=float, help=f"GAE lambda (default {d.lam})")
    algo.add_argument("--cliprange", type=float, help=f"policy ratio clipping (default {d.cliprange})")
    algo.add_argument("--cliprange_value", type=float, help=f"value clipping around the rollout's values (default {d.cliprange_value})")
    algo.add_argument("--vf_coef", type=float, help=f"weight of the value loss (default {d.vf_coef})")
    algo.add_argument("--init_kl_coef", type=float, help=f"KL penalty coefficient at the start (default {d.init_kl_coef})")
    algo.add_argument("--target_kl", type=float, help=f"adaptive KL controller's target (default {d.target_kl})")
    algo.add_argument("--fixed_kl", dest="target_kl", action="store_const", const=None,
                      help="keep the KL coefficient at --init_kl_coef")
    algo.add_argument("--horizon", type=int, help=f"adaptive controller's horizon in samples (default {d.horizon})")
    algo.add_argument("--ppo_epochs", type=int, help=f"passes over each rollout batch (default {d.ppo_epochs})")
    algo.add_argument("--mini_batch_size", type=int, help=f"prompts per optimizer step, per process (default {d.mini_batch_size})")
    algo.add_argument("--no_whiten", dest="whiten_advantages", action="store_false",
                      help="use raw GAE advantages instead of whitened ones")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    from ..ppo import PPOTrainer

    run(PPOTrainer, config_from_args(PPOConfig, args, PRESET_EXTRA))
    return 0
