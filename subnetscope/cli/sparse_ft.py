"""main_sparse_ft.py: fine-tune a causal LM on a text task within a mask: the pruned model itself
(--method masked) or sparse LoRA adapters on PEFT (--method lora, --lora_mode sparse_to_dense or
sparse_to_sparse).

Settings come from the dataclass defaults, then --config YAML, then the flags given. Outputs in
--output_dir: config.json (model, task, method, sparsity, precision used), metrics.jsonl (train/val
loss, samples/s, elapsed seconds), checkpoint-N/ (--resume continues from the newest), final/ (the
merged model at --view_dtype: check it with validate_sparsity.py) and summary.json (validation loss,
sparsity, the task metric: accuracy for BoolQ and HellaSwag, exact match for GSM8K; wall_seconds,
peak_gpu_memory_gb, peak_cpu_rss_gb). Aggregate many runs with analyze_results.py, or run masks,
fine-tuning and analysis over a grid with run_sparse_sweep.py.
Without the Hub, pass --task and --eval_data as local json/jsonl files with the task's columns
(BoolQ: passage, question, answer; HellaSwag: ctx, endings, label; GSM8K: question, answer).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..config import PRECISIONS, VIEW_DTYPE_NAMES, RLConfig
from ..errors import SubnetscopeError, cli_main
from ..sparse_ft import METHODS, REPLACED, SparseFTConfig, SparseFTTrainer
from ..sparse_lora import LORA_MODES
from .dataclass_args import add_dataclass_flags, config_from_args, field_help
from .training import quiet_transformers

HELP = {
    **field_help(RLConfig, "resume", "wandb", "no_tqdm", "precision", "view_dtype"),
    "model": "model to fine-tune: a save_pretrained folder, a Hub id, or tiny-gpt2 / tiny-gemma3n",
    "tokenizer": "tokenizer for models without one (none: the model's own)",
    "task": "boolq, hellaswag, gsm8k or imdb (through datasets), or a local json/jsonl/csv/txt file: with "
            "BoolQ's, HellaSwag's or GSM8K's columns it is that task, else plain text such as "
            "../shared/data/imdb/train.jsonl.gz",
    "eval_data": "records the final model's task metric is computed on: a local json/jsonl/csv file with the task's "
                 "columns (none: a named task's validation split, test for gsm8k; a local task file's held-out "
                 "records; plain text has no task metric)",
    "eval_examples": "records scored for the task metric",
    "eval_max_new_tokens": "greedy tokens generated per GSM8K answer",
    "mask": "mask file from compute_masks.py (True = kept); none = dense",
    "method": "masked: train the weights themselves, pruned entries held at zero; lora: PEFT LoRA adapters",
    "lora_mode": "sparse_to_dense: dense adapters, mask applied at the merge; sparse_to_sparse: the adapter's "
                 "delta masked in the forward too, so the merged model is sparse at every step",
    "lora_rank": "LoRA rank r",
    "lora_alpha": "LoRA alpha; the delta is scaled by alpha / r",
    "lora_dropout": "dropout on the LoRA input",
    "seq_len": "tokens per training sequence",
    "batch_size": "sequences per step",
    "max_steps": "optimizer steps",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay (pruned entries stay zero either way)",
    "max_texts": "texts read from the task",
    "val_fraction": "share of the texts held out for validation",
    "log_every": "steps between records of loss and samples/s",
    "eval_every": "steps between validation losses",
    "eval_batches": "validation batches per evaluation",
    "save_every": "steps between checkpoints",
    "device": "auto, cpu or cuda",
    "seed": "seed of the batches and the adapters' initialisation",
    "output_dir": "the run folder",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, SparseFTConfig, HELP, choices={"method": METHODS, "lora_mode": LORA_MODES,
                                                          "precision": PRECISIONS, "view_dtype": VIEW_DTYPE_NAMES})
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
    quiet_transformers()
    args = build_parser().parse_args(argv)
    refuse_replaced(args)
    config = config_from_args(SparseFTConfig, args)
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
