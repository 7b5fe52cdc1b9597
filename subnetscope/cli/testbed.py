"""testbed.py: build the pretrained testbed (policy + reward classifier from IMDB), or run the
RL-sparsity study on it.

  python testbed.py build [--tiny] [--config FILE.yaml] [--output_dir checkpoints/testbed] [--data imdb | FILE]
  python testbed.py study --testbed checkpoints/testbed [--config FILE.yaml] [--algos grpo ppo sft dpo]
                          [--seeds 0 1 2] [--precision auto]

Settings come from the dataclass defaults, then the preset (--tiny), then the YAML --config, then the flags
given; every config key is also a flag. build writes policy/ and reward/ (save_pretrained, each with
testbed_card.json: data, steps, seed, held-out perplexity or accuracy beside VADER's) and heldout.jsonl.
study writes, in --output_dir, results.csv (per run: sparsity under the three rules, localization, update
rank, reward before and after), overlap.csv (seed pairs: o1, o2, Jaccard and their chance levels),
subnetwork.json, precision.json (GRPO under mixed precision: changed at the bf16 view and of the fp32
master weights; GRPO with pure bf16 weights as the bf16-stagnation contrast), table.md and
sparsity_by_algorithm.png / overlap_vs_chance.png; the runs themselves in runs/ (a killed study resumes).
"""
from __future__ import annotations

import argparse

from ..config import StudyConfig, TestbedConfig
from ..errors import ArgumentParser, cli_main
from .dataclass_args import Preset, add_dataclass_flags, config_from_args
from .training import quiet_transformers

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, lm_steps=40, lm_batch_size=8, clf_steps=30,
            clf_batch_size=8, max_reviews=600, heldout_reviews=100)
PRESETS = {"tiny": Preset("a few minutes on 2 CPU cores, for tests: " + ", ".join(f"{k} {v}" for k, v in TINY.items()),
                          TINY)}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="pretrain the policy and train the reward classifier")
    add_dataclass_flags(build, TestbedConfig, presets=PRESETS)
    study = sub.add_parser("study", help="GRPO / PPO / SFT / DPO on the testbed, sparsity, overlap, subnetwork, "
                                         "precision split")
    add_dataclass_flags(study, StudyConfig)
    return p


def run_build(config: TestbedConfig) -> None:
    config.validate()  # before torch and transformers load: a refusal costs no import
    from ..testbed import build_testbed

    quiet_transformers()
    cards = build_testbed(config)
    policy, reward = cards["policy"], cards["reward"]
    print(f"policy: {policy['parameters'] / 1e6:.1f}M parameters, held-out perplexity "
          f"{policy['metrics']['heldout_perplexity']:.1f} after {policy['steps']} steps ({policy['seconds']:.0f} s)")
    for sample in policy["samples"][:2]:
        print(f"  {sample['prompt']!r} -> {sample['greedy'].strip()[:100]!r}")
    print(f"reward model: held-out accuracy {reward['metrics']['heldout_accuracy']:.3f} (VADER on the same reviews "
          f"{reward['metrics']['vader_heldout_accuracy']:.3f}); testbed in {config.output_dir}/")


def run_study(config: StudyConfig) -> None:
    config.validate()  # a missing testbed is refused before torch loads
    from .. import study

    quiet_transformers()
    out = study.run_study(config)
    print((out / "table.md").read_text())
    print(f"study in {out}/")


def command_config(args: argparse.Namespace) -> TestbedConfig | StudyConfig:
    """The subcommand's settings: defaults < --tiny (build) < YAML --config < flags."""
    if args.command == "build":
        return config_from_args(TestbedConfig, args, PRESETS)
    return config_from_args(StudyConfig, args)


@cli_main
def main(argv: list[str] | None = None) -> int:
    config = command_config(build_parser().parse_args(argv))
    if isinstance(config, TestbedConfig):
        run_build(config)
    else:
        run_study(config)
    return 0
