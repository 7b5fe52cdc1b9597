"""testbed.py: build the pretrained testbed (policy + reward classifier from IMDB), or run the
RL-sparsity study on it.

  python testbed.py build [--tiny] [--output_dir checkpoints/testbed] [--data imdb | FILE] [--device cuda]
  python testbed.py study --testbed checkpoints/testbed [--algos grpo ppo sft dpo] [--seeds 0 1 2] [--precision auto]

build writes policy/ and reward/ (save_pretrained, each with testbed_card.json: data, steps, seed,
held-out perplexity or accuracy beside VADER's) and heldout.jsonl. study writes, in --output_dir,
results.csv (per run: sparsity under the three rules, localization, update rank, reward before and
after), overlap.csv (seed pairs: o1, o2, Jaccard and their chance levels), subnetwork.json,
precision.json (GRPO under mixed precision: changed at the bf16 view and of the fp32 master weights;
GRPO with pure bf16 weights as the bf16-stagnation contrast), table.md and sparsity_by_algorithm.png /
overlap_vs_chance.png; the runs themselves in runs/ (a killed study resumes).
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from ..errors import cli_main
from ..precision import PRECISIONS, VIEW_DTYPES
from ..study import ALGOS, StudyConfig, run_study
from ..testbed import TINY, TestbedConfig, build_testbed
from .training import quiet_transformers

BUILD_HELP = {
    "data": "IMDB reviews with labels: imdb (through datasets) or a local file such as "
            "../shared/data/imdb/train.jsonl.gz",
    "tokenizer": "GPT-2 tokenizer: gpt2 from the Hub, offline ../shared/models/tiny-gpt2 (it has GPT-2's)",
    "n_layer": "policy transformer blocks", "n_head": "attention heads", "n_embd": "width",
    "block_size": "context length in tokens (pretraining windows, classifier inputs)",
    "lm_steps": "pretraining steps", "lm_batch_size": "windows per pretraining step",
    "lm_lr": "peak pretraining lr (cosine)",
    "clf_steps": "classifier training steps", "clf_batch_size": "reviews per classifier step",
    "clf_lr": "classifier lr",
    "max_reviews": "reviews read from the data", "heldout_reviews": "of those, held out for perplexity and accuracy",
    "device": "auto, cpu or cuda", "seed": "seed of the data order, initial weights and batches",
    "output_dir": "the testbed folder",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="pretrain the policy and train the reward classifier")
    d = TestbedConfig()
    for f in fields(TestbedConfig):
        b.add_argument(f"--{f.name}", type=type(getattr(d, f.name)), default=None,
                       help=f"{BUILD_HELP[f.name]} (default {getattr(d, f.name)}; --tiny: {TINY.get(f.name, 'same')})")
    b.add_argument("--tiny", action="store_true", help="a few minutes on 2 CPU cores, for tests")
    s = sub.add_parser("study", help="GRPO / PPO / SFT / DPO on the testbed, sparsity, overlap, subnetwork, "
                                     "precision split")
    sd = StudyConfig()
    s.add_argument("--testbed", default=sd.testbed, help=f"the built testbed (default {sd.testbed})")
    s.add_argument("--algos", nargs="+", choices=list(ALGOS), default=sd.algos, help="algorithms (default all four)")
    s.add_argument("--seeds", type=int, nargs="+", default=sd.seeds, help="seeds (default 0 1 2)")
    s.add_argument("--max_steps", type=int, default=sd.max_steps, help=f"updates of every run (default {sd.max_steps})")
    s.add_argument("--lr", type=float, default=sd.lr, help=f"learning rate of every run (default {sd.lr})")
    s.add_argument("--batch_size", type=int, default=sd.batch_size,
                   help=f"prompts per update (default {sd.batch_size})")
    s.add_argument("--max_prompt_tokens", type=int, default=sd.max_prompt_tokens, help="prompt length (review opening)")
    s.add_argument("--max_new_tokens", type=int, default=sd.max_new_tokens, help="completion length")
    s.add_argument("--device", default=sd.device, help="auto, cpu or cuda")
    s.add_argument("--precision", default=sd.precision, metavar="{" + ",".join(PRECISIONS) + "}",
                   help="how every main run keeps and computes its weights (default auto: mixed on a CUDA GPU - fp32 "
                        "masters, bf16 autocast, judged and saved as bf16 - and fp32 elsewhere)")
    s.add_argument("--view_dtype", metavar="{" + ",".join(VIEW_DTYPES) + "}",
                   help="dtype at which every main run's changes are judged (default: bfloat16 under mixed and bf16, "
                        "float32 under fp32)")
    s.add_argument("--output_dir", default=sd.output_dir, help=f"study folder (default {sd.output_dir})")
    s.add_argument("--no_subnetwork", dest="subnetwork", action="store_false",
                   help="skip the subnetwork-only GRPO rerun")
    s.add_argument("--no_precision_split", dest="precision_split", action="store_false",
                   help="skip the precision split (GRPO under mixed precision, unless the main runs were, and with "
                        "pure bf16 weights)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_transformers()
    if args.command == "build":
        values = {**(TINY if args.tiny else {}),
                  **{f.name: getattr(args, f.name) for f in fields(TestbedConfig) if getattr(args, f.name) is not None}}
        cards = build_testbed(TestbedConfig(**values))
        policy, reward = cards["policy"], cards["reward"]
        print(f"policy: {policy['parameters'] / 1e6:.1f}M parameters, held-out perplexity "
              f"{policy['metrics']['heldout_perplexity']:.1f} after {policy['steps']} steps "
              f"({policy['seconds']:.0f} s)")
        for sample in policy["samples"][:2]:
            print(f"  {sample['prompt']!r} -> {sample['greedy'].strip()[:100]!r}")
        print(f"reward model: held-out accuracy {reward['metrics']['heldout_accuracy']:.3f} (VADER on the same reviews "
              f"{reward['metrics']['vader_heldout_accuracy']:.3f}); testbed in "
              f"{values.get('output_dir', TestbedConfig.output_dir)}/")
        return 0
    config = StudyConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    out = run_study(config)
    print((out / "table.md").read_text())
    print(f"study in {out}/")
    return 0
