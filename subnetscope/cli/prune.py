"""main_prune.py: train GPT-2 on a text file while magnitude-pruning it, and measure weight revival.

Settings come from the dataclass defaults, then the YAML --config, then the flags given; every
config key is also a flag. Outputs in --output_dir: metrics.jsonl (per-layer sparsity, revival,
dead neurons, effective rank, gradient norm on zeroed weights, trends, train/val loss),
checkpoint-N/ (resumable with --resume) and final/ (a Hugging Face model folder).
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from ..errors import SubnetscopeError, cli_main
from ..prune_trainer import PruneConfig, PruneTrainer
from .training import quiet_transformers

HELP = {
    "data": "plain text to train on (default ../shared/data/tinyshakespeare/input.txt beside the repository)",
    "tokenizer": "tokenizer Hub id or folder (default gpt2; offline ../shared/models/tiny-gpt2 has GPT-2's)",
    "n_layer": "transformer blocks (default 6)",
    "n_head": "attention heads (default 6)",
    "n_embd": "width (default 384)",
    "block_size": "context length in tokens (default 256)",
    "batch_size": "windows per step (default 32)",
    "epochs": "passes over the training tokens; steps = epochs x (train tokens // (batch_size x block_size))",
    "lr": "AdamW learning rate (default 6e-4)",
    "weight_decay": "AdamW weight decay (default 0.1)",
    "val_fraction": "share of the text, from its end, held out for validation (default 0.1)",
    "target_sparsity": "sparsity of the linear weights at the last application, in [0, 1) (default 0.5)",
    "warmup_ratio": "share of the steps before the first pruning (default 0.15)",
    "final_prune_ratio": "share of the steps at which the target is reached (default 0.85)",
    "prune_applications": "prunings, evenly spaced in the window (default 10)",
    "ramp": "how the level rises: linear, or cubic (Zhu & Gupta) (default linear)",
    "hard_mask": "keep pruned weights at zero after every step, for contrast (default: zeroed, free to revive)",
    "log_every": "steps between metric records (default 10; application steps are always recorded)",
    "eval_every": "steps between validation losses (default 50)",
    "eval_batches": "validation batches per evaluation (default 8)",
    "save_every": "steps between checkpoints (default 100)",
    "rank_metrics": "effective rank of every matrix at each record (one SVD each; default on)",
    "device": "auto, cpu or cuda (default auto; bf16 autocast on a GPU)",
    "seed": "seed of the initial weights and of the batches (default 0)",
    "output_dir": "the run folder (default checkpoints/prune)",
    "resume": "continue the run in --output_dir from its newest checkpoint",
    "wandb": "also log to this Weights & Biases project",
    "no_tqdm": "no progress bar",
}


def _field_type(name: str) -> type:
    kind = typing.get_type_hints(PruneConfig)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of settings (e.g. configs/prune_shakespeare.yaml); flags override it")
    for f in fields(PruneConfig):
        kind = _field_type(f.name)
        if kind is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None, help=HELP[f.name])
        else:
            p.add_argument(f"--{f.name}", type=kind, default=None, help=HELP[f.name])
    return p


def load_yaml_config(path: str) -> dict:
    """The YAML mapping, every key checked against PruneConfig and converted to its type."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SubnetscopeError(f"--config {path} does not exist")
    data = yaml.safe_load(file.read_text()) or {}
    if not isinstance(data, dict):
        raise SubnetscopeError(f"{path}: must be a mapping of setting: value")
    known = {f.name for f in fields(PruneConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SubnetscopeError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    values = {}
    for key, value in data.items():
        kind = _field_type(key)
        if value is None:
            values[key] = None
        elif kind is bool and not isinstance(value, bool):
            raise SubnetscopeError(f"{path}: {key}: {value!r} is not true or false")
        else:
            try:
                values[key] = kind(value)
            except (TypeError, ValueError):
                raise SubnetscopeError(f"{path}: {key}: {value!r} is not a {kind.__name__}") from None
    return values


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    values = load_yaml_config(args.config) if args.config else {}
    values.update({f.name: getattr(args, f.name) for f in fields(PruneConfig) if getattr(args, f.name) is not None})
    defaults = {f.name: f.default for f in fields(PruneConfig) if f.default is not MISSING}
    return PruneConfig(**{**defaults, **values})


@cli_main
def main(argv: list[str] | None = None) -> int:
    quiet_transformers()
    config = config_from_args(build_parser().parse_args(argv))
    trainer = PruneTrainer(config)
    print(f"{trainer.total_steps} steps ({config.epochs} epochs x {trainer.batches_per_epoch} batches), "
          f"{trainer.model.num_parameters() / 1e6:.1f}M parameters, prunings at steps {sorted(trainer.plan)}")
    result = trainer.train()
    print(f"done: validation loss {result['val_loss']:.4f}, sparsity {result['sparsity/overall']:.4f}; "
          f"results in {config.output_dir}/")
    return 0
