"""Flags, presets and the run wrapper shared by main_grpo.py and main_ppo.py."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import RLConfig
from ..errors import ArgumentParser, SubnetscopeError
from ..launch import warn_launch_mismatch
from ..rewards import reward_from_flags
from . import dataclass_args
from .dataclass_args import Preset, add_dataclass_flags

if TYPE_CHECKING:  # torch and transformers load after the flags are parsed: --help stays fast
    from ..rl import RLTrainer, RunStart

PRESETS = {
    "smoke": Preset("CPU, tiny Gemma-3n (random weights), built-in prompts, VADER, 1 step, checkpoint, summary",
                    dict(device="cpu", policy="tiny-gemma3n", dataset="builtin", reward="vader", max_steps=1,
                         batch_size=2, max_new_tokens=8, save_every=1, eval_every=1)),
    "short": Preset("10 steps, checkpoints every 5", dict(max_steps=10, save_every=5, eval_every=5)),
    "easy": Preset("placeholder prompts and a toy reward (even token ids), no reward model",
                   dict(reward="easy", dataset="easy")),
}


def command_presets(preset_extra: dict | None) -> dict[str, Preset]:
    """The shared presets with a command's own values added (e.g. GRPO's smoke group size)."""
    extra = preset_extra or {}
    return {name: Preset(p.help, {**p.values, **extra.get(name, {})}) for name, p in PRESETS.items()}


def new_parser(description: str, config_cls: type[RLConfig],
               preset_extra: dict | None = None) -> argparse.ArgumentParser:
    """A trainer's parser: every field of `config_cls` as a flag, the presets, and TRL's batch size; flags
    not given stay absent (presets and --config can tell)."""
    p = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    add_dataclass_flags(p, config_cls, presets=command_presets(preset_extra))
    trl = p.add_argument_group("TRL's spellings (the same settings)")
    trl.add_argument("--per_device_train_batch_size", type=int, dest="trl_per_device_train_batch_size", metavar="N",
                     help="completions per process per optimizer step, as TRL counts them: --batch_size becomes "
                          "this x processes / completions per prompt")
    return p


def trl_settings(values: dict, config_cls: type[RLConfig], args: argparse.Namespace) -> dict:
    """--batch_size from TRL's --per_device_train_batch_size, when given (the other TRL spellings are
    aliases of their fields)."""
    if not hasattr(args, "trl_per_device_train_batch_size"):
        return {}
    return {"batch_size": trl_batch_size(args.trl_per_device_train_batch_size, config_cls, values,
                                         getattr(args, "batch_size", None))}


def trl_batch_size(per_device: int, config_cls: type[RLConfig], values: dict, ours: int | None) -> int:
    """--batch_size (prompts per step over all processes) from TRL's completions per process per step."""
    defaults = {f.name: f.default for f in fields(config_cls)}
    per_prompt = values.get("group_size", defaults.get("group_size", 1))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    completions = per_device * world
    if per_device < 1 or completions % per_prompt:
        raise SubnetscopeError(f"--per_device_train_batch_size {per_device} x {world} processes = {completions} "
                               f"completions is not a multiple of the {per_prompt} completions per prompt: "
                               f"pass a multiple of {per_prompt}")
    batch = completions // per_prompt
    if ours is not None and ours != batch:
        raise SubnetscopeError(f"--per_device_train_batch_size {per_device} means --batch_size {batch} here, "
                               f"not {ours}: give one of them")
    return batch


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def config_from_args(config_cls: type[RLConfig], args: argparse.Namespace,
                     preset_extra: dict | None = None) -> RLConfig:
    """Dataclass defaults < the presets named < YAML --config < flags; TRL's batch size converted, and a
    named --reward_model selects --reward model."""
    def derive(values: dict, given: dict) -> dict:
        return {**trl_settings(values, config_cls, args), **reward_from_flags(given)}

    return dataclass_args.config_from_args(config_cls, args, command_presets(preset_extra), derive)


def summary_line(metrics: dict, total: int, run_dir: str | Path, trainable: int | None = None) -> str:
    """One line: the last step's changed fractions under each rule, the weights that could change
    (when not all could: --update_mask), and its reward."""
    from ..changes import RULES

    changed = ", ".join(f"{rule} {metrics[f'changed/{rule}']:.2%}" for rule in RULES
                        if isinstance(metrics.get(f"changed/{rule}"), float))
    reward = metrics.get("reward/mean")
    reward_text = f"reward {reward:.3f}; " if isinstance(reward, float) else ""
    trainable_text = f" ({trainable:,} trainable)" if trainable is not None and trainable != total else ""
    return (f"step {metrics.get('step', '?')}: changed {changed or '(not logged)'} of {total:,} weights"
            f"{trainable_text}; {reward_text}run in {run_dir}")


def finished_line(start: RunStart, max_steps: int, metrics_file: str = "metrics.jsonl") -> str:
    """A --resume of a finished run: what it ended with, from its run_config.json and metrics.jsonl."""
    from ..rl import last_record

    total = sum(math.prod(shape) for shape in (start.saved or {}).get("parameters", {}).values())
    metrics = {"step": start.point.step, **last_record(start.run_dir / metrics_file, start.point.step)}
    trainable = (start.saved or {}).get("settings", {}).get("trainable_weights")
    return (f"{start.run_dir} is finished (step {start.point.step}, --max_steps {max_steps}); nothing to train, "
            f"raise --max_steps to continue it. {summary_line(metrics, total, start.run_dir, trainable)}")


def run(trainer_cls: type[RLTrainer], config: RLConfig) -> dict:
    """Train, turning CUDA running out of memory into a one-line error that names the remedies; a
    --resume of a finished run reports it and trains nothing. Returns the last step's metrics."""
    import torch

    from ..rl import check_run_start, last_record

    start = check_run_start(config, trainer_cls.name)
    warn_launch_mismatch(int(os.environ.get("WORLD_SIZE", "1")))
    if start.finished(config.max_steps):
        if os.environ.get("RANK", "0") == "0":
            print(finished_line(start, config.max_steps))
        return last_record(start.run_dir / "metrics.jsonl", start.point.step)
    try:
        trainer = trainer_cls(config)
        metrics = trainer.train()
    except torch.cuda.OutOfMemoryError:
        raise SubnetscopeError(
            "CUDA ran out of memory: try --optimizer adafactor, --gradient_checkpointing, --ref_device cpu, "
            "--reward_device cpu, or shorter --max_prompt_tokens / --max_new_tokens"
        ) from None
    if trainer.accelerator.is_main_process:
        total = sum(p.numel() for p in trainer.params.values())
        print(summary_line(metrics, total, trainer.run_dir, trainer.trainable_weights))
    return metrics
