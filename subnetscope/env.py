"""What an RL config's trainer and a tool both start from: models, tokenizer, reward and prompts, built once.

`build_env` writes nothing (no run folder, no θ0 on disk): the RL trainers build through it and then
own their run; a tool such as gradient_rank builds through it and never has one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import RLConfig
from .data import EVAL_PROMPTS, load_prompts
from .devices import resolve_device
from .errors import warn
from .models import load_causal_lm, load_tokenizer
from .precision import Precision, resolve_precision
from .rewards import RewardFunction, build_reward

EVAL_HOLDOUT = 16  # the last prompts of a dataset, kept out of training to evaluate on


@dataclass(frozen=True)
class Env:
    """The policy at θ0 (in the precision's weight dtype, on `device`), the frozen reference where the config
    asks for one (on `ref_device`), the sampler rollouts draw from under mixed precision (the policy rounded
    to the compute dtype; None: the policy itself), tokenizer, reward and the train/eval prompts.

    θ0 ownership: the Env owns no θ0 buffer. `policy` holds θ0 until a trainer trains it in place; `ref` is a
    frozen second load of it. A trainer's UpdateTracker owns the θ0 buffer: it copies θ0 in and, when `ref`
    sits on the policy's device in the tracker's dtype, rebinds ref's parameters to views of that buffer
    (RLTrainer._theta0), so the two share one copy; the trainer's RunDir writes θ0 to disk. A tool that never
    steps (gradient_rank) reads θ0 off `policy`."""

    precision: Precision
    device: str
    tokenizer: Any
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    ref_device: str
    sampler: torch.nn.Module | None
    reward_fn: RewardFunction
    prompts: list[str]
    eval_prompts: list[str]
    chat_template: bool  # the policy sees each prompt as a user turn of its chat template


def disable_dropout(model: torch.nn.Module) -> None:
    """RL log-ratios must compare the same function: no dropout in policy or reference."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def reference_dtype(precision: Precision) -> torch.dtype:
    """The frozen reference model's dtype: the view's when forward passes compute in it (mixed, bf16 view),
    so that the reference holds the published θ0 and the view tracker borrows it; else the weights'."""
    return precision.view if precision.compute == precision.view else precision.weights


def load_sampler(config: RLConfig, precision: Precision, vocab_size: int, device: str) -> torch.nn.Module | None:
    """Under mixed precision, rollouts sample from a copy of the policy in the compute dtype, refreshed
    from the fp32 masters before each generation: what real recipes do (a bf16 inference engine fed
    the trainer's weights). Autocast would re-cast every weight at every new token, and its float32
    rotated keys rule out a static KV cache. The log-probabilities of the loss still come from the
    fp32 masters under autocast."""
    if precision.compute is None:
        return None
    sampler = load_causal_lm(config.policy, precision.compute, vocab_size=vocab_size)
    disable_dropout(sampler)
    return sampler.to(device).eval().requires_grad_(False)


def split_eval_prompts(dataset: str, prompts: list[str]) -> tuple[list[str], list[str]]:
    """(training, evaluation) prompts: the built-in evaluation set, the first 8 easy ones, or a dataset's
    last EVAL_HOLDOUT, kept out of training unless that would leave none."""
    if dataset == "builtin":
        return prompts, list(EVAL_PROMPTS)
    if dataset == "easy":
        return prompts, prompts[:8]
    held_out = prompts[-EVAL_HOLDOUT:]
    if len(prompts) <= EVAL_HOLDOUT:
        warn(f"--dataset {dataset} has {len(prompts)} prompts, no more than the {EVAL_HOLDOUT} held out for "
             "evaluation: training uses them too, so eval/* measures training prompts")
        return prompts, held_out
    return prompts[:-EVAL_HOLDOUT], held_out


def build_env(config: RLConfig, device: str | None = None, reward_fn: RewardFunction | None = None) -> Env:
    """Seed every RNG from config.seed, then load what `config` names, in the order the trainers always did
    (same seeds, same models). `device`: a trainer's own (accelerate's, one per process); None: config.device.
    `reward_fn` replaces config.reward's. Bad settings are refused before anything loads."""
    from accelerate.utils import set_seed

    config.validate()
    device = device or resolve_device(config.device)
    set_seed(config.seed)
    precision = resolve_precision(config.precision, device, config.view_dtype)
    tokenizer = load_tokenizer(config.policy, config.tokenizer)
    policy = load_causal_lm(config.policy, precision.weights, vocab_size=len(tokenizer))
    disable_dropout(policy)
    if config.gradient_checkpointing:
        enable = getattr(policy, "activation_checkpointing_enable", None)  # transformers >= 5.20 name
        (enable or policy.gradient_checkpointing_enable)()
    policy.to(device)
    ref_device = resolve_device(config.ref_device, device)
    ref = None
    if config.uses_reference():
        ref = load_causal_lm(config.policy, reference_dtype(precision), vocab_size=len(tokenizer))
        disable_dropout(ref)
        ref.to(ref_device).eval().requires_grad_(False)
    sampler = load_sampler(config, precision, len(tokenizer), device)
    reward_device = resolve_device(config.reward_device, device)
    reward_fn = reward_fn or build_reward(config.reward, config.reward_model, reward_device)
    prompts, eval_prompts = split_eval_prompts(
        config.dataset, load_prompts(config.dataset, tokenizer, config.max_prompt_tokens, seed=config.seed))
    chat_template = config.chat_template and bool(getattr(tokenizer, "chat_template", None))
    return Env(precision, device, tokenizer, policy, ref, ref_device, sampler, reward_fn, prompts, eval_prompts,
               chat_template)
