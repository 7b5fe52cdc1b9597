"""main_sparse_ft.py: fine-tune a causal LM on a text task within a mask: the pruned model itself
(--method masked) or sparse LoRA adapters on PEFT (--method lora, --lora_mode sparse_to_dense or
sparse_to_sparse).

Settings come from the dataclass defaults, then --config YAML, then the flags given. Outputs in
--output_dir: config.json (model, task, method, sparsity, precision used), metrics.jsonl (train/val
loss, samples/s, elapsed seconds), checkpoint-N/ (--resume continues from the newest), final/ (the
merged model at --view_dtype: check it with check_mask.py) and summary.json (validation loss,
sparsity, the task metric: accuracy for BoolQ and HellaSwag, exact match for GSM8K; wall_seconds,
peak_gpu_memory_gb, peak_cpu_rss_gb). Aggregate many runs with prune_report.py, or run masks,
fine-tuning and analysis over a grid with run_sparse_sweep.py.
Without the Hub, pass --task and --eval_data as local json/jsonl files with the task's columns
(BoolQ: passage, question, answer; HellaSwag: ctx, endings, label; GSM8K: question, answer).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..config import SparseFTConfig
from ..errors import ArgumentParser, SubnetscopeError, cli_main
from .dataclass_args import add_dataclass_flags, config_from_args
from .training import quiet_transformers

REPLACED = {"dtype": "--precision (auto, mixed, bf16 or fp32) and --view_dtype (the dtype final/ is published in)"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, SparseFTConfig)
    for old in REPLACED:
        p.add_argument(f"--{old}", help=argparse.SUPPRESS)
    return p


def refuse_replaced(args: argparse.Namespace) -> None:
    """A flag or --config key this command no longer has, named with what replaced it."""
    given = sorted(k for k in REPLACED if getattr(args, k) is not None)
    config = getattr(args, "config", None)
    if config and not given and Path(config).is_file():
        try:
            data = yaml.safe_load(Path(config).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            data = None  # the config loader says what is wrong with the file
        given = sorted(set(REPLACED) & set(data)) if isinstance(data, dict) else []
    if given:
        raise SubnetscopeError(f"--{given[0]} was replaced by {REPLACED[given[0]]}")


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    refuse_replaced(args)
    config = config_from_args(SparseFTConfig, args)
    config.validate()  # before torch and transformers load: a refusal costs no import
    if config.mask and not Path(config.mask).is_file():
        raise SubnetscopeError(f"--mask {config.mask} does not exist: pass a mask file written by compute_masks.py")
    from ..sparse_ft import SparseFTTrainer

    quiet_transformers()
    trainer = SparseFTTrainer(config)
    info = trainer.describe()
    print(f"{config.method} fine-tuning of {info['trainable_parameters']:,} trainable parameters, mask sparsity "
          f"{info['sparsity']:.2%}, {config.max_steps} steps")
    result = trainer.train()
    task = (f", {result['task_metric']} {result['task_score']:.4f} on {result['eval_examples']} records"
            if result.get("task_metric") else "")
    print(f"done: validation loss {result['val_loss']:.4f}{task}, masked weights' sparsity "
          f"{result['final_sparsity']:.4f}, {result['wall_seconds']:.1f} s; run in {config.output_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
