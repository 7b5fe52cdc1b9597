"""main_prune.py: train GPT-2 on a text file while magnitude-pruning it, and measure weight revival.

Three phases: warm-up (dense), gradual pruning (--prune_applications prunings up to
--target_sparsity, pruned weights free to revive in between) and finalization (after the last
pruning, the mask is held, so the final model has the target sparsity; --no-hold_final lets the
weights revive to the end, --hard_mask holds the mask from the first pruning on).
Settings come from the dataclass defaults, then the YAML --config, then the flags given; every
config key is also a flag. Outputs in --output_dir: metrics.jsonl (per-layer and per-matrix
sparsity, revival, dead neurons, effective rank, gradient norm on zeroed weights, trends,
train/val loss), config.json (with the pruning plan and the phases), checkpoint-N/ (resumable with
--resume) and final/ (a Hugging Face model folder).
"""
from __future__ import annotations

import argparse

from ..config import RLConfig
from ..errors import cli_main
from ..prune_trainer import PruneConfig, PruneTrainer
from .dataclass_args import add_dataclass_flags, config_from_args, field_help
from .training import quiet_transformers

HELP = {
    **field_help(RLConfig, "resume", "wandb", "no_tqdm"),
    "data": "plain text to train on (../shared/data/tinyshakespeare/input.txt beside the repository)",
    "tokenizer": "tokenizer Hub id or folder (offline ../shared/models/tiny-gpt2 has GPT-2's)",
    "n_layer": "transformer blocks",
    "n_head": "attention heads",
    "n_embd": "width",
    "block_size": "context length in tokens",
    "batch_size": "windows per step",
    "epochs": "passes over the training tokens; steps = epochs x (train tokens // (batch_size x block_size))",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "val_fraction": "share of the text, from its end, held out for validation",
    "target_sparsity": "sparsity of the linear weights at the last application and, with hold_final, of the final "
                       "model, in [0, 1)",
    "warmup_ratio": "share of the steps before the pruning window opens; the first pruning comes one interval later, "
                    "at step round(T x (warmup_ratio + (final_prune_ratio - warmup_ratio) / prune_applications)) of T "
                    "steps: with the defaults at 22%% of training (the run prints the steps)",
    "final_prune_ratio": "share of the steps at which the last pruning reaches the target; the finalization "
                         "phase follows",
    "prune_applications": "prunings, evenly spaced in the window, the last at its end",
    "ramp": "how the level rises: linear, or cubic (Zhu & Gupta)",
    "hard_mask": "keep pruned weights at zero after every step from the first pruning on, for contrast "
                 "(else free to revive between prunings)",
    "hold_final": "hold the mask through the finalization phase (after the last pruning), so the final model has "
                  "the target sparsity (--no-hold_final lets pruned weights revive to the end)",
    "log_every": "steps between metric records (application steps are always recorded)",
    "eval_every": "steps between validation losses",
    "eval_batches": "validation batches per evaluation",
    "save_every": "steps between checkpoints",
    "rank_metrics": "effective rank of every matrix at each record (one SVD each)",
    "device": "auto, cpu or cuda (bf16 autocast on a GPU)",
    "seed": "seed of the initial weights and of the batches",
    "output_dir": "the run folder",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, PruneConfig, HELP)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    config = config_from_args(PruneConfig, build_parser().parse_args(argv))
    trainer = PruneTrainer(config)
    phases = trainer.phases()
    held = phases["mask_held_from"]
    print(f"{trainer.total_steps} steps ({config.epochs} epochs x {trainer.batches_per_epoch} batches), "
          f"{trainer.model.num_parameters() / 1e6:.1f}M parameters, prunings at steps {sorted(trainer.plan)}; "
          f"mask held {'from step ' + str(held) if held else 'never'}")
    result = trainer.train()
    print(f"done: validation loss {result['val_loss']:.4f}, sparsity {result['sparsity/overall']:.4f}; "
          f"results in {config.output_dir}/")
    return 0
