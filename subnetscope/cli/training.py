"""Flags, presets and the run wrapper shared by main_grpo.py and main_ppo.py."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import (
    ASPG_SPARSITY,
    ASPG_WARMUP,
    OPTIMIZERS,
    PLAN_UPDATE_FRACTION,
    PLAN_WARMUP,
    RANDOM_SHAPED,
    TINY_MODELS,
    RLConfig,
    add_precision_args,
)
from ..errors import SubnetscopeError
from ..launch import warn_launch_mismatch
from ..rewards import REWARDS, reward_from_flags

if TYPE_CHECKING:  # torch and transformers load after the flags are parsed: --help stays fast
    from ..rl import RLTrainer, RunStart

PRESETS = {
    "smoke": dict(device="cpu", policy="tiny-gemma3n", dataset="builtin", reward="vader", max_steps=1,
                  batch_size=2, max_new_tokens=8, save_every=1, eval_every=1),
    "short": dict(max_steps=10, save_every=5, eval_every=5),
    "easy": dict(reward="easy", dataset="easy"),
}
PRESET_HELP = {
    "smoke": "CPU, tiny Gemma-3n (random weights), built-in prompts, VADER, 1 step, checkpoint, summary",
    "short": "10 steps, checkpoints every 5",
    "easy": "placeholder prompts and a toy reward (even token ids), no reward model",
}


def new_parser(description: str, defaults: RLConfig) -> argparse.ArgumentParser:
    """A trainer's parser with every shared flag; flags not given stay absent (presets can tell)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    add_common_args(p, defaults)
    return p


def add_common_args(p: argparse.ArgumentParser, d: RLConfig) -> None:
    """Every flag but the algorithm's own; defaults are shown from the config dataclass `d`."""
    model = p.add_argument_group("model and data")
    model.add_argument("--policy", help=f"policy to fine-tune: Hub id, folder, {' / '.join(TINY_MODELS)} (random, offline), or "
                       f"{' / '.join(RANDOM_SHAPED)} (random weights in real shapes) (default {d.policy})")
    model.add_argument("--tokenizer", help="tokenizer for policies that have none (random-gpt2-medium, "
                                           "random-gemma3n-e2b: default gpt2 from the Hub; offline ../shared/models/tiny-gpt2)")
    model.add_argument("--reward", type=reward_spec, metavar="{" + ",".join(REWARDS) + ",module:function}",
                       help="reward: VADER lexicon, a classifier (--reward_model), the toy reward, or a TRL-style "
                            "reward callable f(completions, **kwargs) named module:function (a module or .py file) "
                            f"(default {d.reward}; model when --reward_model is given)")
    model.add_argument("--reward_model", help="sequence classifier; naming one selects --reward model; "
                                              f"score = POSITIVE logit (default {d.reward_model})")
    model.add_argument("--dataset", help="prompts: builtin, easy, imdb (through datasets), or a .json/.jsonl/.csv/.txt[.gz] "
                                         f"file such as ../shared/data/imdb/train.jsonl.gz (default {d.dataset})")
    model.add_argument("--max_prompt_tokens", type=int, help=f"prompts are cut to this many tokens (default {d.max_prompt_tokens})")
    model.add_argument("--max_new_tokens", type=int, help=f"completion length (default {d.max_new_tokens})")
    model.add_argument("--temperature", type=float, help=f"sampling temperature (default {d.temperature})")
    model.add_argument("--no_chat_template", dest="chat_template", action="store_false",
                       help="give an instruct model the prompts as plain text; by default each becomes a user turn "
                            "of its tokenizer's chat template (rewards always see the plain text)")
    loop = p.add_argument_group("loop")
    loop.add_argument("--batch_size", type=int, help=f"prompts per step, over all processes (default {d.batch_size})")
    loop.add_argument("--max_steps", type=int, help=f"updates (default {d.max_steps})")
    opt = p.add_argument_group("optimizer and precision")
    opt.add_argument("--optimizer", choices=OPTIMIZERS,
                     help="aspg = adaptive sparse policy gradients: AdamW updating only the most important "
                          "entries (EMA of |grad|) after a dense warm-up, with error feedback; aspg_plan = ASPG as the "
                          "research plan writes it: a plain step w -= lr*grad on the most important entries, the "
                          f"other gradients dropped, no weight decay (default {d.optimizer})")
    opt.add_argument("--aspg_sparsity", type=float, help="--optimizer aspg: share of entries NOT updated at each step "
                     f"after the warm-up; the global top 1 - this are (default {ASPG_SPARSITY})")
    opt.add_argument("--aspg_update_fraction", type=float, help="--optimizer aspg_plan: share of entries updated at "
                     f"each step after the warm-up, the plan's 'sparsity' (default {PLAN_UPDATE_FRACTION})")
    opt.add_argument("--aspg_warmup", type=int, help="ASPG: dense steps before the sparse ones (default "
                     f"{ASPG_WARMUP} for aspg, {PLAN_WARMUP} for aspg_plan)")
    opt.add_argument("--update_mask", metavar="PATH",
                     help="fine-tune only the subnetwork in this mask file (compute_masks.py; --from_run RUN gives a run's "
                          "'ever changed' mask): gradients masked, weights outside it held at θ0. A mask made from a run "
                          "also writes subnetwork_comparison.json (identical weights vs that run, both final rewards). "
                          "Tensors the mask does not cover stay at θ0 too")
    opt.add_argument("--train_unmasked", action="store_true",
                     help="with --update_mask: also train the tensors the mask does not cover (embeddings, norms, "
                          "biases of a compute_masks.py mask)")
    opt.add_argument("--lr", "--learning_rate", type=float, help=f"learning rate (default {d.lr})")
    opt.add_argument("--weight_decay", type=float, help=f"(default {d.weight_decay})")
    opt.add_argument("--max_grad_norm", type=float, help=f"gradient clipping; 0 = off (default {d.max_grad_norm})")
    add_precision_args(opt, d.precision)
    opt.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations to save memory")
    place = p.add_argument_group("devices")
    place.add_argument("--device", help="training device: auto (accelerate's choice), cpu, cuda")
    place.add_argument("--ref_device", help="reference model's device (auto = the training device); cpu saves GPU memory")
    place.add_argument("--reward_device", help="reward model's device (auto = the training device)")
    place.add_argument("--ddp_topk_density", type=float,
                       help="several processes (torchrun / accelerate launch, DDP): each sends only this share of its "
                            "gradient entries per bucket, the largest |grad + residual| as int32 index + value, the "
                            "rest carried to the next step; logs comm/topk_bytes beside comm/dense_bytes "
                            "(default: DDP's dense all-reduce)")
    track = p.add_argument_group("tracking")
    track.add_argument("--atol", type=float, help=f"absolute rule |Δ| > atol (default {d.atol})")
    track.add_argument("--eta", type=float, help=f"relative rule |Δ| > eta·max(|w|,|w'|) (default {d.eta})")
    track.add_argument("--topk", type=int, help=f"k of the top-k block concentration (default {d.topk})")
    track.add_argument("--no_localization", dest="log_localization", action="store_false",
                       help="do not log per-block Gini / entropy / top-k every step")
    io = p.add_argument_group("checkpoints and logging")
    io.add_argument("--output_dir", help=f"run folder (default {d.output_dir})")
    io.add_argument("--save_every", type=int, help=f"checkpoint every N steps (default {d.save_every})")
    io.add_argument("--save_total_limit", type=int,
                    help="keep only the newest N step checkpoints, deleting older ones (TRL's name; default: keep "
                         "all; metrics.jsonl keeps the whole density curve)")
    io.add_argument("--full_checkpoints", action="store_true", help="write full safetensors instead of compact ones")
    io.add_argument("--eval_every", type=int, help=f"held-out reward and KL every N steps (default {d.eval_every})")
    io.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last checkpoint")
    io.add_argument("--allow_changed_settings", action="store_true",
                    help="with --resume: accept settings that differ from the run's (lr, batch, seed, ...); each "
                         "change is recorded in its run_config.json")
    io.add_argument("--wandb", metavar="PROJECT", help="also log to Weights & Biases (works with WANDB_MODE=offline)")
    io.add_argument("--no_tqdm", action="store_true", help="no progress bar (for logs)")
    io.add_argument("--seed", type=int, help=f"seed of prompt order, sampling and new heads; tiny models keep one init (default {d.seed})")
    add_trl_aliases(p, d)
    pre = p.add_argument_group("presets")
    for name, text in PRESET_HELP.items():
        pre.add_argument(f"--{name}", action="store_true", help=text)


def reward_spec(value: str) -> str:
    """--reward: a reward's name, or module:function, imported now so that a bad one is refused before any work."""
    if value in REWARDS:
        return value
    if ":" not in value:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(REWARDS)}, "
                                         "or module:function)")
    from ..reward_import import import_reward

    import_reward(value)
    return value


# TRL's spelling of a setting -> ours (same meaning); --per_device_train_batch_size is converted (trl_batch_size)
TRL_SYNONYMS = {"num_generations": "group_size", "num_iterations": "inner_epochs"}


def add_trl_aliases(p: argparse.ArgumentParser, d: RLConfig) -> None:
    """TRL's names for settings these loops call otherwise (--learning_rate is a second name of --lr)."""
    trl = p.add_argument_group("TRL's spellings (the same settings)")
    trl.add_argument("--per_device_train_batch_size", type=int, dest="trl_per_device_train_batch_size", metavar="N",
                     help="completions per process per optimizer step, as TRL counts them: --batch_size becomes "
                          "this x processes / completions per prompt")
    for theirs, ours in TRL_SYNONYMS.items():
        if hasattr(d, ours):
            trl.add_argument(f"--{theirs}", type=int, dest=f"trl_{theirs}", metavar="N",
                             help=f"TRL's name for --{ours}")


def trl_settings(values: dict, config_cls: type[RLConfig], args: argparse.Namespace) -> dict:
    """Our settings from TRL's spellings given on the command line; both spellings with two values is refused."""
    out: dict = {}
    for theirs, ours in TRL_SYNONYMS.items():
        if hasattr(args, f"trl_{theirs}"):
            value = getattr(args, f"trl_{theirs}")
            if hasattr(args, ours) and getattr(args, ours) != value:
                raise SubnetscopeError(f"--{theirs} {value} and --{ours} {getattr(args, ours)} name one setting: "
                                       "give one of them")
            out[ours] = value
    if hasattr(args, "trl_per_device_train_batch_size"):
        out["batch_size"] = trl_batch_size(args.trl_per_device_train_batch_size, config_cls,
                                           {**values, **out}, getattr(args, "batch_size", None))
    return out


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


def config_from_args(config_cls: type[RLConfig], args: argparse.Namespace, preset_extra: dict | None = None) -> RLConfig:
    """Dataclass defaults, then the presets' values, then the flags given."""
    values: dict = {}
    for preset in ("smoke", "short", "easy"):
        if getattr(args, preset, False):
            values.update(PRESETS[preset])
            values.update((preset_extra or {}).get(preset, {}))
    explicit = {f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)}
    explicit.update(trl_settings({**values, **explicit}, config_cls, args))
    values.update(explicit)
    values.update(reward_from_flags(explicit))
    return config_cls(**values)


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
