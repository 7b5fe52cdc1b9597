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

from ..config import PruneConfig
from ..errors import ArgumentParser, cli_main
from .dataclass_args import add_dataclass_flags, config_from_args
from .training import quiet_transformers


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, PruneConfig)
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    config = config_from_args(PruneConfig, build_parser().parse_args(argv))
    config.validate()  # before torch and transformers load: a refusal costs no import
    from ..prune_trainer import PruneTrainer

    quiet_transformers()
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
