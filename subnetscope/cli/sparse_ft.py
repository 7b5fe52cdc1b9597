"""main_sparse_ft.py: fine-tune a causal LM on a text task within a mask: the pruned model itself
(--method masked) or sparse LoRA adapters on PEFT (--method lora, --lora_mode sparse_to_dense or
sparse_to_sparse).

Settings come from the dataclass defaults, then --config YAML, then the flags given. Outputs in
--output_dir: config.json (model, task, method, sparsity), metrics.jsonl (train/val loss, samples/s),
checkpoint-N/ (--resume continues from the newest), final/ (the merged model: check it with
validate_sparsity.py) and summary.json. Aggregate many runs with analyze_results.py.
"""
from __future__ import annotations

import argparse

from ..errors import cli_main
from ..sparse_ft import METHODS, SparseFTConfig, SparseFTTrainer
from ..sparse_lora import LORA_MODES
from .dataclass_args import RUN_FLAGS_HELP, add_dataclass_flags, config_from_args
from .training import quiet_transformers

HELP = {
    **RUN_FLAGS_HELP,
    "model": "model to fine-tune: a save_pretrained folder, a Hub id, or tiny-gpt2 / tiny-gemma3n (default tiny-gpt2)",
    "tokenizer": "tokenizer for models without one (default: the model's own)",
    "task": "boolq, hellaswag, gsm8k or imdb (through datasets), or a local json/jsonl/csv/txt file such as "
            "../shared/data/imdb/train.jsonl.gz (default imdb)",
    "mask": "mask file from compute_masks.py (True = kept); none = dense",
    "method": "masked: train the weights themselves, pruned entries held at zero; lora: PEFT LoRA adapters (default masked)",
    "lora_mode": "sparse_to_dense: dense adapters, mask applied at the merge; sparse_to_sparse: the adapter's "
                 "delta masked in the forward too, so the merged model is sparse at every step (default sparse_to_dense)",
    "lora_rank": "LoRA rank r (default 8)",
    "lora_alpha": "LoRA alpha; the delta is scaled by alpha / r (default 16)",
    "lora_dropout": "dropout on the LoRA input (default 0)",
    "seq_len": "tokens per training sequence (default 128)",
    "batch_size": "sequences per step (default 8)",
    "max_steps": "optimizer steps (default 100)",
    "lr": "AdamW learning rate (default 1e-4)",
    "weight_decay": "AdamW weight decay (default 0; pruned entries stay zero either way)",
    "dtype": "weights' dtype: float32, bfloat16 or float16 (default float32; bf16 autocast on a GPU)",
    "max_texts": "texts read from the task (default 20000)",
    "val_fraction": "share of the texts held out for validation (default 0.05)",
    "log_every": "steps between records of loss and samples/s (default 10)",
    "eval_every": "steps between validation losses (default 50)",
    "eval_batches": "validation batches per evaluation (default 4)",
    "save_every": "steps between checkpoints (default 50)",
    "device": "auto, cpu or cuda (default auto)",
    "seed": "seed of the batches and the adapters' initialisation (default 0)",
    "output_dir": "the run folder (default checkpoints/sparse_ft)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, SparseFTConfig, HELP, choices={"method": METHODS, "lora_mode": LORA_MODES})
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    config = config_from_args(SparseFTConfig, build_parser().parse_args(argv))
    trainer = SparseFTTrainer(config)
    info = trainer.describe()
    print(f"{config.method} fine-tuning of {info['trainable_parameters']:,} trainable parameters, mask sparsity "
          f"{info['sparsity']:.2%}, {config.max_steps} steps")
    result = trainer.train()
    print(f"done: validation loss {result['val_loss']:.4f}, masked weights' sparsity {result['final_sparsity']:.4f}; "
          f"run in {config.output_dir}/")
    return 0
